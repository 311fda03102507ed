"""RMSNorm, and the per-head output norm with an optional gate that most mixers end with.

The math is linattn.ops.fused (rms_norm, gated_rms_norm, gated_rms_norm_linear): one Triton
kernel forward and one backward on CUDA tensors, plain PyTorch elsewhere.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.fused import (GATE_ACTIVATIONS, gated_rms_norm, gated_rms_norm_linear,
                         gated_rms_norm_linear_projected, rms_norm)
from .base import plain_linear

__all__ = ["GATE_ACTIVATIONS", "GatedOutputNorm", "RMSNorm", "rms_norm"]


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

    forward(o, gate=None, linear=None): with an out-projection `linear`, linear(norm(o, gate)),
    the mixers' output: for a plain nn.Linear without hooks it runs as one autograd node
    (gated_rms_norm_linear), which keeps for the backward o and the gate but not the norm's
    output (recomputed in the backward); any other module (hooked, wrapped, quantised) is
    called on the norm's output.
    forward(o, gate_proj, linear, x=x): the gate is gate_proj(x); with gate_proj and linear
    plain nn.Linear without hooks and a gated norm, one node (gated_rms_norm_linear_projected)
    that keeps x instead of the gate and recomputes the gate in its backward (the mixers'
    save_for_backward="recompute": x is their projections' shared input, kept anyway);
    otherwise forward(o, gate_proj(x), linear).
    backend (attribute, "auto"): linattn.ops.fused's backend choice ("triton" takes the Triton
    path on the CPU too, under TRITON_INTERPRET=1).
    """

    def __init__(self, head_v_dim: int, activation: str | None = "silu", eps: float = 1e-6):
        super().__init__()
        if activation is not None and activation not in GATE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(GATE_ACTIVATIONS)} or None, got {activation!r}")
        self.norm = RMSNorm(head_v_dim, eps)
        self.activation = activation
        self.backend = "auto"

    def forward(self, o: torch.Tensor, gate: torch.Tensor | nn.Module | None = None,
                linear: nn.Module | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        w, eps = self.norm.weight, self.norm.eps
        if x is not None:
            if self.activation is not None and plain_linear(gate) and plain_linear(linear):
                return gated_rms_norm_linear_projected(
                    o, w, x, gate.weight, gate.bias, self.activation, eps, linear.weight,
                    linear.bias, backend=self.backend)
            gate = gate(x)
        if linear is None:
            return gated_rms_norm(o, w, gate, self.activation, eps, backend=self.backend)
        if not plain_linear(linear):
            return linear(gated_rms_norm(o, w, gate, self.activation, eps, backend=self.backend))
        return gated_rms_norm_linear(o, w, gate, self.activation, eps, linear.weight,
                                     linear.bias, backend=self.backend)

