"""Delta-rule forward kernels (DeltaNet, Gated DeltaNet): the chunkwise WY/UT form.

Per chunk of BT = 64 tokens, b the inclusive cumsum of the log-decay g inside the chunk and
Gamma_ij = exp(b_i - b_j) (all ones when ungated), docs/design.md section 4:

    A  = tril(diag(beta) (K K^T * Gamma), -1),   T = (I + A)^-1
    W  = T diag(beta exp(b)) K,   U = T diag(beta) V,   U' = U - W S
       = T diag(beta) (V - exp(b) * (K S))                (the form the scan computes)
    O  = scale ((Q * exp(b)) S + (tril(Q K^T) * Gamma) U')
    S <- exp(b_L) S + (K * exp(b_L - b))^T U'

W and U are never stored: the scan forms U' from T, K and V, which it reads anyway, and the
reverse scan forms W^T dU' as K^T (beta exp(b) * (T^T dU')). Against storing W (float32) and
U, that is 0.75 GiB less written and read per fwd+bwd at B*T 65536, H 16, D 128 and one
kernel less, for one [BT, BT] x [BT, BV] dot more per step.

Two kernels and one borrowed (delta_api keeps U', b, T and the states for the backward,
or the backward reruns prep and scan):
  delta_prep_kernel    per (chunk, head): b, T (blocked forward substitution on 16x16
                       blocks).
  delta_scan_kernel    per (sequence, head, V tile): the sequential float32 state scan; writes
                       the state at each chunk start and U'. K S contracts over all of K, so
                       K is never split across programs; V is tiled.
  output               O is gated linear attention with values U' and the chunk-start states:
                       the gated family's gated_fwd.fwd_o_kernel (no gate, or the scalar gate
                       with b), on the chunk = tile = BT layout. One output kernel for both
                       families (docs/design.md: one recurrence, many gates).

Every token tensor is addressed as packed [TT, H, D] (B sequences of T tokens are the packed
case with cu_seqlens = [0, T, 2T, ...]); chunks are the tiles of the gated family's layout with
chunk = tile = BT (delta_api.chunk_layout), enumerated by its (tile_seq, tile_idx) tables,
and the chunk states h take its slots: chunk c of sequence n at c0 + n + c, one slot per
sequence after its last chunk (unused here: the final state has its own buffer).
Batch/head offsets are int64; every load and store is masked (common's loaders).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import alloc
from .common import (GATE_SCALAR, dot_a16, exp, fill_v_block, gate_of, head_tile, ld_raw,
                     next_pow2, sm_count, st_tile)
from .delta_config import DEFAULT, DeltaConfig, split16_on
from .gated_api import KernelConfig
from .gated_fwd import fwd_o

BT = 64  # chunk length: the UT transform's block
BC = 16  # diagonal sub-block of the forward substitution

# Launch choices come from a DeltaConfig argument (delta_config.DEFAULT): prep on 2 warps and
# 1 stage, the scan on 4 warps and 2 stages at K <= 128, the output on 4 warps and 3 stages
# and 128-wide V tiles for 16-bit inputs (q K^T formed once per chunk instead of twice; they
# fit sm_90's registers once U' and h are 16-bit; float32 inputs keep 64). PERF_NOTES "Delta
# rule: launch choices".


def state_dtype(dtype: torch.dtype, cfg: DeltaConfig = DEFAULT) -> torch.dtype:
    """dtype of the stored chunk states h for inputs of this dtype: the inputs' for 16-bit
    inputs (the scan carries S in float32; the output and grads_qk read h), which halves the
    largest buffer the forward keeps for the backward; benchmarks/delta_lowp_probe.py checks
    the precision against the tests' rule (PERF_NOTES "Delta rule: 16-bit intermediates")."""
    return dtype if cfg.states_in_input_dtype and dtype != torch.float32 else torch.float32


