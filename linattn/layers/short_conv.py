"""Short causal depthwise convolution (kernel 4 by default) with a decoding cache and varlen.

    y_t = act( sum_{s=0}^{W-1} w[:, W-1-s] * x_{t-s} ),   x_{t-s} = 0 (or the cache) before the
    start of t's sequence.

The cache is the last W-1 inputs, [B, W-1, C] ([N, W-1, C] with cu_seqlens), so decoding one
token at a time gives exactly the full-sequence result. The math is linattn.ops.fused.short_conv:
a Triton kernel (SiLU fused) on CUDA tensors, plain PyTorch elsewhere. With norm_channels > 0
the first norm_channels outputs are L2-normalised in groups of norm_group after the activation
(the delta-rule layers' q and k heads), fused into the same kernel.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.conv_delta import short_conv_delta_rule
from ..ops.fused import check_conv_norm, short_conv


class ShortConv(nn.Module):
    """Causal depthwise conv over time followed by SiLU (or no activation).

    Args:
        channels: C, the conv is per channel.
        kernel_size: W (>= 1).
        activation: "silu" or None.
        norm_channels: how many leading output channels are L2-normalised (0: none), a
            multiple of norm_group.
        norm_group: the channels each norm spans (a head's K).
    backend (attribute, "auto"): linattn.ops.fused's backend choice for the conv ("triton"
        takes the Triton path on the CPU too, under TRITON_INTERPRET=1).
    forward(x [B, T, C], cache=None, cu_seqlens=None, return_cache=False)
        -> (y [B, T, C] in x's dtype, new cache [B or N, W-1, C] or None).
    delta_rule(x, beta, g, ...): this conv then linattn.delta_rule on its output's split into
        q, k, v, as one autograd node that keeps x, not q, k, v (linattn.ops.conv_delta).
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: str | None = "silu",
                 norm_channels: int = 0, norm_group: int = 0):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if activation not in ("silu", None):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        check_conv_norm(norm_channels, norm_group, channels)
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.norm_channels, self.norm_group = norm_channels, norm_group
        self.backend = "auto"
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))  # [C, W], tap W-1 = now
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise conv
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, cu_seqlens=None,
                return_cache: bool = False):
        return short_conv(x, self.weight, cache, cu_seqlens, self.activation, return_cache,
                          backend=self.backend, norm_channels=self.norm_channels,
                          norm_group=self.norm_group)

    def delta_rule(self, x: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None = None, *,
                   heads: int, key_dim: int, value_dim: int, cache: torch.Tensor | None = None,
                   cu_seqlens=None, return_cache: bool = False, **op_kwargs):
        """linattn.ops.conv_delta.short_conv_delta_rule with this conv: x [B, T, C] with
        C = heads (2 key_dim + value_dim); op_kwargs (scale, initial_state,
        output_final_state, backend) go to the delta rule, which runs with
        save_for_backward="recompute". Returns (o [B, T, H, V], final state or None, new
        cache or None)."""
        return short_conv_delta_rule(x, self.weight, beta, g, heads=heads, key_dim=key_dim,
                                     value_dim=value_dim, conv_cache=cache,
                                     activation=self.activation,
                                     norm_channels=self.norm_channels,
                                     norm_group=self.norm_group, return_cache=return_cache,
                                     cu_seqlens=cu_seqlens, conv_backend=self.backend,
                                     **op_kwargs)
