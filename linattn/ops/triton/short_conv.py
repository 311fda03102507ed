"""The short causal depthwise conv in Triton: forward (with SiLU fused), backward (dx, dweight,
dcache), dense [B, T, C] or packed (cu_seqlens), from an optional cache of W-1 inputs.

    z_t = sum_{j<W} w[:, j] * x_{t-(W-1-j)},   y_t = silu(z_t) (or z_t)

x_{t-s} before the start of t's sequence comes from that sequence's cache row (its last W-1
inputs, [N, W-1, C]) or is 0. Rows are addressed globally: row b*T + t (dense) or t (packed,
B == 1), and each row knows its sequence's first row S and one-past-last row E.

The forward walks TILES_PER_PROGRAM [BLOCK_T, BLOCK_C] row tiles of one channel block
(channel-contiguous, coalesced loads), the loop pipelined. The backward, with
s_j = W-1-j and dz = dy * silu'(z) (dz = dy without SiLU),

    dx_t = sum_j w[:, j] dz_{t+s_j}  over t + s_j < E,     dw[:, j] = sum_t dz_t x_{t-s_j},

runs in two passes of BWD_ROWS rows a program:
  1. per row tile, the W shifted input tiles x_{t-s_j} loaded once give z, then dz (stored in
     the input dtype) and the tile's dw terms from the same tiles; a program keeps its dw in
     float32 registers and the launcher sums the programs' partials (no atomics:
     deterministic);
  2. per row tile, dx from the W later shifts of dz within each row's sequence; dcache (the
     cotangent of the W-1 positions before S) the same sum at those positions, a program per
     sequence.
HBM traffic: x and dy read, dz written and read, dx written, once each.

Fused L2 norm (norm_channels NC > 0, groups of G channels, G a power of two in [16, 256]):
the output channels c < NC are L2-normalised per group after the activation,

    s = silu(z),  n = max(||s||, eps),  y = s / n          (eps = CONV_NORM_EPS)
    ds = (dy - y <dy, y>) / n  where ||s|| > eps,  ds = dy / eps where clamped,
    dz = ds * silu'(z),

and channels c >= NC are the plain conv. The forward and pass 1 (dz at a row needs its whole
group's z) then run as two launches over channel ranges: [0, NC) in tiles of BC = G channels
(NORMED; a tile holds whole groups, so the norms are row sums inside it) and [NC, C) in tiles
of BLOCK_C as without the norm. Pass 2 and dcache, past the norm, take every channel at once.

The ops are torch custom ops (linattn::short_conv_fwd / short_conv_bwd) so torch.compile
traces through them; linattn.ops.fused.short_conv is the entry point.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..alloc import empty
from ..fused import CONV_NORM_EPS, check_conv_norm

BLOCK_T = 16            # rows per forward tile and per group tile of the backward's pass 1
BLOCK_C = 64            # channels per tile (128 contiguous bytes of a 16-bit row)
NUM_WARPS = 8           # 4 elements of a [BLOCK_T, BLOCK_C] tile per thread
# warps of a group tile [BLOCK_T, G] by G (the fused norm's group sizes): 4 elements a thread
# as the forward's plain tile up to G 128; G 256 at 8 warps of 255 registers spills least
# (benchmarks/sm90_compile_check.py)
GROUP_WARPS = {16: 2, 32: 4, 64: 8, 128: 16, 256: 8}
NORM_GROUPS = tuple(GROUP_WARPS)
PLAIN_TILE_BYTES = BLOCK_T * BLOCK_C * 4  # a float32 plain tile: the largest tile whose loop
                                          # is pipelined
TILES_PER_PROGRAM = 16  # row tiles one forward program walks
LOOP_STAGES = 2         # the forward's row-tile loop loads one tile ahead
# The backward's loops are latency-bound streams: each program keeps STAGES-1 row tiles in
# flight (sm_90 at bf16, benchmarks/sm90_compile_check.py). A plain tile holds
# PLAIN_TILE_BYTES (32 rows at 16 bits, 16 at 32); a group tile BLOCK_T rows.
BWD_STAGES = 4          # plain tiles: pass 1 128 registers, 62 KB shared memory, 2 programs
                        # per SM; pass 2 64 registers, 48 KB, 4 per SM
NORM_BWD_STAGES = 3     # a group tile's pass 1 (G 128: 109 registers, 48 KB; 4 stages spill
                        # at G 64), pipelined within PLAIN_TILE_BYTES
BWD_ROWS = 256          # rows one backward program walks, in whole tiles (a pass-1 dw
                        # partial covers them)
assert BWD_ROWS % BLOCK_T == 0 and BWD_ROWS % (PLAIN_TILE_BYTES // (2 * BLOCK_C)) == 0


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _cols(C0, C1, BC: tl.constexpr):
    """This program's channels c [BC] of the launch's range [C0, C1) and their mask."""
    tl.static_assert(BC >= 16)
    c = C0 + tl.program_id(1) * BC + tl.arange(0, BC)
    return c, c < C1


@triton.jit
def _rows(cu, seq_id, b, it, T, BT: tl.constexpr, VARLEN: tl.constexpr):
    """Row tile `it` of batch b: (global rows u [BT] int64, mask, sequence n, first row S,
    one-past-last row E) of each row."""
    tl.static_assert(BT >= 16)
    t = it * BT + tl.arange(0, BT).to(tl.int64)
    mr = t < T
    if VARLEN:
        # packed: the row's sequence from the table, its bounds from cu_seqlens
        n = tl.load(seq_id + t, mask=mr, other=0).to(tl.int64)
        S = tl.load(cu + n, mask=mr, other=0).to(tl.int64)
        E = tl.load(cu + n + 1, mask=mr, other=0).to(tl.int64)
    else:
        # dense: batch b is the sequence
        n = b
        S = b * T
        E = S + T
    return b * T + t, mr, n, S, E


@triton.jit
def _taps(w, c, mc, W: tl.constexpr):
    """The W taps w[c, j] of the channels c, a tuple of float32 [BC]."""
    wt = ()
    for j in tl.static_range(W):
        wt = wt + (tl.load(w + c * W + j, mask=mc, other=0.0).to(tl.float32),)
    return wt


@triton.jit
def _ld_x(x, cache, u, S, n, mr, c, mc, C, SX, W: tl.constexpr, HAS_CACHE: tl.constexpr):
    """x (rows SX elements apart) at global rows u [R] (int64) as float32 [R, BC]; rows
    before S come from cache row n (or are 0)."""
    inseq = u >= S
    # rows inside the sequence from x
    v = tl.load(x + u[:, None] * SX + c[None, :], mask=(mr & inseq)[:, None] & mc[None, :],
                other=0.0).to(tl.float32)
    if HAS_CACHE:
        # rows before it from the cache: position u - S < 0 is cache slot W-1 + (u - S)
        crow = n * (W - 1) + (W - 1) + (u - S)
        v += tl.load(cache + crow[:, None] * C + c[None, :],
                     mask=(mr & (u < S) & (u >= S - (W - 1)))[:, None] & mc[None, :],
                     other=0.0).to(tl.float32)
    return v


@triton.jit
def _conv(x, cache, wt, u, S, n, mr, c, mc, C, SX, W: tl.constexpr, HAS_CACHE: tl.constexpr):
    """(z, xs) at rows u: z = sum_j w[:, j] x_{u-(W-1-j)} float32 [R, BC], and the tuple of
    the W shifted input tiles xs[j] = x_{u-(W-1-j)} it read."""
    z = tl.zeros([u.shape[0], c.shape[0]], dtype=tl.float32)
    xs = ()
    for j in tl.static_range(W):
        # tap j reads the input W-1-j rows back
        xj = _ld_x(x, cache, u - (W - 1 - j), S, n, mr, c, mc, C, SX, W, HAS_CACHE)
        z += wt[j][None, :] * xj
        xs = xs + (xj,)
    return z, xs


@triton.jit
def _l2(s, EPS: tl.constexpr):
    """Each row's max(||s||, EPS) over the tile's channels (one group), float32 [R]."""
    return tl.maximum(tl.sqrt(tl.sum(s * s, axis=1)), EPS)


@triton.jit
def _dz(g, z, SILU: tl.constexpr, NORMED: tl.constexpr, EPS: tl.constexpr):
    """dz from dy = g and z (float32 [R, BC]): through the group's L2 norm when NORMED, times
    silu'(z) with SiLU."""
    if SILU or NORMED:
        sg = tl.sigmoid(z)
        if NORMED:
            # the norm's backward: ds = (dy - y <dy, y>) / n, the projection off where clamped
            s = z * sg if SILU else z
            nrm = _l2(s, EPS)
            y = s / nrm[:, None]
            gy = tl.where(nrm > EPS, tl.sum(g * y, axis=1), 0.0)
            g = (g - y * gy[:, None]) / nrm[:, None]
        if SILU:
            # silu'(z) = s (1 + z (1 - s))
            g = g * sg * (1.0 + z * (1.0 - sg))
    return g


