"""Weighted sums of outer products over the time axis, split over time for parallelism.

    out[b, h] = sum_t exp(w[b, t, h]) a[b, t, h, :]^T b[b, t, h, :]      ([K, V] per sequence and head)

with w None (weights 1), a log-weight per token and head [B, T, H], or one per token, head
and key [B, T, H, K] (row k of the outer product weighted by exp(w[..., k])). Sequence
parallelism forms its per-rank states with it (linattn.parallel.lasp): the state a slice
builds from zero (a = k, b = v, w the decay from after t to the slice's end) and what the
slice's outputs send back into its incoming state (a = scale q, b = do, w the decay from the
slice's start through t).

One sequence of 512K tokens at H = 16 has only H * (K / BK) * (V / BV) = 64 output blocks:
a batched matmul over time runs one program per block (measured slow in this shape), so the
time axis is cut into splits, one program per (split, block), whose float32 partial sums are
added afterwards. Reads a and b once in their own dtype; the weights are applied to a's tile
in float32 and rounded to b's dtype for the dot (as the op's state scans round k), and the
dot accumulates in float32 (ieee products for float32 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, dot, exp, head_tile, sm_count

# Programs per SM the split count aims for (each program a [BK, BV] block of one split).
PROGRAMS_PER_SM = 4


@triton.jit
def outer_sum_kernel(a, b, w, out, T, H, K, V, SPLIT,
                     sa_b, sa_t, sa_h, sb_b, sb_t, sb_h, sw_b, sw_t, sw_h,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     W_KIND: tl.constexpr, IEEE: tl.constexpr):
    """One [BK, BV] block of one split's partial sum: out[split, b*H + h, K block, V block]
    (float32). W_KIND: 0 no weights, 1 one log-weight per token and head, 2 one per key."""
    tl.static_assert(BT >= 16 and BK >= 16 and BV >= 16)
    s = tl.program_id(0)
    kv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)                          # sequence * H + head
    bb = bh // H
    hh = bh % H
    nvb = tl.cdiv(V, BV)
    ck = (kv // nvb) * BK + tl.arange(0, BK)                    # key columns of this block
    cv = (kv % nvb) * BV + tl.arange(0, BV)                     # value columns
    mk = ck < K
    mv = cv < V
    pa = a + bb * sa_b + hh * sa_h                              # this sequence and head
    pb = b + bb * sb_b + hh * sb_h
    pw = w + bb * sw_b + hh * sw_h
    t0 = s * SPLIT                                              # the split's first token
    t1 = tl.minimum(t0 + SPLIT, T)                              # one past its last
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(tl.cdiv(t1 - t0, BT)):
        rows = (t0 + i * BT + tl.arange(0, BT)).to(tl.int64)    # int64: T * H * K passes 2^31
        mr = rows < t1
        at = tl.load(pa + rows[:, None] * sa_t + ck[None, :], mask=mr[:, None] & mk[None, :],
                     other=0.0)                                 # [BT, BK]
        bt = tl.load(pb + rows[:, None] * sb_t + cv[None, :], mask=mr[:, None] & mv[None, :],
                     other=0.0)                                 # [BT, BV]
        if W_KIND == 1:                                         # weight per token
            lw = tl.load(pw + rows * sw_t, mask=mr, other=0.0)
            at = at.to(tl.float32) * exp(lw, IEEE)[:, None]
        if W_KIND == 2:                                         # weight per token and key
            lw = tl.load(pw + rows[:, None] * sw_t + ck[None, :], mask=mr[:, None] & mk[None, :],
                         other=0.0)
            at = at.to(tl.float32) * exp(lw, IEEE)
        acc += dot(tl.trans(at.to(bt.dtype)), bt, IEEE)         # [BK, BT] x [BT, BV], float32
    po = out + ((s * tl.num_programs(2) + bh) * K + ck[:, None]) * V + cv[None, :]
    tl.store(po, acc, mask=mk[:, None] & mv[None, :])


def _last_dim_unit(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (any other strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def weighted_outer_sum(a: torch.Tensor, b: torch.Tensor, logw: torch.Tensor | None = None,
                       split: int | None = None) -> torch.Tensor:
    """sum_t exp(logw_t) a_t^T b_t per sequence and head: [B, H, K, V] float32.

    a: [B, T, H, K], b: [B, T, H, V], one dtype (float32, bfloat16, float16), any strides
    (a copy is made only when the last dim is not contiguous). logw: None, [B|1, T, H] or
    [B|1, T, H, K] float32 log-weights (a leading 1 broadcasts over B). split: tokens per
    program (None: enough splits for PROGRAMS_PER_SM programs per SM; one on the CPU).
    """
    B, T, H, K = a.shape
    V = b.shape[-1]
    if b.shape[:3] != a.shape[:3] or b.dtype != a.dtype:
        raise ValueError(f"b must be [B, T, H, V] with a's B, T, H {tuple(a.shape[:3])} and "
                         f"dtype {a.dtype}, got {tuple(b.shape)} {b.dtype}")
    kind = 0 if logw is None else (2 if logw.dim() == 4 else 1)
    if logw is not None:
        want = (T, H, K) if kind == 2 else (T, H)
        if tuple(logw.shape[1:]) != want or logw.shape[0] not in (1, B) or logw.dtype != torch.float32:
            raise ValueError(f"logw must be float32 [B|1, {', '.join(map(str, want))}], got "
                             f"{tuple(logw.shape)} {logw.dtype}")
    a, b = _last_dim_unit(a), _last_dim_unit(b)
    if INTERPRET:
        BT, BK, BV = 16, head_tile(K, 32), head_tile(V, 32)
    else:
        BT, BK, BV = 64, head_tile(K, 64), head_tile(V, 64)
    blocks = B * H * triton.cdiv(K, BK) * triton.cdiv(V, BV)
    if split is None:
        sms = sm_count(a.device)
        n = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, blocks), triton.cdiv(max(T, 1), BT)))
        split = triton.cdiv(triton.cdiv(max(T, 1), n), BT) * BT
    n_split = triton.cdiv(max(T, 1), split)
    part = torch.empty(n_split, B * H, K, V, dtype=torch.float32, device=a.device)
    w = a if logw is None else _last_dim_unit(logw)
    sw = (0, 0, 0) if logw is None else (0 if w.shape[0] == 1 else w.stride(0), w.stride(1), w.stride(2))
    grid = (n_split, triton.cdiv(K, BK) * triton.cdiv(V, BV), B * H)
    outer_sum_kernel[grid](a, b, w, part, T, H, K, V, split,
                           a.stride(0), a.stride(1), a.stride(2),
                           b.stride(0), b.stride(1), b.stride(2), *sw,
                           BT=BT, BK=BK, BV=BV, W_KIND=kind, IEEE=a.dtype == torch.float32,
                           num_warps=4, num_stages=1 if INTERPRET else 3)
    return part.sum(0).view(B, H, K, V)
