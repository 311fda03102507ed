"""RMSNorm, and the per-head output norm with an optional gate that most mixers end with."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATE_ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight over the last dim, computed in float32 (float64
    for float64 x); returns x's dtype."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(dt)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dt)
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim of any [..., dim] tensor, with a learnable scale [dim]."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedOutputNorm(nn.Module):
    """Per-head output norm, then an optional gate: rmsnorm(o) * weight * act(gate).

    o: [B, T, H, V]; gate: [B, T, H * V] (a projection of the layer input) or None; the
    weight [V] is shared by the heads. Returns [B, T, H * V] in o's dtype.
    """

    def __init__(self, head_v_dim: int, activation: str | None = "silu", eps: float = 1e-6):
        super().__init__()
        if activation is not None and activation not in GATE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(GATE_ACTIVATIONS)} or None, got {activation!r}")
        self.norm = RMSNorm(head_v_dim, eps)
        self.activation = activation

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm(o).flatten(-2)  # [B, T, H, V] -> [B, T, H * V]
        if self.activation is None:
            return y
        if gate is None:
            raise ValueError("this output norm is gated: pass the gate projection [B, T, H * V]")
        return y * GATE_ACTIVATIONS[self.activation](gate)