@triton.jit
def _dx(dz, wt, v0, mr, S, E, c, mc, C, W: tl.constexpr):
    """sum_j w[:, j] dz_{v0 + W-1-j} over output rows in [S, E): the cotangent the outputs
    send to the inputs at rows v0 (float32 [R, BC])."""
    acc = tl.zeros([v0.shape[0], c.shape[0]], dtype=tl.float32)
    for j in tl.static_range(W):
        # output row v read input row v0 through tap j
        v = v0 + (W - 1 - j)
        ok = mr & (v >= S) & (v < E)
        acc += wt[j][None, :] * tl.load(dz + v[:, None] * C + c[None, :],
                                        mask=ok[:, None] & mc[None, :], other=0.0).to(tl.float32)
    return acc


@triton.jit
def _check_group(BC: tl.constexpr, NORMED: tl.constexpr):
    """A normalised launch's tile spans one group: G a power of two in [16, 256]."""
    if NORMED:
        tl.static_assert((BC & (BC - 1)) == 0)
        tl.static_assert(BC >= 16 and BC <= 256)


@triton.jit
def short_conv_fwd_kernel(x, w, cache, y, cu, seq_id, T, C, SX, C0, C1, W: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr, STEPS: tl.constexpr,
                          STAGES: tl.constexpr, HAS_CACHE: tl.constexpr, VARLEN: tl.constexpr,
                          SILU: tl.constexpr, NORMED: tl.constexpr, EPS: tl.constexpr):
    """Row tiles pid*STEPS ... pid*STEPS + STEPS-1 of BT rows x BC channels (of [C0, C1)) of
    batch b (grid cdiv(cdiv(T, BT), STEPS) x cdiv(C1 - C0, BC) x B), the loop on STAGES
    pipeline stages. NORMED: BC is the group size and each row's tile is L2-normalised. x's
    rows are SX elements apart (a view of a wider row), the other tensors' C."""
    _check_group(BC, NORMED)
    b = tl.program_id(2).to(tl.int64)
    c, mc = _cols(C0, C1, BC)
    wt = _taps(w, c, mc, W)
    it0 = tl.program_id(0) * STEPS
    for it in tl.range(it0, tl.minimum(it0 + STEPS, tl.cdiv(T, BT)), num_stages=STAGES):
        u, mr, n, S, E = _rows(cu, seq_id, b, it, T, BT, VARLEN)
        # the conv, then the activation
        z, _ = _conv(x, cache, wt, u, S, n, mr, c, mc, C, SX, W, HAS_CACHE)
        if SILU:
            z = z * tl.sigmoid(z)
        if NORMED:
            # each row's group over its norm (masked rows are 0 and stay 0)
            z = z / _l2(z, EPS)[:, None]
        # rounded once
        tl.store(y + u[:, None] * C + c[None, :], z.to(y.dtype.element_ty),
                 mask=mr[:, None] & mc[None, :])