def vnew_dtype(dtype: torch.dtype, cfg: DeltaConfig = DEFAULT) -> torch.dtype:
    """dtype of the stored U' for inputs of this dtype: the inputs' for 16-bit inputs, as fla
    stores it (the output kernel and grads_qk read it with 16-bit dot operands; the scan's
    state update uses the float32 U')."""
    return dtype if cfg.vnew_in_input_dtype and dtype != torch.float32 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for float32 x float32 dots: exact for float32 inputs; tf32 for
    bfloat16 (whose hot dots take 16-bit operands instead: common.dot_a16); tf32x3 (three
    tf32 products, float32's accuracy) for float16, whose final state exceeds the tests'
    bound with plain tf32 at K = V = 128 (PERF_NOTES "Compiler faults and precision
    guards")."""
    if dtype == torch.float32:
        return "ieee"
    return "tf32x3" if dtype == torch.float16 else "tf32"


def gate_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the chunk-local log-decay cumsums b (gc) for inputs of this dtype, as the
    gated family's (gated_api.gate_dtype): float64 for float32 inputs, float32 for 16-bit
    ones. A float32 b_t holds only eps * |b_t|, and |b_t| reaches ~32 at the end of a 64-token
    chunk of log-decays in [-1, 0], so every exp(b_i - b_j) would carry a relative 1e-6 (on
    sm_90, whose parallel scan rounds each b_t apart, enough to put a 63-token final state
    near 2x the tests' bound); the kernels take differences of float64 b and round them to
    float32 before gate_exp."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def full_tile(d: int) -> int:
    """A tile spanning the whole head dim (the scan's K side): the next power of two >= 16."""
    return max(16, next_pow2(d))


# The forward scan's K S and K^T U' take 16-bit operands (delta_scan_kernel's SPLIT16:
# cfg.scan_split16, scan_dot16_parts): 1 part, S and U' rounded to the inputs' dtype for the
# dot as fla's scan takes its state (the carried S stays float32), puts fewer dots on the
# serial chain within the tests' rule (PERF_NOTES "Delta rule: 16-bit intermediates"). At
# K 256 the split scan runs on 4 warps only (launch "scan_k256_split"): on 8 warps the H200
# computes it wrong (PERF_NOTES "Compiler faults and precision guards").


def scan_v_block(K: int, V: int, cap: int, programs_per_v_block: int, sms: int,
                 dtype: torch.dtype = torch.bfloat16, cfg: DeltaConfig = DEFAULT) -> int:
    """The scans' V block for inputs of dtype: at most cap, the float32 state tile [BK, BV] at
    most cfg.state_tile_elems(_f32) elements (BV 64 at K 256: faster than 32, bitwise equal;
    float32's "ieee" dots spill heavily there), cut by fill_v_block for few sequences on a
    device of sms SMs (not below cfg.scan_min_bv_k256 at K = 256: on 16-wide blocks the H200
    runs Gated DeltaNet's forward scan wrong; PERF_NOTES "Compiler faults and precision
    guards")."""
    elems = cfg.state_tile_elems_f32 if dtype == torch.float32 else cfg.state_tile_elems
    BV = max(16, min(head_tile(V, cap), elems // full_tile(K)))
    return fill_v_block(BV, V, programs_per_v_block, sms,
                        min_bv=max(cfg.fill_min_bv,
                                   cfg.scan_min_bv_k256 if full_tile(K) >= 256 else 16))


# ------------------------------------------------------------------------------ kernels

@triton.jit
def gate_exp(x, PREC: tl.constexpr):
    """e^x in float32 of a log-decay sum or difference x (float64 for float32 inputs,
    gate_dtype): libdevice's expf for float32 inputs (PREC "ieee"), tl.exp's ex2.approx for
    16-bit inputs (common.exp)."""
    return exp(x, PREC == "ieee")


@triton.jit
def _inv_unit_lower_blocks(a, NB: tl.constexpr, BC: tl.constexpr):
    """(I + a_r)^-1 for NB strictly lower-triangular [BC, BC] float32 blocks a [NB, BC, BC],
    by forward substitution, row i of every block at once."""
    o = tl.arange(0, BC)
    x = -a  # row i holds N_i = -a_i until step i replaces it by x'_i = X_i - e_i
    for i in range(1, BC):
        sel = o[None, :, None] == i  # [1, BC, 1]: row i
        row = tl.sum(tl.where(sel, x, 0.0), 1)  # [NB, BC]: N_i (untouched so far)
        row = row + tl.sum(row[:, :, None] * x, 1)  # x'_i = N_i + sum_{j<i} N_ij x'_j
        x = tl.where(sel, row[:, None, :], x)  # write row i
    return x + (o[None, :, None] == o[None, None, :]).to(tl.float32)  # X = X' + I


@triton.jit
def ld_tokens(x, bos, i_h, Tn, H, D, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """The [BR, BC] tile at row r0, column c0 of head i_h's [Tn, D] slice of a packed
    [TT, H, D] tensor x whose sequence starts at token bos, in x's dtype (common.ld_raw):
    zero past the sequence's Tn rows and D columns, which the delta kernels' dots and sums
    rely on (Q^T dO over a chunk's rows, <S, dS'> over a K tile's rows)."""
    rows = (r0 + tl.arange(0, BR)).to(tl.int64)
    cols = c0 + tl.arange(0, BC)
    return ld_raw(x + (bos * H + i_h) * D, rows, rows < Tn, cols, cols < D, H * D)


@triton.jit
def st_tokens(x, val, bos, i_h, Tn, H, D, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """Stores val into the tile ld_tokens reads (its rows inside the sequence, its columns
    inside D), in x's dtype."""
    rows = (r0 + tl.arange(0, BR)).to(tl.int64)
    cols = c0 + tl.arange(0, BC)
    st_tile(x + (bos * H + i_h) * D, val, rows, rows < Tn, cols, cols < D, H * D)


@triton.jit
def ld_state_tile(x, slot, K, V, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """The [BR, BC] tile at row r0, column c0 of the [K, V] state x[slot] of a [slots, K, V]
    view (slot = state index * H + head, or n * H + h for per-sequence states; int64), in x's
    dtype, zero past K and V."""
    rows = (r0 + tl.arange(0, BR)).to(tl.int64)
    cols = c0 + tl.arange(0, BC)
    return ld_raw(x + slot * K * V, rows, rows < K, cols, cols < V, V)


@triton.jit
def st_state_tile(x, val, slot, K, V, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """Stores val into the tile ld_state_tile reads, in x's dtype."""
    rows = (r0 + tl.arange(0, BR)).to(tl.int64)
    cols = c0 + tl.arange(0, BC)
    st_tile(x + slot * K * V, val, rows, rows < K, cols, cols < V, V)


@triton.jit
def chunk_program(chunk_seq, chunk_idx, cu_seqlens, BT: tl.constexpr):
    """Where a (chunk, head[, tile]) program works: (chunk id i_c, head i_h, its sequence's
    first token bos and length Tn, the chunk's first row t0 in the sequence, the rows o_t,
    valid = rows inside the sequence). Offsets inside a sequence (Tn, t0) are int32; the
    loaders add them to the int64 bos."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    n = tl.load(chunk_seq + i_c).to(tl.int64)  # sequence of this chunk
    i_t = tl.load(chunk_idx + i_c)  # chunk in the sequence (int32: an offset inside it)
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    Tn = (tl.load(cu_seqlens + n + 1).to(tl.int64) - bos).to(tl.int32)
    t0 = i_t * BT
    o_t = tl.arange(0, BT)
    valid = (t0 + o_t) < Tn  # rows of this chunk inside the sequence
    return i_c, i_h, bos, Tn, t0, o_t, valid


@triton.jit
def sequence_program(cu_seqlens, chunk_offsets, H):
    """Where a (V tile, sequence * head) scan program works: (V tile i_v, i_nh = n * H + h,
    head i_h, the sequence's first token bos and length Tn (int32), its first chunk c0)."""
    i_v = tl.program_id(0)  # int32: a column offset
    i_nh = tl.program_id(1).to(tl.int64)
    n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    Tn = (tl.load(cu_seqlens + n + 1).to(tl.int64) - bos).to(tl.int32)
    c0 = tl.load(chunk_offsets + n).to(tl.int64)  # global index of the sequence's first chunk
    return i_v, i_nh, i_h, bos, Tn, c0


@triton.jit
def delta_prep_kernel(k, beta, g, gc, tinv, cu_seqlens, chunk_seq, chunk_idx, H, K,
                      BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                      GATE: tl.constexpr, PREC: tl.constexpr):
    """Per (chunk, head): gc = b (in gc's dtype, gate_dtype), tinv = T = (I + A)^-1 (float32;
    rows past the sequence unwritten)."""
    tl.static_assert(BT == 4 * BC, "the UT solve assembles 4 x 4 blocks of BC")
    tl.static_assert(BK >= 16, "tl.dot needs tiles of at least 16")
    i_c, i_h, bos, Tn, t0, o_t, valid = chunk_program(chunk_seq, chunk_idx, cu_seqlens, BT)
    row = (bos + t0 + o_t) * H + i_h  # [BT] int64 offsets of (token, head)

    # gates: beta, and b = cumsum(g) within the chunk (rows past the end add nothing)
    b_beta = tl.load(beta + row, mask=valid, other=0.0).to(tl.float32)
    if GATE == GATE_SCALAR:
        b_g = tl.cumsum(tl.load(g + row, mask=valid, other=0.0).to(gc.dtype.element_ty), axis=0)
        tl.store(gc + row, b_g, mask=valid)
    else:
        b_g = tl.zeros([BT], dtype=tl.float32)

    # A = tril(diag(beta) (K K^T * Gamma), -1), K K^T accumulated over K tiles
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        # k in the inputs' dtype: exact products either way,
        b_k = ld_tokens(k, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)
        b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=PREC)  # 16-bit MMA at twice tf32's rate
    m_low = (o_t[:, None] > o_t[None, :]) & valid[:, None]
    b_gam = gate_exp(tl.where(m_low, b_g[:, None] - b_g[None, :], float("-inf")), PREC)  # Gamma
    b_a = b_kk * b_gam * b_beta[:, None]

    # stage A in tinv's rows so that its 16 x 16 blocks can be read back
    p_t = tinv + (bos + t0) * H * BT + i_h * BT  # row r of the chunk at p_t + r * H * BT
    m_st = valid[:, None] & (o_t[None, :] < BT)
    tl.store(p_t + o_t[:, None] * (H * BT) + o_t[None, :], b_a, mask=m_st)
    tl.debug_barrier()
    n_rows = Tn - t0  # rows of the chunk inside the sequence (loads past them give 0)
    o_b = tl.arange(0, BT // BC)
    o_c = tl.arange(0, BC)
    r3 = o_b[:, None, None] * BC + o_c[None, :, None]  # [BT // BC, BC, 1] row of diagonal block
    c3 = o_b[:, None, None] * BC + o_c[None, None, :]  # [BT // BC, 1, BC] its columns
    p_d = p_t + r3 * (H * BT) + c3  # the BT // BC diagonal blocks
    m_d = (r3 < n_rows) & (c3 < BT)
    a_d = tl.load(p_d, mask=m_d, other=0.0)
    p_b = p_t + o_c[:, None] * (H * BT) + o_c[None, :]  # block (0, 0); (r, c): + r BC rows, c BC
    m_0 = (o_c < n_rows)[:, None] & (o_c[None, :] < BC)  # rows of block row r inside the sequence
    m_1 = (BC + o_c < n_rows)[:, None] & (o_c[None, :] < BC)
    m_2 = (2 * BC + o_c < n_rows)[:, None] & (o_c[None, :] < BC)
    m_3 = (3 * BC + o_c < n_rows)[:, None] & (o_c[None, :] < BC)
    a10 = tl.load(p_b + BC * H * BT, mask=m_1, other=0.0)
    a20 = tl.load(p_b + 2 * BC * H * BT, mask=m_2, other=0.0)
    a21 = tl.load(p_b + 2 * BC * H * BT + BC, mask=m_2, other=0.0)
    a30 = tl.load(p_b + 3 * BC * H * BT, mask=m_3, other=0.0)
    a31 = tl.load(p_b + 3 * BC * H * BT + BC, mask=m_3, other=0.0)
    a32 = tl.load(p_b + 3 * BC * H * BT + 2 * BC, mask=m_3, other=0.0)
    tl.debug_barrier()  # every read of A is done before T overwrites it

    # diagonal blocks X_rr = (I + A_rr)^-1, staged in place and read back one by one
    tl.store(p_d, _inv_unit_lower_blocks(a_d, BT // BC, BC), mask=m_d)
    tl.debug_barrier()
    x00 = tl.load(p_b, mask=m_0, other=0.0)
    x11 = tl.load(p_b + BC * H * BT + BC, mask=m_1, other=0.0)
    x22 = tl.load(p_b + 2 * BC * H * BT + 2 * BC, mask=m_2, other=0.0)
    x33 = tl.load(p_b + 3 * BC * H * BT + 3 * BC, mask=m_3, other=0.0)
    # off-diagonal blocks: X_rc = -X_rr sum_{c <= m < r} A_rm X_mc
    x10 = -tl.dot(x11, tl.dot(a10, x00, input_precision="ieee"), input_precision="ieee")
    x21 = -tl.dot(x22, tl.dot(a21, x11, input_precision="ieee"), input_precision="ieee")
    x20 = -tl.dot(x22, tl.dot(a20, x00, input_precision="ieee")
                  + tl.dot(a21, x10, input_precision="ieee"), input_precision="ieee")
    x32 = -tl.dot(x33, tl.dot(a32, x22, input_precision="ieee"), input_precision="ieee")
    x31 = -tl.dot(x33, tl.dot(a31, x11, input_precision="ieee")
                  + tl.dot(a32, x21, input_precision="ieee"), input_precision="ieee")
    x30 = -tl.dot(x33, tl.dot(a30, x00, input_precision="ieee")
                  + tl.dot(a31, x10, input_precision="ieee")
                  + tl.dot(a32, x20, input_precision="ieee"), input_precision="ieee")

    # store the off-diagonal blocks (the upper ones hold A's zeros)
    tl.store(p_b + BC * H * BT, x10, mask=m_1)
    tl.store(p_b + 2 * BC * H * BT, x20, mask=m_2)
    tl.store(p_b + 2 * BC * H * BT + BC, x21, mask=m_2)
    tl.store(p_b + 3 * BC * H * BT, x30, mask=m_3)
    tl.store(p_b + 3 * BC * H * BT + BC, x31, mask=m_3)
    tl.store(p_b + 3 * BC * H * BT + 2 * BC, x32, mask=m_3)


@triton.jit
def chunk_t(tinv, bos, t0, i_h, valid, o_t, H, BT: tl.constexpr):
    """T [BT, BT] float32 of the chunk at row t0 of a sequence starting at token bos, from
    prep's tinv [TT, H, BT] (rows past the sequence: zeros)."""
    p_t = tinv + (bos + t0 + o_t[:, None]) * (H * BT) + i_h * BT + o_t[None, :]
    return tl.load(p_t, mask=valid[:, None] & (o_t[None, :] < BT), other=0.0)


@triton.jit
def delta_scan_kernel(k, v, beta, tinv, gc, h0, h, vnew, ht, cu_seqlens, chunk_offsets,
                      H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      GATE: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
                      PREC: tl.constexpr, SPLIT16: tl.constexpr):
    """Per (V tile, sequence * head): S over the chunks; h[c0 + n + c] = S at chunk c's start
    (the gated layout's slots), U' = T diag(beta) (V - exp(b) * (K S)).

    BK spans all of K (the launcher picks full_tile(K)): K S contracts over it. SPLIT16
    (16-bit inputs; 0 off): K S and K^T U' with k as stored and S, U' (decay-weighted) as
    SPLIT16 16-bit parts (common.dot_a16: 2 halves, or 1, rounded) instead of tf32 dots on a
    float32 copy of k."""
    tl.static_assert(BK >= 16 and BV >= 16, "tl.dot needs tiles of at least 16")
    i_v, i_nh, i_h, bos, Tn, c0 = sequence_program(cu_seqlens, chunk_offsets, H)
    n = i_nh // H
    o_t = tl.arange(0, BT)

    # S_0: initial_state[n, h] or zeros (float32, [BK, BV] tile of [K, V])
    if USE_H0:
        b_s = ld_state_tile(h0, i_nh, K, V, 0, i_v * BV, BK, BV).to(tl.float32)
    else:
        b_s = tl.zeros([BK, BV], dtype=tl.float32)

    for i_t in range(tl.cdiv(Tn, BT)):
        t0 = i_t * BT
        valid = (t0 + o_t) < Tn
        # h[slot] = S at the chunk's start
        st_state_tile(h, b_s, (c0 + n + i_t) * H + i_h, K, V, 0, i_v * BV, BK, BV)
        # K S [BT, BV] (rows past the sequence: zeros)
        b_k16 = ld_tokens(k, bos, i_h, Tn, H, K, t0, 0, BT, BK)
        if SPLIT16:
            b_ks = dot_a16(b_k16, b_s, None, SPLIT16)
        else:
            b_ks = tl.dot(b_k16.to(tl.float32), b_s, input_precision=PREC)
        # R = diag(beta) (V - exp(b) * K S), then U' = T R
        row = (bos + t0 + o_t) * H + i_h  # [BT] int64 offsets of (token, head)
        b_beta = tl.load(beta + row, mask=valid, other=0.0).to(tl.float32)
        if GATE == GATE_SCALAR:
            b_g = tl.load(gc + row, mask=valid, other=0.0)
            b_ks = b_ks * gate_exp(b_g, PREC)[:, None]
        b_v = ld_tokens(v, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV).to(tl.float32)
        b_r = (b_v - b_ks) * b_beta[:, None]
        b_vn = tl.dot(chunk_t(tinv, bos, t0, i_h, valid, o_t, H, BT), b_r, input_precision=PREC)
        st_tokens(vnew, b_vn, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV)
        # S <- exp(b_L) S + (K * exp(b_L - b))^T U'
        if GATE == GATE_SCALAR:
            last = tl.minimum(t0 + BT, Tn) - 1
            b_gl = tl.load(gc + (bos + last) * H + i_h)  # b_L (last < Tn: in bounds)
            b_vn = b_vn * gate_exp(tl.where(valid, b_gl - b_g, float("-inf")), PREC)[:, None]
            b_s = b_s * gate_exp(b_gl, PREC)
        if SPLIT16:
            b_s = dot_a16(tl.trans(b_k16), b_vn, b_s, SPLIT16)
        else:
            b_s += tl.dot(tl.trans(b_k16.to(tl.float32)), b_vn, input_precision=PREC)

    if STORE_FINAL:
        st_state_tile(ht, b_s, i_nh, K, V, 0, i_v * BV, BK, BV)


# ------------------------------------------------------------------------------ launchers

def prep(k, beta, g, layout, cfg: DeltaConfig = DEFAULT):
    """b and T for every chunk.

    Args: k [TT, H, K] (packed, contiguous); beta, g [TT, H] (g may be None);
        layout: common.ChunkLayout (delta_api.chunk_layout); cfg: launch choices.
    Returns: gc [TT, H] in gate_dtype (None when g is None), tinv [TT, H, BT] float32.
    """
    TT, H, K = k.shape
    dev = k.device
    gc = alloc.empty(TT, H, dtype=gate_dtype(k.dtype), device=dev) if g is not None else None
    tinv = alloc.empty(TT, H, BT, dtype=torch.float32, device=dev)
    if layout.NT:
        delta_prep_kernel[(layout.NT, H)](
            k, beta, g if g is not None else beta, gc if gc is not None else tinv, tinv,
            layout.cu, layout.tile_seq, layout.tile_idx, H=H, K=K, BT=BT, BC=BC,
            BK=head_tile(K, 64), GATE=gate_of(g), PREC=dot_precision(k.dtype),
            **cfg.launch["prep"])
    return gc, tinv


def scan(k, v, beta, gc, tinv, initial_state, layout, output_final_state,
         cfg: DeltaConfig = DEFAULT):
    """The forward state scan.

    Args: k [TT, H, K], v [TT, H, V], beta [TT, H] (inputs); gc [TT, H] (gate_dtype) or
        None, tinv [TT, H, BT] float32 (prep); initial_state [N, H, K, V] or None; cfg: launch
        choices.
    Returns: h [NC + N, H, K, V] in state_dtype(k.dtype) (state at each chunk's start, at the
        slots of layout; the N slots after each sequence stay unwritten), vnew [TT, H, V] in
        vnew_dtype (U'), final [N, H, K, V] float32 or None.
    """
    TT, H, K = k.shape
    V = v.shape[-1]
    N = layout.N
    dev = k.device
    h = alloc.empty(layout.n_slots, H, K, V, dtype=state_dtype(k.dtype, cfg), device=dev)
    vnew = alloc.empty(TT, H, V, dtype=vnew_dtype(k.dtype, cfg), device=dev)
    final = alloc.empty(N, H, K, V, dtype=torch.float32, device=dev) if output_final_state else None
    BK, BV = full_tile(K), scan_v_block(K, V, cfg.scan_bv, N * H, sm_count(dev), k.dtype, cfg)
    split = split16_on(cfg.scan_split16, cfg, k) and BK <= cfg.scan_split16_max_bk
    if N:
        delta_scan_kernel[(triton.cdiv(V, BV), N * H)](
            k, v, beta, tinv, gc if gc is not None else tinv,
            initial_state if initial_state is not None else h, h, vnew,
            final if final is not None else h, layout.cu, layout.chunk_off,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, GATE=gate_of(gc),
            USE_H0=initial_state is not None, STORE_FINAL=final is not None,
            PREC=dot_precision(k.dtype),
            SPLIT16=cfg.scan_dot16_parts if split else 0,
            **cfg.launch[("scan_k256_split" if split else "scan_k256") if BK >= 256 else "scan"])
    return h, vnew, final


def output(q, k, vnew, gc, h, layout, scale, out_dtype, cfg: DeltaConfig = DEFAULT):
    """O from the chunk states: gated linear attention with values U' (gated_fwd.fwd_o).

    Args: q, k [TT, H, K]; vnew [TT, H, V], h [NC + N, H, K, V] (from scan);
        gc [TT, H] (gate_dtype) or None (b, the log-decay's cumsum inside each chunk); cfg:
        launch choices.
    Returns: o [TT, H, V] in out_dtype.
    """
    K, V = q.shape[-1], vnew.shape[-1]
    launch = cfg.launch["output"]
    bv = head_tile(V, cfg.output_bv_f32 if q.dtype == torch.float32 else cfg.output_bv)
    # dots on U' and the states as stored (16-bit, or float32 with exact "ieee" dots for float32
    # inputs)
    cfg = KernelConfig(gate=gate_of(gc), has_kw=False, mexp=False, noncausal=False,
                       ieee=q.dtype == torch.float32, BK=head_tile(K, 64),
                       BV=bv, BVS=bv,
                       warps=launch["num_warps"], scan_warps=launch["num_warps"],
                       stages=launch["num_stages"])
    o, _ = fwd_o(q, k, vnew, gc, None, None, None, h, None, layout, cfg, scale,
                 out_dtype=out_dtype)
    return o
