"""Softmax attention with RoPE and an optional sliding window, for hybrid models."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mixer, projection_input


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form, as Llama's) of x [B, T, H, D] at integer positions
    [T] (shared by the rows) or [B, T] (a position per row, e.g. left-padded batches); D even;
    computed in float32 (float64 for float64 x), returned in x's dtype."""
    D = x.shape[-1]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=dt) / D)  # [D/2]
    ang = positions.to(dt)[..., None] * inv_freq                                 # [(B,) T, D/2]
    cos, sin = ang.cos().unsqueeze(-2), ang.sin().unsqueeze(-2)                  # [(B,) T, 1, D/2]
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention_mask(q_pos, k_pos, window, q_seq=None, k_seq=None) -> torch.Tensor:
    """Bool [Tq, Tk], True where query i may attend key j: k_pos <= q_pos, within the window
    (q_pos - k_pos < window) and, with packed sequences, in the same sequence."""
    d = q_pos[:, None] - k_pos[None, :]
    allowed = d >= 0
    if window is not None:
        allowed &= d < window
    if q_seq is not None:
        allowed &= q_seq[:, None] == k_seq[None, :]
    return allowed


class Attention(Mixer):
    """Causal multi-head softmax attention (scaled_dot_product_attention) with RoPE.

        q, k, v = x W_q, x W_k, x W_v  [B, T, H, D];  q, k rotated at their absolute positions
                                                      (unless rope is False)
        token t attends to s with t - window < s <= t (window None: all s <= t)
        y = W_o softmax(q k^T / sqrt(D) + mask) v

    Args:
        d_model, n_heads, layer_idx, n_layers: see Mixer (head_dim must be even for RoPE).
        backend: accepted for a uniform signature; attention always uses PyTorch's SDPA.
        window: sliding-window length (None: full causal attention).
        rope_theta: RoPE base (10000).
        n_kv_heads: key/value heads (None: n_heads), a divisor of n_heads: grouped-query
            attention, each key/value head shared by n_heads / n_kv_heads query heads.
        qkv_bias, o_bias: biases of the q/k/v projections and of the output projection.
        rope: rotate q and k (False: no positions here, e.g. a model with learned absolute
            positions, as Zoology's attention).
        dropout: dropout on the attention probabilities while training (Zoology's 0.1).

    forward: as in linattn.layers.base. With cu_seqlens, positions restart at each packed
    sequence and attention stays inside it; a state (KV cache) cannot be combined with
    cu_seqlens (ValueError). The state is the dict {"k": [B, L, H_kv, D] rotated keys, "v":
    [B, L, H_kv, D], "offset": int, the absolute position of the next token}; with a window only
    the last window-1 tokens are kept.

    Sequence parallelism (set_sequence_parallel): x is this rank's slice; q and k are rotated
    at their global positions (the slice's offset comes from one all-gather of the slice
    lengths, so slices of any lengths work), full causal attention runs LASP-2H
    (sp.causal_attention: K and V all-gathered), a sliding window reads only the window-1
    keys and values before the slice (sp.prev_tokens).
    """

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, save_for_backward: str = "states",
                 window: int | None = None, rope_theta: float = 10000.0,
                 n_kv_heads: int | None = None, qkv_bias: bool = False, o_bias: bool = False,
                 rope: bool = True, dropout: float = 0.0):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers,
                         save_for_backward=save_for_backward)
        n_kv = n_heads if n_kv_heads is None else n_kv_heads
        if isinstance(n_kv, bool) or not isinstance(n_kv, int) or n_kv < 1 or n_heads % n_kv:
            raise ValueError(f"n_kv_heads must be a positive divisor of n_heads={n_heads}, got {n_kv_heads!r}")
        self.n_kv_heads = n_kv
        if rope and self.head_dim % 2:
            raise ValueError(f"attention needs an even head dim for RoPE, got d_model/n_heads = {self.head_dim}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or a positive int, got {window!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.window, self.rope_theta, self.use_rope, self.dropout = window, rope_theta, bool(rope), float(dropout)
        self.q_proj = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=o_bias)

    def project(self, x: torch.Tensor):
        """x [B, T, d_model] -> q [B, T, H, D], k and v [B, T, H_kv, D] (not rotated): one GEMM
        when the three projections are plain nn.Linear, else one call each (a wrapped or
        hooked projection, e.g. a LoRA adapter; Mixer.input_projections)."""
        D = self.head_dim
        q, k, v, _ = self.input_projections(projection_input(x), self.q_proj, self.k_proj,
                                            self.v_proj)  # [B, T, H * D], [B, T, H_kv * D] x 2
        if self.use_rope:
            # RoPE gives q and k their own storage; v alone would keep the whole fused
            # output (q and k's columns too) alive for SDPA's backward
            v = v.contiguous()
        return (self.heads(q, D), k.unflatten(-1, (self.n_kv_heads, D)),
                v.unflatten(-1, (self.n_kv_heads, D)))

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """rope(x, positions) when this layer uses RoPE, else x."""
        return rope(x, positions, self.rope_theta) if self.use_rope else x

    def expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Keys or values [B, L, H_kv, D] -> [B, L, H, D] (each shared by H/H_kv query heads)."""
        rep = self.n_heads // self.n_kv_heads
        return x if rep == 1 else x.repeat_interleave(rep, dim=2)

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        if cu_seqlens is not None and (state is not None or return_state):
            raise ValueError("attention keeps no per-sequence KV cache with cu_seqlens: "
                             "pass state=None and return_state=False")
        B, T, _ = x.shape
        D, dev = self.head_dim, x.device
        q, k, v = self.project(x)  # [B, T, H, D], [B, T, H_kv, D] x 2
        if self.sequence_parallel is not None:
            o = self._parallel_attention(q, k, v)  # [B, T, H, D]
            return self.o_proj(o.flatten(-2)), None
        offset = 0 if state is None else int(state["offset"])
        t = torch.arange(T, device=dev)
        q_seq = k_seq = None
        if cu_seqlens is not None:
            cu = cu_seqlens.to(device=dev, dtype=torch.long)
            q_seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=dev), cu[1:] - cu[:-1])
            k_seq = q_seq
            pos = t - cu[:-1][q_seq]                   # [T] position inside its sequence
        else:
            pos = offset + t
        q, k = self.rotate(q, pos), self.rotate(k, pos)
        k_pos = pos
        if state is not None:
            L = state["k"].shape[1]
            k = torch.cat([state["k"].to(k.dtype), k], dim=1)  # [B, L+T, H, D]
            v = torch.cat([state["v"].to(v.dtype), v], dim=1)
            k_pos = torch.cat([offset - L + torch.arange(L, device=dev), pos])
        qh, kh, vh = (z.transpose(1, 2) for z in (q, self.expand_kv(k), self.expand_kv(v)))  # [B, H, T, D]
        p = self.dropout if self.training else 0.0
        if state is None and cu_seqlens is None and self.window is None:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, dropout_p=p)
        else:
            mask = attention_mask(pos, k_pos, self.window, q_seq, k_seq)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=p)
        y = self.o_proj(o.transpose(1, 2).flatten(-2))  # [B, H, T, D] -> [B, T, H * D]
        if not return_state:
            return y, None
        keep = k.shape[1] if self.window is None else min(k.shape[1], self.window - 1)
        k, v = k[:, k.shape[1] - keep:], v[:, v.shape[1] - keep:]
        if state is None:  # views of the fused projections' output (k too without RoPE)
            k, v = k.contiguous(), v.contiguous()
        return y, {"k": k, "v": v, "offset": offset + T}

    def _parallel_attention(self, q, k, v):
        """This rank's slice q, k, v [B, T_r, H, D] -> o [B, T_r, H, D] (see the class docstring)."""
        from ..parallel.comm import all_gather_lengths

        sp, T, dev = self.sequence_parallel, q.shape[1], q.device
        if self.training and self.dropout:
            raise ValueError("attention dropout does not run sequence-parallel: use dropout 0")
        offset = sum(all_gather_lengths(T, dev, sp.group)[: sp.rank])  # global position of token 0
        pos = offset + torch.arange(T, device=dev)
        q, k = self.rotate(q, pos), self.rotate(k, pos)
        k, v = self.expand_kv(k), self.expand_kv(v)
        if self.window is None:
            return sp.causal_attention(q, k, v)
        n = self.window - 1  # every rank asks for the same n (prev_tokens pads with zeros)
        keep = min(n, offset)  # the steps before the slice that exist
        kv = torch.cat([k, v], dim=-1)                                   # [B, T, H, 2D]
        kv = torch.cat([sp.prev_tokens(kv, n)[:, n - keep:], kv], dim=1)  # [B, keep + T, H, 2D]
        k, v = kv.split(self.head_dim, dim=-1)
        k_pos = offset - keep + torch.arange(keep + T, device=dev)
        qh, kh, vh = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attention_mask(pos, k_pos, self.window))
        return o.transpose(1, 2)