@triton.jit
def short_conv_dz_kernel(dy, x, w, cache, dz, dwp, cu, seq_id, T, C, SX, C0, C1, NP,
                         W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         STEPS: tl.constexpr, STAGES: tl.constexpr, HAS_CACHE: tl.constexpr,
                         VARLEN: tl.constexpr, SILU: tl.constexpr, NORMED: tl.constexpr,
                         EPS: tl.constexpr):
    """Backward pass 1: dz of row tiles pid*STEPS ... pid*STEPS + STEPS-1 of channel block
    pid1 (of [C0, C1)), batch b (grid NP x cdiv(C1 - C0, BC) x B), and their dw[c, j] into
    dwp[b * NP + pid, c, j] (float32). The tile loop runs on STAGES pipeline stages. NORMED:
    BC is the group size and dz goes through each row's L2 norm. x's rows are SX elements
    apart, the other tensors' C."""
    tl.static_assert(WP >= W)
    _check_group(BC, NORMED)
    b = tl.program_id(2).to(tl.int64)
    c, mc = _cols(C0, C1, BC)
    wt = _taps(w, c, mc, W)
    jw = tl.arange(0, WP)
    # the W float32 dw partials, one [BT, BC] tile of row terms per tap: the sum over rows
    # (a reduction across warps) runs once per program, not once per tile
    acc = ()
    for j in tl.static_range(W):
        acc = acc + (tl.zeros([BT, BC], dtype=tl.float32),)
    it0 = tl.program_id(0) * STEPS
    for it in tl.range(it0, tl.minimum(it0 + STEPS, tl.cdiv(T, BT)), num_stages=STAGES):
        u, mr, n, S, E = _rows(cu, seq_id, b, it, T, BT, VARLEN)
        m = mr[:, None] & mc[None, :]
        # z from the W shifted input tiles, each loaded once
        z, xs = _conv(x, cache, wt, u, S, n, mr, c, mc, C, SX, W, HAS_CACHE)
        # dz: dy through the norm and silu'(z), stored for pass 2
        g = tl.load(dy + u[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
        g = _dz(g, z, SILU, NORMED, EPS)
        tl.store(dz + u[:, None] * C + c[None, :], g.to(dz.dtype.element_ty), mask=m)
        # dw[:, j] terms dz_t x_{t-(W-1-j)}, from the same input tiles
        nxt = ()
        for j in tl.static_range(W):
            nxt = nxt + (acc[j] + g * xs[j],)
        acc = nxt
    # dw [WP, BC]: each tap's terms summed over the rows
    dw = tl.zeros([WP, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        dw += tl.where(jw[:, None] == j, tl.sum(acc[j], axis=0)[None, :], 0.0)
    # the partial of this program, [W, BC] of row b * NP + pid of dwp [B * NP, C, W]
    base = (b * NP + tl.program_id(0)) * C * W
    tl.store(dwp + base + c[None, :] * W + jw[:, None], dw,
             mask=(jw < W)[:, None] & mc[None, :])


@triton.jit
def short_conv_dx_kernel(dz, w, dx, cu, seq_id, T, C, W: tl.constexpr, BT: tl.constexpr,
                         BC: tl.constexpr, STEPS: tl.constexpr, STAGES: tl.constexpr,
                         VARLEN: tl.constexpr):
    """Backward pass 2: dx of row tiles pid*STEPS ... pid*STEPS + STEPS-1 of channel block
    pid1, batch b (grid cdiv(cdiv(T, BT), STEPS) x cdiv(C, BC) x B), from dz at the W later
    shifts within each row's sequence; the loop on STAGES pipeline stages."""
    b = tl.program_id(2).to(tl.int64)
    c, mc = _cols(0, C, BC)
    wt = _taps(w, c, mc, W)
    it0 = tl.program_id(0) * STEPS
    for it in tl.range(it0, tl.minimum(it0 + STEPS, tl.cdiv(T, BT)), num_stages=STAGES):
        u, mr, n, S, E = _rows(cu, seq_id, b, it, T, BT, VARLEN)
        # dx_t = sum_j w[:, j] dz_{t+W-1-j} over the later rows of t's sequence
        acc = _dx(dz, wt, u, mr, S, E, c, mc, C, W)
        tl.store(dx + u[:, None] * C + c[None, :], acc.to(dx.dtype.element_ty),
                 mask=mr[:, None] & mc[None, :])


@triton.jit
def short_conv_dcache_kernel(dz, w, dcache, cu, T, C, W: tl.constexpr, WP: tl.constexpr,
                             BC: tl.constexpr, VARLEN: tl.constexpr):
    """dcache of sequence n (grid N x cdiv(C, BC)): dx at the W-1 positions before S, from
    dz at the sequence's first rows."""
    tl.static_assert(WP >= 16)
    n = tl.program_id(0).to(tl.int64)
    c, mc = _cols(0, C, BC)
    r = tl.arange(0, WP)
    mr = r < W - 1
    # the sequence's bounds
    if VARLEN:
        S = tl.load(cu + n).to(tl.int64)
        E = tl.load(cu + n + 1).to(tl.int64)
    else:
        S = n * T
        E = S + T
    # the cache slots are rows S-(W-1) ... S-1: only dz at rows >= S reaches them
    acc = _dx(dz, _taps(w, c, mc, W), S - (W - 1) + r, mr, S, E, c, mc, C, W)
    tl.store(dcache + (n * (W - 1) + r)[:, None] * C + c[None, :],
             acc.to(dcache.dtype.element_ty), mask=mr[:, None] & mc[None, :])


# ----------------------------------------------------------------------------- launchers

def _seq_table(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """seq_id [T] int32: the packed sequence each row belongs to (empty sequences skipped)."""
    rows = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), rows, right=True).to(torch.int32)


def _segments(C: int, norm_channels: int, norm_group: int, itemsize: int):
    """The launches over the channels, (C0, C1, BC, warps, forward stages, normalised) each:
    [0, NC) in tiles of one group G when NC > 0, then [NC, C) in tiles of BLOCK_C; empty
    ranges left out. A group tile gets GROUP_WARPS[G] warps, and its forward loop is
    pipelined while the tile's bytes stay within PLAIN_TILE_BYTES."""
    check_conv_norm(norm_channels, norm_group, C)
    if norm_channels and norm_group not in NORM_GROUPS:
        raise ValueError(f"the fused conv norm takes groups G in {NORM_GROUPS}, got G={norm_group}")
    warps = GROUP_WARPS.get(norm_group, NUM_WARPS)
    stages = LOOP_STAGES if BLOCK_T * norm_group * itemsize <= PLAIN_TILE_BYTES else 1
    segs = [(0, norm_channels, norm_group, warps, stages, True),
            (norm_channels, C, BLOCK_C, NUM_WARPS, LOOP_STAGES, False)]
    return [sg for sg in segs if sg[1] > sg[0]]


def _row_view(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x [B, T, C] as the kernels read it, its row stride SX): rows u = b T + t at u * SX
    with unit channel stride. x itself when its rows are so (contiguous, or a channel slice of
    a wider [B, T, C'] such as one projection's columns of a fused GEMM's output), else a
    contiguous copy (SX = C)."""
    B, T, C = x.shape
    sx = x.stride(1) if T > 1 else (x.stride(0) if B > 1 else C)
    if x.stride(2) == 1 and sx >= C and (B == 1 or x.stride(0) == T * sx):
        return x, sx
    return x.contiguous(), C


def _launch_fwd(x, weight, cache, cu_seqlens, silu, norm_channels, norm_group):
    B, T, C = x.shape
    W = weight.shape[1]
    segs = _segments(C, norm_channels, norm_group, x.element_size())
    (x, sx), weight = _row_view(x), weight.contiguous()
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    has_cache = cache is not None and W > 1
    varlen = cu_seqlens is not None
    seq_id = _seq_table(cu_seqlens, T) if varlen else x
    cache_arg = cache.contiguous() if has_cache else x
    NP = triton.cdiv(triton.cdiv(T, BLOCK_T), TILES_PER_PROGRAM)
    for C0, C1, BC, warps, stages, normed in (segs if T else []):
        short_conv_fwd_kernel[(NP, triton.cdiv(C1 - C0, BC), B)](
            x, weight, cache_arg, y,
            cu_seqlens if varlen else x, seq_id, T, C, sx, C0, C1, W=W, BT=BLOCK_T, BC=BC,
            STEPS=TILES_PER_PROGRAM, STAGES=stages, HAS_CACHE=has_cache, VARLEN=varlen,
            SILU=silu, NORMED=normed, EPS=CONV_NORM_EPS, num_warps=warps)
    return y


def _launch_bwd(dy, x, weight, cache, cu_seqlens, silu, norm_channels, norm_group):
    B, T, C = x.shape
    W = weight.shape[1]
    segs = _segments(C, norm_channels, norm_group, x.element_size())
    (x, sx), dy, weight = _row_view(x), dy.contiguous(), weight.contiguous()
    has_cache = cache is not None and W > 1
    varlen = cu_seqlens is not None
    seq_id = _seq_table(cu_seqlens, T) if varlen else x
    cu = cu_seqlens if varlen else x
    cache_arg = cache.contiguous() if has_cache else x
    NP = triton.cdiv(T, BWD_ROWS)
    dwp = empty(B * NP, C, W, dtype=torch.float32, device=x.device)
    # dz between the passes in the input dtype: its rounding stays within the tolerance rule
    # (tests/ops/test_fused.py, bfloat16) and pass 2 reads half the bytes
    dz = empty(x.shape, dtype=x.dtype, device=x.device)
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    plain_bt = PLAIN_TILE_BYTES // (BLOCK_C * x.element_size())    # rows of a plain tile
    # pass 1: dz and the dw partials, per channel range (group tiles of BLOCK_T rows)
    for C0, C1, BC, warps, _, normed in (segs if T else []):
        if normed:
            BT = BLOCK_T
            stages = NORM_BWD_STAGES if BT * BC * x.element_size() <= PLAIN_TILE_BYTES else 1
        else:
            BT, stages = plain_bt, BWD_STAGES
        short_conv_dz_kernel[(NP, triton.cdiv(C1 - C0, BC), B)](
            dy, x, weight, cache_arg, dz, dwp, cu, seq_id, T, C, sx,
            C0, C1, NP, W=W, WP=triton.next_power_of_2(W), BT=BT, BC=BC,
            STEPS=BWD_ROWS // BT, STAGES=stages, HAS_CACHE=has_cache, VARLEN=varlen,
            SILU=silu, NORMED=normed, EPS=CONV_NORM_EPS, num_warps=warps)
    # pass 2: dx from dz over every channel, in plain tiles
    if T:
        short_conv_dx_kernel[(NP, triton.cdiv(C, BLOCK_C), B)](
            dz, weight, dx, cu, seq_id, T, C, W=W, BT=plain_bt, BC=BLOCK_C,
            STEPS=BWD_ROWS // plain_bt, STAGES=BWD_STAGES, VARLEN=varlen, num_warps=NUM_WARPS)
    dw = dwp.sum(0).to(weight.dtype)                                # [C, W]
    if cache is None:
        return dx, dw, x.new_empty(0)
    dcache = empty(cache.shape, dtype=cache.dtype, device=x.device)
    if has_cache and cache.shape[0]:
        short_conv_dcache_kernel[(cache.shape[0], triton.cdiv(C, BLOCK_C))](
            dz, weight, dcache, cu, T, C, W=W, WP=max(16, triton.next_power_of_2(W - 1)),
            BC=BLOCK_C, VARLEN=varlen)
    return dx, dw, dcache


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("linattn::short_conv_fwd", mutates_args=())
def short_conv_fwd(x: torch.Tensor, weight: torch.Tensor, cache: Optional[torch.Tensor],
                   cu_seqlens: Optional[torch.Tensor], silu: bool, norm_channels: int,
                   norm_group: int) -> torch.Tensor:
    """y [B, T, C] in x's dtype. x [B, T, C]; weight [C, W]; cache [B or N, W-1, C] or None;
    cu_seqlens int32/int64 [N+1] (B == 1) or None; the first norm_channels output channels
    L2-normalised in groups of norm_group (a power of two in [16, 256]; 0: none)."""
    return _launch_fwd(x, weight, cache, cu_seqlens, silu, norm_channels, norm_group)


@short_conv_fwd.register_fake
def _(x, weight, cache, cu_seqlens, silu, norm_channels, norm_group):
    return torch.empty_like(x)


@torch.library.custom_op("linattn::short_conv_bwd", mutates_args=())
def short_conv_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   cache: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                   silu: bool, norm_channels: int,
                   norm_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, dweight like weight, dcache like cache, or an empty tensor without one)."""
    return _launch_bwd(dy, x, weight, cache, cu_seqlens, silu, norm_channels, norm_group)


@short_conv_bwd.register_fake
def _(dy, x, weight, cache, cu_seqlens, silu, norm_channels, norm_group):
    return (torch.empty_like(x), torch.empty_like(weight),
            torch.empty_like(cache) if cache is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, cache, cu_seqlens, silu, norm_channels, norm_group = inputs
    ctx.save_for_backward(x, weight, cache, cu_seqlens)
    ctx.silu, ctx.norm_channels, ctx.norm_group = silu, norm_channels, norm_group


def _backward(ctx, dy):
    x, weight, cache, cu_seqlens = ctx.saved_tensors
    dx, dw, dcache = short_conv_bwd(dy, x, weight, cache, cu_seqlens, ctx.silu,
                                    ctx.norm_channels, ctx.norm_group)
    return dx, dw, (dcache if cache is not None else None), None, None, None, None


short_conv_fwd.register_autograd(_backward, setup_context=_setup)
