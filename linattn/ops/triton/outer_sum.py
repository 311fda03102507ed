"""Decayed sums of outer products over the time axis, split over time for parallelism.

    out[b, h] = sum_t exp(L_t) a[b, t, h, :]^T b[b, t, h, :]          ([K, V] per sequence and head)

    reverse=True:   L_t = sum_{s > t} g_s     (the decay from after t to the sequence's end)
    reverse=False:  L_t = sum_{s <= t} g_s    (the decay from the start through t)

with g a log-decay: None (L = 0), [H] (constant), [B, T, H] (scalar) or [B, T, H, K] (per key:
row k of the outer product decays by exp(L_t[k])). Sequence parallelism forms its per-rank
states with it (linattn.parallel.lasp): the state a slice builds from zero (a = k, b = v,
reverse) and what the slice's outputs send back into its incoming state (a = q, b = do).

One sequence of 512K tokens at H = 16 has only H * (K / BK) * (V / BV) = 64 output blocks, so
the time axis is cut into splits, one program per (split, block), whose float32 partial sums
are added afterwards. Each program walks its split's tiles (backwards for reverse) carrying
the running log-decay, which starts at the split's offset (the sum of g over the later, or
earlier, splits: a small reduction here); a tile's L is that carry plus a cumulative sum over
the tile, so no L is the difference of two large sums and no scan runs over the whole
sequence. Reads a, b and g once in their own dtypes; the weights are applied to a's tile in
float32 and rounded to b's dtype for the dot (as the op's state scans round k), and the dot
accumulates in float32 (ieee products for float32 inputs, whose log-decay sums run in
float64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (GATE_KEY, GATE_NONE, GATE_SCALAR, INTERPRET, dot, exp, gate_of,
                     head_tile, sm_count)

# Programs per SM the split count aims for (each program a [BK, BV] block of one split).
PROGRAMS_PER_SM = 4


@triton.jit
def _gate_tile(g, rows, lim, ck, mk, sg_t, GATE: tl.constexpr, GDT: tl.constexpr):
    """g at rows (0 where rows >= lim): [BT] (GATE_SCALAR) or [BT, BK] (GATE_KEY), in GDT."""
    if GATE == GATE_SCALAR:
        x = tl.load(g + rows * sg_t, mask=rows < lim, other=0.0)
    else:
        x = tl.load(g + rows[:, None] * sg_t + ck[None, :], mask=(rows < lim)[:, None] & mk[None, :],
                    other=0.0)
    return x.to(GDT)


@triton.jit
def outer_sum_kernel(a, b, g, off, out, T, H, K, V, SPLIT,
                     sa_b, sa_t, sa_h, sb_b, sb_t, sb_h, sg_b, sg_t, sg_h,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     GATE: tl.constexpr, REVERSE: tl.constexpr, IEEE: tl.constexpr):
    """One [BK, BV] block of one split's partial sum: out[split, b*H + h, K block, V block]
    (float32). GATE (common.GATE_KINDS): none, scalar (a constant [H] g too, read with
    stride 0) or per key; off: the split's starting log-decay [splits, B*H] or
    [splits, B*H, K]."""
    tl.static_assert(BT >= 16 and BK >= 16 and BV >= 16)
    GDT: tl.constexpr = tl.float64 if IEEE else tl.float32     # log-decay sums
    s = tl.program_id(0)
    kv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)                          # sequence * H + head
    nbh = tl.num_programs(2)
    bb = bh // H
    hh = bh % H
    nvb = tl.cdiv(V, BV)
    ck = (kv // nvb) * BK + tl.arange(0, BK)                    # key columns of this block
    cv = (kv % nvb) * BV + tl.arange(0, BV)                     # value columns
    mk = ck < K
    mv = cv < V
    pa = a + bb * sa_b + hh * sa_h                              # this sequence and head
    pb = b + bb * sb_b + hh * sb_h
    pg = g + bb * sg_b + hh * sg_h
    t0 = s * SPLIT                                              # the split's first token
    t1 = tl.minimum(t0 + SPLIT, T)                              # one past its last
    if GATE == GATE_SCALAR:                                     # log-decay carried so far
        carry = tl.load(off + s * nbh + bh).to(GDT)
    if GATE == GATE_KEY:
        carry = tl.load(off + (s * nbh + bh) * K + ck, mask=mk, other=0.0).to(GDT)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    nt = tl.cdiv(t1 - t0, BT)
    for i in range(nt):
        if REVERSE:
            j = nt - 1 - i                                      # tiles from the split's end
        else:
            j = i
        r0 = t0 + j * BT
        rows = (r0 + tl.arange(0, BT)).to(tl.int64)             # int64: T * H * K passes 2^31
        mr = rows < t1
        at = tl.load(pa + rows[:, None] * sa_t + ck[None, :], mask=mr[:, None] & mk[None, :],
                     other=0.0)                                 # [BT, BK]
        bt = tl.load(pb + rows[:, None] * sb_t + cv[None, :], mask=mr[:, None] & mv[None, :],
                     other=0.0)                                 # [BT, BV]
        if GATE != GATE_NONE:
            gt = _gate_tile(pg, rows, t1, ck, mk, sg_t, GATE, GDT)   # g of the tile's tokens
            if REVERSE:
                # sum over the tile's later tokens: a reverse cumsum of g shifted by one row
                # (the tile's last row gets 0), never a difference of two sums
                lim = tl.minimum(r0 + BT, t1)
                gn = _gate_tile(pg, rows + 1, lim, ck, mk, sg_t, GATE, GDT)
                lw = carry + tl.cumsum(gn, axis=0, reverse=True)
            else:
                lw = carry + tl.cumsum(gt, axis=0)              # inclusive
            carry += tl.sum(gt, axis=0)                         # the tile's total
            if GATE == GATE_SCALAR:
                at = at.to(tl.float32) * exp(lw, IEEE)[:, None]
            else:
                at = at.to(tl.float32) * exp(lw, IEEE)
        acc += dot(tl.trans(at.to(bt.dtype)), bt, IEEE)         # [BK, BT] x [BT, BV], float32
    po = out + ((s * nbh + bh) * K + ck[:, None]) * V + cv[None, :]
    tl.store(po, acc, mask=mk[:, None] & mv[None, :])


def _last_dim_unit(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (any other strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _split_offsets(g, B, T, H, K, n, split, reverse, dtype):
    """(off [n, B, H] or [n, B, H, K] in dtype: the log-decay before each split's walk,
    total [B, H, K] in dtype: the sum of g over the sequence)."""
    if g.dim() == 1:                                            # [H]: length * g
        lens = torch.full((n,), split, dtype=dtype, device=g.device)
        lens[-1] = T - (n - 1) * split
        sums = (lens[:, None] * g.to(dtype)[None, :])[:, None, :].expand(n, B, H)
    else:
        m = (n - 1) * split
        rest = g.shape[3:]
        full = g[:, :m].reshape(B, n - 1, split, H, *rest).sum(2, dtype=dtype)
        last = g[:, m:].sum(1, dtype=dtype).unsqueeze(1)
        sums = torch.cat([full, last], dim=1).transpose(0, 1)  # [n, B, H(, K)]
    if reverse:                                                 # the splits after each
        off = torch.cat([sums.flip(0).cumsum(0).flip(0)[1:], torch.zeros_like(sums[:1])], dim=0)
    else:                                                       # the splits before each
        off = torch.cat([torch.zeros_like(sums[:1]), sums.cumsum(0)[:-1]], dim=0)
    total = sums.sum(0)
    total = total.unsqueeze(-1).expand(B, H, K) if total.dim() == 2 else total
    return off.contiguous(), total


def weighted_outer_sum(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor | None = None, *,
                       reverse: bool = False, split: int | None = None):
    """sum_t exp(L_t) a_t^T b_t per sequence and head, L as the module docstring defines it.

    a: [B, T, H, K], b: [B, T, H, V], one dtype (float32, bfloat16, float16), any strides
    (a copy is made only when the last dim is not contiguous). g: None, [H], [B, T, H] or
    [B, T, H, K] log-decay (float32 or a's dtype). split: tokens per program (None: enough
    splits for PROGRAMS_PER_SM programs per SM; one on the CPU).

    Returns (out [B, H, K, V] float32, total [B, H, K] the sum of g over the sequence, float64
    for float32 inputs else float32; None without g).
    """
    B, T, H, K = a.shape
    V = b.shape[-1]
    if b.shape[:3] != a.shape[:3] or b.dtype != a.dtype:
        raise ValueError(f"b must be [B, T, H, V] with a's B, T, H {tuple(a.shape[:3])} and "
                         f"dtype {a.dtype}, got {tuple(b.shape)} {b.dtype}")
    kind = gate_of(g)
    if g is not None and tuple(g.shape) not in ((H,), (B, T, H), (B, T, H, K)):
        raise ValueError(f"g must be [H], [B, T, H] or [B, T, H, K] = {(B, T, H, K)}, got "
                         f"{tuple(g.shape)}")
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
    gdt = torch.float64 if a.dtype == torch.float32 else torch.float32
    off = total = None
    gp, sg = a, (0, 0, 0)
    if g is not None:
        off, total = _split_offsets(g, B, T, H, K, n_split, split, reverse, gdt)
        if g.dim() == 1:
            gp, sg = g.contiguous(), (0, 0, 1)
        else:
            gp = _last_dim_unit(g) if kind == GATE_KEY.value else g
            sg = (gp.stride(0), gp.stride(1), gp.stride(2))
    part = torch.empty(n_split, B * H, K, V, dtype=torch.float32, device=a.device)
    grid = (n_split, triton.cdiv(K, BK) * triton.cdiv(V, BV), B * H)
    outer_sum_kernel[grid](a, b, gp, a if off is None else off, part, T, H, K, V, split,
                           a.stride(0), a.stride(1), a.stride(2),
                           b.stride(0), b.stride(1), b.stride(2), *sg,
                           BT=BT, BK=BK, BV=BV, GATE=kind, REVERSE=bool(reverse),
                           IEEE=a.dtype == torch.float32,
                           num_warps=4, num_stages=1 if INTERPRET else 3)
    return part.sum(0).view(B, H, K, V), total
