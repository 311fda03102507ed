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


class HedgehogMap(nn.Module):
    """Hedgehog's trainable map: x [B, T, H, D] -> [softmax(x W_h), softmax(-x W_h)] [B, T, H, 2D],
    each softmax over its own D features (as the Hedgehog and LoLCATs code does: each half
    sums to 1, so the positive and the negative half weigh alike).

    W_h starts as the identity, so the map starts as [softmax(x), softmax(-x)] (a spiky,
    positive map that mimics softmax attention's weights)."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(n_heads, 1, 1))  # [H, D, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bthd,hde->bthe", x, self.weight.to(x.dtype))  # [B, T, H, D]
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)  # [B, T, H, 2D]


class FeatureMap(nn.Module):
    """phi for one of FEATURE_MAPS; out_dim is the feature width for head_dim inputs."""

    def __init__(self, name: str, n_heads: int, head_dim: int):
        super().__init__()
        if name not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")
        self.name = name
        self.hedgehog = HedgehogMap(n_heads, head_dim) if name == "hedgehog" else None
        self.out_dim = 2 * head_dim if name == "hedgehog" else head_dim

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
