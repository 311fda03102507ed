"""The short causal depthwise conv in Triton: forward (with SiLU fused), backward (dx, dweight,
dcache), dense [B, T, C] or packed (cu_seqlens), from an optional cache of W-1 inputs.

    z_t = sum_{j<W} w[:, j] * x_{t-(W-1-j)},   y_t = silu(z_t) (or z_t)

x_{t-s} before the start of t's sequence comes from that sequence's cache row (its last W-1
inputs, [N, W-1, C]) or is 0. Rows are addressed globally: row b*T + t (dense) or t (packed,
B == 1), and each row knows its sequence's first row S and one-past-last row E.

Backward in two passes: the first recomputes z from the W shifted input tiles, writes
dz = dy * silu'(z) (float32; without SiLU dz is dy and nothing is written) and, from the same
tiles, each row tile's share of dw[:, j] = sum_t dz_t x_{t-s_j} (summed by the launcher: no
atomics); the second reads dz at W shifts: dx_t = sum_j w_j dz_{t+s_j} over t + s_j < E, and
dcache is the same sum at the W-1 positions before S. (One pass that recomputed dz at every
shift read W^2 input tiles and spilled registers on sm_90.)

The ops are torch custom ops (linattn::short_conv_fwd / short_conv_bwd) so torch.compile
traces through them; linattn.ops.fused.short_conv is the entry point.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..alloc import empty

BLOCK_T = 32  # rows per program
BLOCK_C = 64  # channels per program
NUM_WARPS = 8  # 8 elements of a [BLOCK_T, BLOCK_C] tile per thread


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _ld_x(x, cache, u, S, n, mr, c, mc, C, W: tl.constexpr, HAS_CACHE: tl.constexpr):
    """x at global rows u [R] (int64) as float32 [R, BC]; rows before S come from cache row n
    (or are 0)."""
    inseq = u >= S
    # rows inside the sequence from x
    v = tl.load(x + u[:, None] * C + c[None, :], mask=(mr & inseq)[:, None] & mc[None, :],
                other=0.0).to(tl.float32)
    if HAS_CACHE:
        # rows before it from the cache: position u - S < 0 is cache slot W-1 + (u - S)
        crow = n * (W - 1) + (W - 1) + (u - S)
        v += tl.load(cache + crow[:, None] * C + c[None, :],
                     mask=(mr & (u < S) & (u >= S - (W - 1)))[:, None] & mc[None, :],
                     other=0.0).to(tl.float32)
    return v


@triton.jit
def _conv_z(x, cache, w, u, S, n, mr, c, mc, C, W: tl.constexpr, HAS_CACHE: tl.constexpr):
    """Pre-activation z at rows u: sum_j w[:, j] x_{u-(W-1-j)}, float32 [R, BC]."""
    acc = tl.zeros([u.shape[0], c.shape[0]], dtype=tl.float32)
    for j in tl.static_range(W):
        # tap j reads the input W-1-j rows back
        wj = tl.load(w + c * W + j, mask=mc, other=0.0).to(tl.float32)
        acc += wj[None, :] * _ld_x(x, cache, u - (W - 1 - j), S, n, mr, c, mc, C, W, HAS_CACHE)
    return acc


@triton.jit
def _seq_bounds(cu, seq_id, b, t, mr, T, VARLEN: tl.constexpr):
    """(n, S, E) of rows t: the sequence (cache row), its first and one-past-last global row."""
    if VARLEN:
        n = tl.load(seq_id + t, mask=mr, other=0).to(tl.int64)
        S = tl.load(cu + n, mask=mr, other=0).to(tl.int64)
        E = tl.load(cu + n + 1, mask=mr, other=0).to(tl.int64)
    else:
        n = b
        S = b * T
        E = S + T
    return n, S, E


@triton.jit
def short_conv_fwd_kernel(x, w, cache, y, cu, seq_id, T, C, W: tl.constexpr, BT: tl.constexpr,
                          BC: tl.constexpr, HAS_CACHE: tl.constexpr, VARLEN: tl.constexpr,
                          SILU: tl.constexpr):
    """One tile of BT rows x BC channels of batch b (grid cdiv(T, BT) x cdiv(C, BC) x B)."""
    tl.static_assert(BT >= 16)
    tl.static_assert(BC >= 16)
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    mr = t < T
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    # the rows' sequences
    n, S, E = _seq_bounds(cu, seq_id, b, t, mr, T, VARLEN)
    u = b * T + t
    # the conv, then the activation, rounded once
    z = _conv_z(x, cache, w, u, S, n, mr, c, mc, C, W, HAS_CACHE)
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y + u[:, None] * C + c[None, :], z.to(y.dtype.element_ty),
             mask=mr[:, None] & mc[None, :])


@triton.jit
def short_conv_dz_kernel(dy, x, w, cache, dz, dwp, cu, seq_id, T, C, NT, W: tl.constexpr,
                         BT: tl.constexpr, BC: tl.constexpr, HAS_CACHE: tl.constexpr,
                         VARLEN: tl.constexpr, SILU: tl.constexpr):
    """One tile: dz = dy * silu'(z) into dz (float32, SILU only; without SiLU dz is dy) and
    the tile's share of dw, dw[:, j] = sum_t dz_t x_{t - s_j}, into dwp[b * NT + tile]."""
    tl.static_assert(BT >= 16)
    tl.static_assert(BC >= 16)
    b = tl.program_id(2).to(tl.int64)
    it = tl.program_id(0).to(tl.int64)
    t = it * BT + tl.arange(0, BT)
    mr = t < T
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    n, S, E = _seq_bounds(cu, seq_id, b, t, mr, T, VARLEN)
    u = b * T + t
    m = mr[:, None] & mc[None, :]
    g = tl.load(dy + u[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
    if SILU:
        # recompute z, then dz = dy * silu'(z)
        z = _conv_z(x, cache, w, u, S, n, mr, c, mc, C, W, HAS_CACHE)
        sg = tl.sigmoid(z)
        g = g * sg * (1.0 + z * (1.0 - sg))
        tl.store(dz + u[:, None] * C + c[None, :], g, mask=m)
    # the tile's dw: the same shifted inputs the conv read
    base = (b * NT + it) * C * W
    for j in tl.static_range(W):
        xs = _ld_x(x, cache, u - (W - 1 - j), S, n, mr, c, mc, C, W, HAS_CACHE)
        tl.store(dwp + base + c * W + j, tl.sum(g * xs, axis=0), mask=mc)


@triton.jit
def _dx_rows(dz, w, v0, S, E, mr, c, mc, C, W: tl.constexpr):
    """sum_j w[:, j] dz_{v0 + s_j} over v0 + s_j in [S, E): the cotangent of the inputs at
    rows v0 (float32 [R, BC])."""
    acc = tl.zeros([v0.shape[0], c.shape[0]], dtype=tl.float32)
    for j in tl.static_range(W):
        # tap j of output row v read input row v - (W-1-j)
        wj = tl.load(w + c * W + j, mask=mc, other=0.0).to(tl.float32)
        v = v0 + (W - 1 - j)
        ok = mr & (v >= S) & (v < E)
        acc += wj[None, :] * tl.load(dz + v[:, None] * C + c[None, :],
                                     mask=ok[:, None] & mc[None, :], other=0.0).to(tl.float32)
    return acc


@triton.jit
def short_conv_dx_kernel(dz, w, dx, cu, seq_id, T, C, W: tl.constexpr, BT: tl.constexpr,
                         BC: tl.constexpr, VARLEN: tl.constexpr):
    """dx of one tile from dz (float32 with SiLU, else dy)."""
    tl.static_assert(BT >= 16)
    tl.static_assert(BC >= 16)
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    mr = t < T
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    n, S, E = _seq_bounds(cu, seq_id, b, t, mr, T, VARLEN)
    u = b * T + t
    acc = _dx_rows(dz, w, u, S, E, mr, c, mc, C, W)
    tl.store(dx + u[:, None] * C + c[None, :], acc.to(dx.dtype.element_ty),
             mask=mr[:, None] & mc[None, :])


@triton.jit
def short_conv_dcache_kernel(dz, w, dcache, cu, T, C, W: tl.constexpr, WP: tl.constexpr,
                             BC: tl.constexpr, VARLEN: tl.constexpr):
    """dcache of sequence n (grid N x cdiv(C, BC)): dx's sum at the W-1 positions before S."""
    tl.static_assert(WP >= 16)
    tl.static_assert(BC >= 16)
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    r = tl.arange(0, WP)
    mr = r < W - 1
    # the sequence's bounds
    if VARLEN:
        S = tl.load(cu + n).to(tl.int64)
        E = tl.load(cu + n + 1).to(tl.int64)
    else:
        S = n * T
        E = S + T
    acc = _dx_rows(dz, w, S - (W - 1) + r, S, E, mr, c, mc, C, W)
    tl.store(dcache + (n * (W - 1) + r)[:, None] * C + c[None, :],
             acc.to(dcache.dtype.element_ty), mask=mr[:, None] & mc[None, :])


# ----------------------------------------------------------------------------- launchers

def _seq_table(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """seq_id [T] int32: the packed sequence each row belongs to (empty sequences skipped)."""
    rows = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), rows, right=True).to(torch.int32)


def _launch_fwd(x, weight, cache, cu_seqlens, silu):
    B, T, C = x.shape
    W = weight.shape[1]
    x, weight = x.contiguous(), weight.contiguous()
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    has_cache = cache is not None and W > 1
    varlen = cu_seqlens is not None
    seq_id = _seq_table(cu_seqlens, T) if varlen else x
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(C, BLOCK_C), B)
    if T and C:
        short_conv_fwd_kernel[grid](
            x, weight, cache.contiguous() if has_cache else x, y,
            cu_seqlens if varlen else x, seq_id, T, C, W=W, BT=BLOCK_T, BC=BLOCK_C,
            HAS_CACHE=has_cache, VARLEN=varlen, SILU=silu, num_warps=NUM_WARPS)
    return y


