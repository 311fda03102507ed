"""Feature maps phi applied to queries and keys by the plain linear-attention layer.

    name        phi(x) per head                                   output normalisation
    "identity"  x                                                 divide by phi(q) . sum phi(k)
    "elu"       elu(x) + 1                                        divide by phi(q) . sum phi(k)
    "hedgehog"  [softmax(x W_h), softmax(-x W_h)], each softmax     divide by phi(q) . sum phi(k)
                over its D features (trainable W_h [D, D] per head,
                separate for q and k; width 2D)
    "norm"      elu(x) + 1 (TransNormer's NormAttention)          RMSNorm of the output instead

"identity" gives a denominator of either sign: it is there for completeness and for
linearising models that were trained without one; prefer "elu" or "hedgehog" to train.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_MAPS = ("identity", "elu", "hedgehog", "norm")
HEDGEHOG_INITS = ("identity", "kaiming")


class HedgehogMap(nn.Module):
    """Hedgehog's trainable map: x [B, T, H, D] -> [softmax(x W_h), softmax(-x W_h)] [B, T, H, 2D],
    each softmax over its own D features (as the Hedgehog and LoLCATs code does: each half
    sums to 1, so the positive and the negative half weigh alike).

    W_h [D, F] (feature_dim F: D unless given; the width is 2F) starts as the identity
    (init "identity", F = D: the map starts as [softmax(x), softmax(-x)], a spiky, positive
    map that mimics softmax attention's weights) or Kaiming-uniform random (init "kaiming",
    LoLCATs' start, any F)."""

    def __init__(self, n_heads: int, head_dim: int, feature_dim: int | None = None, init: str = "identity"):
        super().__init__()
        F_ = head_dim if feature_dim is None else feature_dim
        if isinstance(F_, bool) or not isinstance(F_, int) or F_ < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        if init not in HEDGEHOG_INITS:
            raise ValueError(f"init must be one of {HEDGEHOG_INITS}, got {init!r}")
        if init == "identity" and F_ != head_dim:
            raise ValueError(f"init 'identity' needs feature_dim == head_dim ({head_dim}), got {F_}")
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(n_heads, 1, 1) if init == "identity"
                                   else nn.init.kaiming_uniform_(torch.empty(n_heads, head_dim, F_)))  # [H, D, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bthd,hde->bthe", x, self.weight.to(x.dtype))  # [B, T, H, F]
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)  # [B, T, H, 2F]


class FeatureMap(nn.Module):
    """phi for one of FEATURE_MAPS; out_dim is the feature width for head_dim inputs.
    hedgehog_dim, hedgehog_init: HedgehogMap's feature_dim and init ("hedgehog" only)."""

    def __init__(self, name: str, n_heads: int, head_dim: int, hedgehog_dim: int | None = None,
                 hedgehog_init: str = "identity"):
        super().__init__()
        if name not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")
        self.name = name
        self.hedgehog = HedgehogMap(n_heads, head_dim, hedgehog_dim, hedgehog_init) if name == "hedgehog" else None
        self.out_dim = 2 * self.hedgehog.weight.shape[-1] if name == "hedgehog" else head_dim

    @property
    def uses_denominator(self) -> bool:
        return self.name != "norm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D] -> [B, T, H, out_dim], x's dtype."""
        if self.name == "identity":
            return x
        if self.name in ("elu", "norm"):
            return F.elu(x) + 1.0
        return self.hedgehog(x)
