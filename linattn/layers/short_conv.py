"""Short causal depthwise convolution (kernel 4 by default) with a decoding cache and varlen.

    y_t = act( sum_{s=0}^{W-1} w[:, W-1-s] * x_{t-s} ),   x_{t-s} = 0 (or the cache) before the
    start of t's sequence.

The cache is the last W-1 inputs, [B, W-1, C] ([N, W-1, C] with cu_seqlens), so decoding one
token at a time gives exactly the full-sequence result.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """Causal depthwise conv over time followed by SiLU (or no activation).

    Args:
        channels: C, the conv is per channel.
        kernel_size: W (>= 1).
        activation: "silu" or None.
    forward(x [B, T, C], cache=None, cu_seqlens=None, return_cache=False)
        -> (y [B, T, C] in x's dtype, new cache [B or N, W-1, C] or None).
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: str | None = "silu"):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if activation not in ("silu", None):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))  # [C, W], tap W-1 = now
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise conv
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, cu_seqlens=None,
                return_cache: bool = False):
        B, T, C = x.shape
        W = self.kernel_size
        n_rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
        if cache is not None and tuple(cache.shape) != (n_rows, W - 1, C):
            raise ValueError(f"conv cache must be [{'N' if cu_seqlens is not None else 'B'}, "
                             f"W-1, C] = {(n_rows, W - 1, C)}, got {tuple(cache.shape)}")
        if cu_seqlens is None:
            y, new_cache = self._dense(x, cache)
        else:
            y, new_cache = self._varlen(x, cache, cu_seqlens)
        if self.activation == "silu":
            y = F.silu(y)
        return y, (new_cache if return_cache else None)

    def _dense(self, x, cache):
        B, T, C = x.shape
        W = self.kernel_size
        if cache is None:
            cache = x.new_zeros(B, W - 1, C)
        xx = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, W-1+T, C]
        w = self.weight.to(x.dtype)
        y = sum(xx[:, j : j + T] * w[:, j] for j in range(W))  # tap j sees x_{t-(W-1-j)}
        return y, xx[:, T:]

    def _varlen(self, x, cache, cu_seqlens):
        """B == 1: gathers each tap from one buffer [x rows | cache rows | a zero row]."""
        T, C = x.shape[1], x.shape[2]
        W = self.kernel_size
        dev = x.device
        cu = cu_seqlens.to(device=dev, dtype=torch.long)
        N = cu.numel() - 1
        lengths = cu[1:] - cu[:-1]                                             # [N]
        seq = torch.repeat_interleave(torch.arange(N, device=dev), lengths)   # [T]
        t = torch.arange(T, device=dev)
        pos = t - cu[:-1][seq]                                                 # [T] index in its sequence
        parts = [x[0]]
        if cache is not None:
            parts.append(cache.to(x.dtype).reshape(N * (W - 1), C))           # [N*(W-1), C]
        parts.append(x.new_zeros(1, C))
        buf = torch.cat(parts, 0)
        zero_row = buf.shape[0] - 1

        def index(row_seq, p, abs_row):
            """Buffer row of position p of sequence row_seq (p < 0: from the cache)."""
            if cache is None:
                from_cache = torch.full_like(p, zero_row)
            else:
                from_cache = T + row_seq * (W - 1) + (W - 1 + p).clamp(min=0)
            return torch.where(p >= 0, abs_row, from_cache)

        shifts = torch.arange(W - 1, -1, -1, device=dev)                       # tap j: shift W-1-j
        idx = index(seq[None], pos[None] - shifts[:, None], t[None] - shifts[:, None])  # [W, T]
        y = torch.einsum("wtc,cw->tc", buf[idx], self.weight.to(x.dtype))[None]  # [1, T, C]

        r = torch.arange(W - 1, device=dev)
        p_last = lengths[:, None] - (W - 1) + r[None]                          # [N, W-1]
        n_ids = torch.arange(N, device=dev)[:, None].expand_as(p_last)
        new_cache = buf[index(n_ids, p_last, cu[:-1, None] + p_last)]          # [N, W-1, C]
        return y, new_cache