def _launch_bwd(dy, x, weight, cache, cu_seqlens, silu):
    B, T, C = x.shape
    W = weight.shape[1]
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    has_cache = cache is not None and W > 1
    varlen = cu_seqlens is not None
    seq_id = _seq_table(cu_seqlens, T) if varlen else x
    cu = cu_seqlens if varlen else x
    NT = triton.cdiv(T, BLOCK_T)
    grid = (NT, triton.cdiv(C, BLOCK_C), B)
    dz = empty(x.shape, dtype=torch.float32, device=x.device) if silu else dy
    dwp = empty(B * NT, C, W, dtype=torch.float32, device=x.device)
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    if T and C:
        short_conv_dz_kernel[grid](
            dy, x, weight, cache.contiguous() if has_cache else x, dz, dwp, cu, seq_id, T, C,
            NT, W=W, BT=BLOCK_T, BC=BLOCK_C, HAS_CACHE=has_cache, VARLEN=varlen, SILU=silu,
            num_warps=NUM_WARPS)
        short_conv_dx_kernel[grid](dz, weight, dx, cu, seq_id, T, C, W=W, BT=BLOCK_T,
                                   BC=BLOCK_C, VARLEN=varlen, num_warps=NUM_WARPS)
    dw = dwp.sum(0).to(weight.dtype)                                # [C, W]
    if cache is None:
        return dx, dw, x.new_empty(0)
    dcache = empty(cache.shape, dtype=cache.dtype, device=x.device)
    if has_cache and cache.shape[0] and C:
        short_conv_dcache_kernel[(cache.shape[0], triton.cdiv(C, BLOCK_C))](
            dz, weight, dcache, cu, T, C, W=W, WP=max(16, triton.next_power_of_2(W - 1)),
            BC=BLOCK_C, VARLEN=varlen)
    return dx, dw, dcache


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("linattn::short_conv_fwd", mutates_args=())
def short_conv_fwd(x: torch.Tensor, weight: torch.Tensor, cache: Optional[torch.Tensor],
                   cu_seqlens: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    """y [B, T, C] in x's dtype. x [B, T, C]; weight [C, W]; cache [B or N, W-1, C] or None;
    cu_seqlens int32/int64 [N+1] (B == 1) or None."""
    return _launch_fwd(x, weight, cache, cu_seqlens, silu)


@short_conv_fwd.register_fake
def _(x, weight, cache, cu_seqlens, silu):
    return torch.empty_like(x)


@torch.library.custom_op("linattn::short_conv_bwd", mutates_args=())
def short_conv_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   cache: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                   silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, dweight like weight, dcache like cache, or an empty tensor without one)."""
    return _launch_bwd(dy, x, weight, cache, cu_seqlens, silu)


@short_conv_bwd.register_fake
def _(dy, x, weight, cache, cu_seqlens, silu):
    return (torch.empty_like(x), torch.empty_like(weight),
            torch.empty_like(cache) if cache is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, cache, cu_seqlens, silu = inputs
    ctx.save_for_backward(x, weight, cache, cu_seqlens)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, cache, cu_seqlens = ctx.saved_tensors
    dx, dw, dcache = short_conv_bwd(dy, x, weight, cache, cu_seqlens, ctx.silu)
    return dx, dw, (dcache if cache is not None else None), None, None


short_conv_fwd.register_autograd(_backward, setup_context=_setup)
