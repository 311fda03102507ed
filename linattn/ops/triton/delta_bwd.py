"""Delta-rule backward kernels: reverse scan for dS, then two chunk-parallel gradient kernels.

Notation as in delta_fwd (per chunk: b, Gamma, T, W, U, U' = U - W S, S the state at the
chunk's start, dS' the gradient of the state at its end, M = scale tril(dO U'^T) * Gamma):

    dU'  = scale (tril(Q K^T) * Gamma)^T dO + (K * exp(b_L - b)) dS'
    dS   = exp(b_L) dS' + scale (Q * exp(b))^T dO - W^T dU'            (reverse scan;
           W^T dU' = K^T (beta exp(b) * (T^T dU')): W is never stored, see delta_fwd)
    dQ   = scale exp(b) * (dO S^T) + M K
    dK  <- exp(b_L - b) * (U' dS'^T) + M^T Q                             (+ the WY part)
    dW   = -dU' S^T,  dU = dU'
    dT   = dW (diag(beta e^b) K)^T + dU (diag(beta) V)^T,  dA = -T^T dT T^T (strictly lower)
    dK  += T^T dW * beta e^b + (dA beta * Gamma) K + (dA beta * Gamma)^T K,  dV = beta T^T dU
    dbeta, and db (-> dg by a reverse cumsum inside the chunk) from every exp(b) above.

Kernels:
  delta_bwd_scores_kernel per (chunk, head): the masked scores (tril(Q K^T) * Gamma)^T the
                         reverse scan reads at K >= DeltaConfig.reverse_scan_scores_min_bk.
  delta_bwd_scan_kernel  per (V tile, sequence * head): dh[c] = dS' of chunk c, dU', dS_0.
  delta_bwd_dqk_kernel   per (chunk, head, K tile): dQ, the state/output part of dK, dW,
                         and the tile's share of db.
  delta_bwd_wy_kernel    per (chunk, head): the WY part: dK, dV, dbeta, dg.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import alloc
from . import delta_fwd
from .common import GATE_SCALAR, dot_a16, dot_b16, gate_of, head_tile, sm_count, split16
from .delta_config import DEFAULT, DeltaConfig, split16_on
from .delta_fwd import (BT, chunk_program, chunk_t, dot_precision, full_tile, gate_exp,
                        ld_state_tile, ld_tokens, scan_v_block, sequence_program, st_state_tile,
                        st_tokens)

# Launch choices come from a DeltaConfig argument (delta_config.DEFAULT), from
# benchmarks/sweep_delta.py (PERF_NOTES "Delta rule: launch choices"): grads_wy on 4 warps
# (faster than 8 although it spills more), the reverse scan on 4 warps and 1 stage, grads_qk
# on 4 warps and 2 stages, one program per (chunk, head, 64-wide K tile) with one pass over V
# and M formed by each, as fla's chunk_bwd_dqkwg (nothing re-reads dO, U', dU' per K tile).
# - gated grads_qk takes 32-wide V tiles: on 64-wide ones (and on 3 stages) the H200 computes
#   it wrong, run to run different, while the interpreter's run is right (PERF_NOTES
#   "Compiler faults and precision guards"); forming M in a second pass over V was slower
#   and did not cure it.
# - the reverse scan's dots on 16-bit inputs take their float32 operands in 16-bit parts
#   (delta_bwd_scan_kernel's SPLIT16; 1 part: dS', the scores, T^T dU' and e^b dO rounded to
#   the inputs' dtype as fla's reverse scan takes dh), on state tiles up to 256 rows and on V
#   blocks at least 64 wide only: on the narrower blocks fill_v_block cuts to for few
#   sequences the split scan is wrong on the H200. The per-chunk grads_qk stays unsplit:
#   split, it spills on sm_90.
# - grads_wy's dots of stored 16-bit values against T and dKK by two 16-bit halves, on K tiles
#   at least 64 wide: at K = 16 (one 16-wide K tile, 4 warps) the H200 returns NaN in dk.
# - at K >= 256 the reverse scan reads each chunk's masked scores (tril(Q K^T) * Gamma)^T from
#   delta_bwd_scores_kernel (a float32 [TT, H, BT] buffer alive through the scan) instead of
#   forming K Q^T in every step of its serial loop for every V block (about 1/7 of a step's
#   multiply-adds at K 256, repeated by the 4 V blocks).


def grad_dtype(dtype: torch.dtype, cfg: DeltaConfig = DEFAULT) -> torch.dtype:
    """dtype of the stored dU', dW and dk_part for inputs of this dtype: the inputs' for
    16-bit inputs (each written by one kernel and read by later ones, all three alive at the
    backward's peak; every reader upcasts them to float32 before its dots, and the reverse
    scan's own dS update uses the float32 dU'; PERF_NOTES "Delta rule: 16-bit
    intermediates")."""
    return dtype if cfg.grads_in_input_dtype and dtype != torch.float32 else torch.float32


# ------------------------------------------------------------------------------ kernels


@triton.jit
def mask_scores(b_kq, b_g, o_t, valid, GATE: tl.constexpr, PREC: tl.constexpr):
    """(tril(Q K^T) * Gamma)^T of one chunk from K Q^T [j, i] (key j, query i), float32:
    masked to i >= j and i in the sequence, and with a scalar gate times exp(b_i - b_j) (b_g
    [BT] the chunk-local log-decay cumsum)."""
    m_c = (o_t[None, :] >= o_t[:, None]) & valid[None, :]
    if GATE == GATE_SCALAR:
        return b_kq * gate_exp(tl.where(m_c, b_g[None, :] - b_g[:, None], float("-inf")), PREC)
    else:
        return tl.where(m_c, b_kq, 0.0)


@triton.jit
def dot_nt(a, b, PREC: tl.constexpr):
    """a @ b^T of two stored tiles in their common dtype, float32 accumulation: as stored when
    both are 16-bit (exact products, 16-bit MMA), else both as float32 (PREC): a float32
    intermediate (delta_fwd.state_dtype, vnew_dtype, grad_dtype switched off) beside a 16-bit
    one or an input."""
    if a.dtype == b.dtype:
        return tl.dot(a, tl.trans(b), input_precision=PREC)
    else:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision=PREC)


@triton.jit
def delta_bwd_scores_kernel(q, k, gc, kq, cu_seqlens, chunk_seq, chunk_idx, H, K,
                            BT: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr,
                            PREC: tl.constexpr):
    """Per (chunk, head): kq [BT, BT] of the chunk's rows of kq [TT, H, BT] float32, the
    masked scores (tril(Q K^T) * Gamma)^T [key j, query i] the reverse scan reads when it
    does not form them itself (DeltaConfig.reverse_scan_scores_min_bk)."""
    tl.static_assert(BK >= 16, "tl.dot needs tiles of at least 16")
    i_c, i_h, bos, Tn, t0, o_t, valid = chunk_program(chunk_seq, chunk_idx, cu_seqlens, BT)
    # K Q^T [j, i] over BK-wide K tiles, 16-bit operands as stored: exact products
    b_kq = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_q = ld_tokens(q, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)
        b_k = ld_tokens(k, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)
        b_kq += tl.dot(b_k, tl.trans(b_q), input_precision=PREC)
    b_g = None
    if GATE == GATE_SCALAR:
        b_g = tl.load(gc + (bos + t0 + o_t) * H + i_h, mask=valid, other=0.0)
    # masked to i >= j, i in the sequence, times exp(b_i - b_j) when gated
    b_kq = mask_scores(b_kq, b_g, o_t, valid, GATE, PREC)
    st_tokens(kq, b_kq, bos, i_h, Tn, H, BT, t0, 0, BT, BT)


@triton.jit
def delta_bwd_scan_kernel(q, k, beta, tinv, gc, do, kq, dht, dh, dv2, dh0, cu_seqlens,
                          chunk_offsets, scale, H, K, V,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          GATE: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                          PREC: tl.constexpr, SPLIT16: tl.constexpr, KQ_IN: tl.constexpr):
    """Per (V tile, sequence * head): dS from the last chunk back; dh[c] = dS', dv2 = dU'.

    SPLIT16 (16-bit inputs; 0 off): the float32 operand of each dot whose other operand is a
    16-bit input (K dS', (K Q^T) dO, K^T (beta e^b T^T dU'), gated Q^T (e^b dO)) goes in as
    SPLIT16 16-bit parts (common.dot_a16 / dot_b16: 2 halves, or 1, rounded), so the input
    enters the dot as stored instead of through a float32 copy staged in shared memory for a
    tf32 dot; two halves keep ~16 bits of the float32 side where tf32 keeps 11.

    KQ_IN: the masked scores come from kq [TT, H, BT] (delta_bwd_scores_kernel) instead of a
    K Q^T dot per step.

    BK spans all of K (the launcher picks full_tile(K)): K^T (...) contracts over the chunk
    but yields all K rows of dS."""
    tl.static_assert(BK >= 16 and BV >= 16, "tl.dot needs tiles of at least 16")
    i_v, i_nh, i_h, bos, Tn, c0 = sequence_program(cu_seqlens, chunk_offsets, H)
    nt = tl.cdiv(Tn, BT)
    o_t = tl.arange(0, BT)

    # dS after the last token: the final state's cotangent, or zeros
    if USE_DHT:
        b_ds = ld_state_tile(dht, i_nh, K, V, 0, i_v * BV, BK, BV).to(tl.float32)
    else:
        b_ds = tl.zeros([BK, BV], dtype=tl.float32)

    for j in range(nt):
        i_t = nt - 1 - j  # chunks in reverse
        t0 = i_t * BT
        valid = (t0 + o_t) < Tn
        row = (bos + t0 + o_t) * H + i_h  # [BT] int64 offsets of (token, head)
        # dh[c] = dS' (gradient of the state at the chunk's end)
        st_state_tile(dh, b_ds, (c0 + i_t) * H + i_h, K, V, 0, i_v * BV, BK, BV)
        # q, k, dO stay in the inputs' dtype (half the registers of float32 tiles at 16 bits);
        # the decays scale a dot's rows or its other operand instead of q and k, so each dot
        # rounds no more than before (16-bit values are exact in tf32)
        b_q = ld_tokens(q, bos, i_h, Tn, H, K, t0, 0, BT, BK)
        b_k = ld_tokens(k, bos, i_h, Tn, H, K, t0, 0, BT, BK)
        b_do = ld_tokens(do, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV)
        b_g = None
        if GATE == GATE_SCALAR:
            last = tl.minimum(t0 + BT, Tn) - 1
            b_g = tl.load(gc + row, mask=valid, other=0.0)
            b_gl = tl.load(gc + (bos + last) * H + i_h)  # b_L (last < Tn: in bounds)
        # (tril(Q K^T) * Gamma)^T as K Q^T masked to i >= j (query i, key j)
        if KQ_IN:
            b_kq = ld_tokens(kq, bos, i_h, Tn, H, BT, t0, 0, BT, BT)  # [j, i]
        else:
            b_kq = mask_scores(tl.dot(b_k, tl.trans(b_q), input_precision=PREC), b_g, o_t,
                               valid, GATE, PREC)                         # [j, i], exact products
        # dU' = scale (masked K Q^T) dO + diag(exp(b_L - b)) K dS'
        if SPLIT16:
            # the part that does not wait for dS' first, so that K Q^T is dead before the
            # split of dS' is formed
            b_dvi = dot_b16(b_kq, b_do, None, SPLIT16)
            b_kds = dot_a16(b_k, b_ds, None, SPLIT16)
        else:
            b_dvi = tl.dot(b_kq, b_do.to(tl.float32), input_precision=PREC)
            b_kds = tl.dot(b_k.to(tl.float32), b_ds, input_precision=PREC)
        if GATE == GATE_SCALAR:
            b_kds = b_kds * gate_exp(tl.where(valid, b_gl - b_g, float("-inf")), PREC)[:, None]
        b_dv = scale * b_dvi + b_kds
        st_tokens(dv2, b_dv, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV)  # dS: float32 b_dv
        # dS = exp(b_L) dS' + scale Q^T diag(exp(b)) dO - W^T dU'
        if GATE == GATE_SCALAR and SPLIT16:
            b_ds = b_ds * gate_exp(b_gl, PREC) + scale * dot_a16(
                tl.trans(b_q), b_do.to(tl.float32) * gate_exp(b_g, PREC)[:, None], None, SPLIT16)
        elif GATE == GATE_SCALAR:
            b_ds = b_ds * gate_exp(b_gl, PREC) + scale * tl.dot(
                tl.trans(b_q.to(tl.float32)), b_do.to(tl.float32) * gate_exp(b_g, PREC)[:, None],
                input_precision=PREC)
        else:
            b_ds += scale * tl.dot(tl.trans(b_q), b_do, input_precision=PREC)  # exact products
        # W^T dU' = K^T (beta exp(b) * (T^T dU')), T loaded once q and dO are done
        b_wt = tl.load(beta + row, mask=valid, other=0.0).to(tl.float32)  # beta exp(b)
        if GATE == GATE_SCALAR:
            b_wt = b_wt * gate_exp(b_g, PREC)
        b_y = tl.dot(tl.trans(chunk_t(tinv, bos, t0, i_h, valid, o_t, H, BT)), b_dv,
                     input_precision=PREC) * b_wt[:, None]           # [BT, BV]
        if SPLIT16:
            b_ds -= dot_a16(tl.trans(b_k), b_y, None, SPLIT16)
        else:
            b_ds -= tl.dot(tl.trans(b_k.to(tl.float32)), b_y, input_precision=PREC)

    if STORE_DH0:
        st_state_tile(dh0, b_ds, i_nh, K, V, 0, i_v * BV, BK, BV)


@triton.jit
def chunk_gates(gc, bos, t0, i_h, o_t, valid, last, H, BT: tl.constexpr,
                GATE: tl.constexpr, PREC: tl.constexpr):
    """The decays grads_qk applies in one chunk (last: the row of its last token), float32:
    Gamma [BT, BT] masked to i >= j and rows in the sequence, exp(b) [BT], exp(b_L - b) [BT]
    (0 past the sequence), exp(b_L); ones (and the masks) when ungated."""
    m_c = (o_t[:, None] >= o_t[None, :]) & valid[:, None]
    if GATE == GATE_SCALAR:
        b_g = tl.load(gc + (bos + t0 + o_t) * H + i_h, mask=valid, other=0.0)
        b_gl = tl.load(gc + (bos + t0 + last) * H + i_h)
        b_gam = gate_exp(tl.where(m_c, b_g[:, None] - b_g[None, :], float("-inf")), PREC)
        b_eg = gate_exp(b_g, PREC)  # exp(b)
        b_kd = gate_exp(tl.where(valid, b_gl - b_g, float("-inf")), PREC)  # exp(b_L - b)
        b_el = gate_exp(b_gl, PREC)  # exp(b_L)
    else:
        b_gam = tl.where(m_c, 1.0, 0.0)
        b_eg = tl.full([BT], 1.0, dtype=tl.float32)
        b_kd = tl.where(valid, 1.0, 0.0)
        b_el = 1.0
    return b_gam, b_eg, b_kd, b_el


@triton.jit
def gate_sums(b_mq, b_dkd, b_ss_el, o_t, last):
    """db's terms from the decays inside a chunk [BT]: + row sums, - column sums of
    M * Q K^T (Gamma in the intra term), and from the state update exp(b_L) <S, dS'> (b_ss_el)
    plus sum_j exp(b_L - b_j) k_j . (dS' U'_j) on the last row, minus each row's own term
    (b_dkd). The terms that cancel exactly (M * Q K^T's diagonal, in its row and its column;
    the last row's own b_dkd, added and subtracted) are left out rather than rounded and
    subtracted: with strong decays (b ~ -20 a step) they dominate the sums and their float32
    rounding was most of db's error (a GPU test's dg at 1.008e-6 against a 1.0004e-6 bound)."""
    off = o_t[:, None] != o_t[None, :]
    b_mq = tl.where(off, b_mq, 0.0)
    others = tl.sum(tl.where(o_t == last, 0.0, b_dkd), 0)
    return tl.sum(b_mq, 1) - tl.sum(b_mq, 0) + tl.where(o_t == last, b_ss_el + others, -b_dkd)


@triton.jit
def delta_bwd_dqk_kernel(q, k, vnew, gc, h, dh, do, dv2, dq, dk, dw, db, cu_seqlens,
                         chunk_seq, chunk_idx, scale, TT, H, K, V, BT: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                         PREC: tl.constexpr):
    """Per (chunk, head, K tile): dq, dk (state and output part) and dw = -dU' S^T on the
    tile's BK columns, and the tile's share of db (db [cdiv(K, BK), TT, H]; the launcher sums
    the shares). One pass over the V tiles reads dO, U', dU' and the tile's rows of S and dS'
    once, forming M = scale tril(dO U'^T) * Gamma beside them (every K tile's program forms
    it: [BT, BT] per program, as fla's chunk_bwd_dqkwg)."""
    tl.static_assert(BK >= 16 and BV >= 16, "tl.dot needs tiles of at least 16")
    i_c, i_h, bos, Tn, t0, o_t, valid = chunk_program(chunk_seq, chunk_idx, cu_seqlens, BT)
    i_k = tl.program_id(2)
    hslot = i_c + tl.load(chunk_seq + i_c).to(tl.int64)  # h's slot: c0 + n + c = i_c + n
    last = tl.minimum(t0 + BT, Tn) - 1 - t0  # row of the chunk's last token
    b_gam, b_eg, b_kd, b_el = chunk_gates(gc, bos, t0, i_h, o_t, valid, last, H, BT, GATE, PREC)

    # over V tiles: dO U'^T, and on this K tile dO S^T, U' dS'^T, dU' S^T, rows of S * dS'
    b_m = tl.zeros([BT, BT], dtype=tl.float32)
    b_dqa = tl.zeros([BT, BK], dtype=tl.float32)
    b_dka = tl.zeros([BT, BK], dtype=tl.float32)
    b_dwa = tl.zeros([BT, BK], dtype=tl.float32)
    b_ss = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        # h, dh and U' as stored (16-bit or float32)
        b_hs = ld_state_tile(h, hslot * H + i_h, K, V, i_k * BK, i_v * BV, BK, BV)
        b_dhs = ld_state_tile(dh, i_c * H + i_h, K, V, i_k * BK, i_v * BV, BK, BV)
        b_vn = ld_tokens(vnew, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV)
        b_do = ld_tokens(do, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV)
        b_dv = ld_tokens(dv2, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV)
        b_m += dot_nt(b_do, b_vn, PREC)                      # dO U'^T
        b_dqa += dot_nt(b_do, b_hs, PREC)                    # dO S^T
        b_dka += dot_nt(b_vn, b_dhs, PREC)                   # U' dS'^T
        b_dwa += dot_nt(b_dv, b_hs, PREC)                    # dU' S^T
        b_ss += tl.sum(b_hs.to(tl.float32) * b_dhs.to(tl.float32), 1)
    st_tokens(dw, -b_dwa, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)
    b_m = b_m * b_gam * scale

    b_q16 = ld_tokens(q, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)
    b_k16 = ld_tokens(k, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)
    b_q = b_q16.to(tl.float32)
    b_k = b_k16.to(tl.float32)
    # dQ = scale exp(b) (dO S^T) + M K
    b_dq = scale * b_eg[:, None] * b_dqa + tl.dot(b_m, b_k, input_precision=PREC)
    # dK (state and output part) = exp(b_L - b) (U' dS'^T) + M^T Q
    b_dk = b_kd[:, None] * b_dka + tl.dot(tl.trans(b_m), b_q, input_precision=PREC)
    st_tokens(dq, b_dq, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)
    st_tokens(dk, b_dk, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)

    if GATE == GATE_SCALAR:
        # this tile's share of db: the inter term scale exp(b_i) q_i . (S dO_i), Gamma in the
        # intra term (+ row sums, - column sums of M * Q K^T, Q K^T on this tile's columns),
        # and the state update's exp(b_L) S and exp(b_L - b_j) k_j
        b_db = scale * b_eg * tl.sum(b_dqa * b_q, 1)
        b_mq = b_m * tl.dot(b_q16, tl.trans(b_k16), input_precision=PREC)
        b_dkd = b_kd * tl.sum(b_dka * b_k, 1)
        b_db += gate_sums(b_mq, b_dkd, b_el * tl.sum(b_ss, 0), o_t, last)
        tl.store(db + (i_k.to(tl.int64) * TT + bos + t0 + o_t) * H + i_h, b_db, mask=valid)


@triton.jit
def delta_bwd_wy_kernel(k, v, beta, gc, tinv, dw, dv2, dk_part, db_part, dk, dv, dbeta, dg,
                        cu_seqlens, chunk_seq, chunk_idx, H, K, V, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                        PREC: tl.constexpr, SPLIT16: tl.constexpr):
    """Per (chunk, head): through W = T diag(beta e^b) K, U = T diag(beta) V, T = (I + A)^-1.
    SPLIT16 (16-bit inputs and stored dW, dU): T^T dW, T^T dU and (dKK + dKK^T) K with the
    float32 factor as two 16-bit halves (common.split16), K, dW and dU as stored."""
    tl.static_assert(BK >= 16 and BV >= 16, "tl.dot needs tiles of at least 16")
    i_c, i_h, bos, Tn, t0, o_t, valid = chunk_program(chunk_seq, chunk_idx, cu_seqlens, BT)
    row = (bos + t0 + o_t) * H + i_h
    m_low = (o_t[:, None] > o_t[None, :]) & valid[:, None]

    b_beta = tl.load(beta + row, mask=valid, other=0.0).to(tl.float32)
    if GATE == GATE_SCALAR:
        b_g = tl.load(gc + row, mask=valid, other=0.0)
        b_eg = gate_exp(b_g, PREC)
        b_gam = gate_exp(tl.where(m_low, b_g[:, None] - b_g[None, :], float("-inf")), PREC)
    else:
        b_eg = tl.full([BT], 1.0, dtype=tl.float32)
        b_gam = tl.where(m_low, 1.0, 0.0)
    b_kw = b_beta * b_eg  # W's row weights beta e^b
    b_t = chunk_t(tinv, bos, t0, i_h, valid, o_t, H, BT)

    # dT = (dW K^T * e^b_j + dU V^T) * beta_j (column weights applied to the dots' results, so
    # that the stored dW, dU and the inputs K, V enter the dots as they are: 16-bit operands and
    # exact products for 16-bit inputs);  K K^T for A
    b_dt = tl.zeros([BT, BT], dtype=tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_k16 = ld_tokens(k, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)
        b_kk += tl.dot(b_k16, tl.trans(b_k16), input_precision=PREC)  # exact products, 16-bit MMA
        b_dt += dot_nt(ld_tokens(dw, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK), b_k16,
                       PREC)                                            # dW K^T
    if GATE == GATE_SCALAR:
        b_dt = b_dt * b_eg[None, :]
    for i_v in range(tl.cdiv(V, BV)):
        b_dt += dot_nt(ld_tokens(dv2, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV),
                       ld_tokens(v, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV), PREC)  # dU V^T
    b_dt = b_dt * b_beta[None, :]

    # dA = -T^T dT T^T on the strict lower triangle; A = beta_i (K K^T)_ij Gamma_ij
    # (PREC: tf32 products for 16-bit inputs, finer than their 8 bits, as the dots above; the
    # exact "ieee" dots spilled 2436 B at 8 warps on sm_90 vs 492 B now; float32 keeps ieee)
    b_dt = tl.where((o_t[:, None] >= o_t[None, :]) & valid[:, None], b_dt, 0.0)
    b_da = -tl.dot(tl.trans(b_t), tl.dot(b_dt, tl.trans(b_t), input_precision=PREC),
                   input_precision=PREC)
    b_da = tl.where(m_low, b_da, 0.0)
    b_dbeta = tl.sum(b_da * b_kk * b_gam, 1)
    b_dkk = b_da * b_beta[:, None] * b_gam  # gradient of (K K^T)_ij
    b_gg = b_dkk * b_kk  # gradient of b_i - b_j through Gamma
    b_db = tl.sum(b_gg, 1) - tl.sum(b_gg, 0)

    # dK = dK_part + T^T dW * beta e^b + (dKK + dKK^T) K  (one dot for both K K^T factors)
    b_dks = b_dkk + tl.trans(b_dkk)
    if SPLIT16:
        t_hi, t_lo = split16(tl.trans(b_t), k.dtype.element_ty)       # T^T as two halves
        s_hi, s_lo = split16(b_dks, k.dtype.element_ty)
    for i_k in range(tl.cdiv(K, BK)):
        if SPLIT16:
            b_k16 = ld_tokens(k, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)
            b_k = b_k16.to(tl.float32)
            b_dw16 = ld_tokens(dw, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)
            b_dkb = tl.dot(t_lo, b_dw16, tl.dot(t_hi, b_dw16))
            b_kk2 = tl.dot(s_lo, b_k16, tl.dot(s_hi, b_k16))
        else:
            b_k = ld_tokens(k, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK).to(tl.float32)
            b_dkb = tl.dot(tl.trans(b_t),
                           ld_tokens(dw, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK).to(tl.float32),
                           input_precision=PREC)
            b_kk2 = tl.dot(b_dks, b_k, input_precision=PREC)
        b_dkt = ld_tokens(dk_part, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK).to(tl.float32) \
            + b_dkb * b_kw[:, None] + b_kk2
        b_s = tl.sum(b_dkb * b_k, 1)  # through beta e^b
        b_dbeta += b_s * b_eg
        b_db += b_s * b_kw
        st_tokens(dk, b_dkt, bos, i_h, Tn, H, K, t0, i_k * BK, BT, BK)

    # dV = beta T^T dU
    for i_v in range(tl.cdiv(V, BV)):
        b_v = ld_tokens(v, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV).to(tl.float32)
        if SPLIT16:
            b_du16 = ld_tokens(dv2, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV)
            b_dvb = tl.dot(t_lo, b_du16, tl.dot(t_hi, b_du16))
        else:
            b_dvb = tl.dot(tl.trans(b_t),
                           ld_tokens(dv2, bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV).to(tl.float32),
                           input_precision=PREC)
        b_dbeta += tl.sum(b_dvb * b_v, 1)
        st_tokens(dv, b_dvb * b_beta[:, None], bos, i_h, Tn, H, V, t0, i_v * BV, BT, BV)

    tl.store(dbeta + row, b_dbeta.to(dbeta.dtype.element_ty), mask=valid)
    if GATE == GATE_SCALAR:
        # dg_t = sum_{i >= t} db_i inside the chunk (b is the chunk-local cumsum of g)
        b_db = tl.where(valid, b_db + tl.load(db_part + row, mask=valid, other=0.0), 0.0)
        b_dg = tl.sum(b_db, 0) - tl.cumsum(b_db, axis=0) + b_db
        tl.store(dg + row, b_dg.to(dg.dtype.element_ty), mask=valid)


# ------------------------------------------------------------------------------ launchers

def reverse_scan(q, k, beta, tinv, gc, do, dfinal, initial_state, layout, scale, need_dh0,
                 cfg: DeltaConfig = DEFAULT):
    """dS backwards over the chunks.

    Args: q, k [TT, H, K], beta [TT, H] (inputs); tinv [TT, H, BT], gc [TT, H] or None
        (delta_fwd.prep; gc in delta_fwd.gate_dtype); do [TT, H, V]; dfinal [N, H, K, V] or None;
        initial_state [N, H, K, V] or None; cfg: launch choices.
    Returns: dh [NC, H, K, V] in delta_fwd.state_dtype (gradient of each chunk's end state;
        the scan carries it in float32),
        dv2 [TT, H, V] in grad_dtype (dU'), dh0 [N, H, K, V] in initial_state's dtype (or None
        unless need_dh0).
    """
    TT, H, K = q.shape
    V = do.shape[-1]
    N, NC = layout.N, layout.NT
    dev = q.device
    # dh in the states' dtype (16 bits for 16-bit inputs, like h): its one reader, grads_qk,
    # takes it into tf32 dots and <S, dS'> with the 16-bit h; half of the backward's largest
    # buffer (1 GiB float32 at B*T 65536, H 16, D 128; 4 GiB at D 256), which is alive at the
    # backward's peak (grads_qk)
    dh = alloc.empty(NC, H, K, V, dtype=delta_fwd.state_dtype(q.dtype, cfg), device=dev)
    dv2 = alloc.empty(TT, H, V, dtype=grad_dtype(q.dtype, cfg), device=dev)
    dh0 = alloc.empty(N, H, K, V, dtype=initial_state.dtype, device=dev) if need_dh0 else None
    BK = full_tile(K)
    BV = scan_v_block(K, V, cfg.reverse_scan_bv, N * H, sm_count(dev), q.dtype, cfg)
    kq = None
    if BK >= cfg.reverse_scan_scores_min_bk and layout.NT:
        kq = alloc.empty(TT, H, BT, dtype=torch.float32, device=dev)    # [TT, H, BT]
        delta_bwd_scores_kernel[(layout.NT, H)](
            q, k, gc if gc is not None else kq, kq, layout.cu, layout.tile_seq,
            layout.tile_idx, H, K=K, BT=BT, BK=head_tile(K, 64), GATE=gate_of(gc),
            PREC=dot_precision(q.dtype), **cfg.launch["scores"])
    if N:
        delta_bwd_scan_kernel[(triton.cdiv(V, BV), N * H)](
            q, k, beta, tinv, gc if gc is not None else tinv, do, kq if kq is not None else tinv,
            dfinal if dfinal is not None else dh,
            dh, dv2, dh0 if dh0 is not None else dh, layout.cu, layout.chunk_off,
            scale, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, GATE=gate_of(gc),
            USE_DHT=dfinal is not None, STORE_DH0=dh0 is not None, PREC=dot_precision(q.dtype),
            # on state tiles up to reverse_scan_split16_max_bk rows and wide V blocks only
            # (see reverse_scan_split16_min_bv)
            SPLIT16=cfg.reverse_scan_dot16_parts if (
                split16_on(cfg.reverse_scan_split16, cfg, q)
                and BK <= cfg.reverse_scan_split16_max_bk
                and BV >= cfg.reverse_scan_split16_min_bv)
            else 0,
            KQ_IN=kq is not None,
            **(cfg.launch["reverse_scan_k256"] if BK >= 256 else
               {**cfg.launch["reverse_scan"], **(dict(num_stages=2) if BK < 128 else {})}))
    return dh, dv2, dh0


def grads_qk(q, k, vnew, gc, h, dh, do, dv2, layout, scale, cfg: DeltaConfig = DEFAULT):
    """dq, and the parts of dk, dW and db that come through the states and outputs.

    Args: q, k [TT, H, K]; vnew [TT, H, V] (delta_fwd.vnew_dtype), h [NC + N, H, K, V]
        (delta_fwd.scan); gc [TT, H] (delta_fwd.gate_dtype) or None; dh [NC, H, K, V],
        dv2 [TT, H, V] (reverse_scan); do [TT, H, V]; cfg: launch choices.
    Returns: dq [TT, H, K] in q's dtype; dk_part, dw [TT, H, K] in grad_dtype; db [TT, H]
        float32 (None when ungated).
    """
    TT, H, K = q.shape
    V = do.shape[-1]
    dev = q.device
    dq = alloc.empty(TT, H, K, dtype=q.dtype, device=dev)
    dk_part = alloc.empty(TT, H, K, dtype=grad_dtype(q.dtype, cfg), device=dev)
    dw = alloc.empty(TT, H, K, dtype=grad_dtype(q.dtype, cfg), device=dev)
    BK = head_tile(K, 64)
    NK = triton.cdiv(K, BK)
    BV = head_tile(V, cfg.grads_qk_tile_bv_gated if gc is not None else cfg.grads_qk_tile_bv)
    # db as one share per K tile [NK, TT, H], summed below (no atomics)
    db = alloc.empty(NK, TT, H, dtype=torch.float32, device=dev) if gc is not None else None
    if layout.NT:
        delta_bwd_dqk_kernel[(layout.NT, H, NK)](
            q, k, vnew, gc if gc is not None else vnew, h, dh, do, dv2, dq, dk_part, dw,
            db if db is not None else dw, layout.cu, layout.tile_seq, layout.tile_idx,
            scale, TT, H, K=K, V=V, BT=BT, BK=BK, BV=BV,
            GATE=gate_of(gc), PREC=dot_precision(q.dtype),
            # float32 inputs ("ieee" dots) on 8 warps: on 4, sm_90 spills 7.4 - 9.5 KB
            **{**cfg.launch["grads_qk"],
               **(dict(num_warps=8) if q.dtype == torch.float32 else {})})
    if db is not None:
        db = db[0] if NK == 1 else db.sum(0)               # [TT, H]: the K tiles' shares
    return dq, dk_part, dw, db


def grads_wy(k, v, beta, g, gc, tinv, dw, dv2, dk_part, db, layout,
             cfg: DeltaConfig = DEFAULT):
    """dk, dv, dbeta, dg through the WY/UT transform (and dg from every decay).

    Args: k [TT, H, K], v [TT, H, V], beta, g [TT, H] (inputs; g may be None); gc [TT, H],
        tinv [TT, H, BT] (delta_fwd.prep); dw, dk_part [TT, H, K], db [TT, H] (grads_qk);
        dv2 [TT, H, V] (reverse_scan); cfg: launch choices.
    Returns: dk, dv (k's and v's dtypes), dbeta (beta's dtype), dg (g's dtype, or None).
    """
    TT, H, K = k.shape
    V = v.shape[-1]
    dev = k.device
    dk = alloc.empty(TT, H, K, dtype=k.dtype, device=dev)
    dv = alloc.empty(TT, H, V, dtype=v.dtype, device=dev)
    dbeta = alloc.empty(TT, H, dtype=beta.dtype, device=dev)
    dg = alloc.empty(TT, H, dtype=g.dtype, device=dev) if g is not None else None
    BK = head_tile(K, 64)
    if layout.NT:
        delta_bwd_wy_kernel[(layout.NT, H)](
            k, v, beta, gc if gc is not None else dw, tinv, dw, dv2, dk_part,
            db if db is not None else dw, dk, dv, dbeta, dg if dg is not None else dbeta,
            layout.cu, layout.tile_seq, layout.tile_idx,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=head_tile(V, 64), GATE=gate_of(g),
            PREC=dot_precision(k.dtype),
            SPLIT16=split16_on(cfg.grads_wy_split16, cfg, k, dw, dv2)
            and BK >= cfg.grads_wy_split16_min_bk,
            # float32 inputs ("ieee" dots) keep 8 warps: on 4, sm_90 spills ~9 KB (the sweep
            # timed 16-bit inputs only)
            **{**cfg.launch["grads_wy"],
               **(dict(num_warps=8) if k.dtype == torch.float32 else {})})
    return dk, dv, dbeta, dg


def boundary_states_db(db, gc, h, dh, initial_state, dfinal, layout):
    """db with the state update's exp(b_L) <S, dS'> taking the initial state and the final
    state's cotangent as given (float32): grads_qk reads S and dS' from h and dh, which hold
    them rounded for 16-bit inputs, and at short sequences those two roundings, summed over
    K * V products, are most of the gate gradient's error (no input rounding offsets them).
    Adds exp(b_L) <S_0 - rounded S_0, dS'> on each sequence's first chunk and
    exp(b_L) <S, dS'_final - rounded dS'_final> on its last, with the stored S and dS' (16-bit:
    the products' errors are second order; where one chunk is both, the two terms sum to the
    exact difference)."""
    ne = layout.nonempty                                                 # [N'] int64
    first = layout.chunk_off[:-1].long()[ne]
    last = layout.chunk_off[1:].long()[ne] - 1
    db = db.clone()
    if initial_state is not None:
        rest = (initial_state[ne].float() - h[first + ne].float()) * dh[first].float()
        db.index_add_(0, layout.chunk_last[first], _decayed(rest, gc, layout.chunk_last[first]))
    if dfinal is not None:
        rest = h[last + ne].float() * (dfinal[ne].float() - dh[last].float())
        db.index_add_(0, layout.chunk_last[last], _decayed(rest, gc, layout.chunk_last[last]))
    return db


def _decayed(rest, gc, tokens):
    """exp(b_L) <., .> per (sequence, head): rest [N', H, K, V] summed, times exp(b) at the
    chunks' last tokens."""
    return torch.exp(gc[tokens].float()) * rest.sum((-2, -1))


def backward(q, k, v, beta, g, do, dfinal, initial_state, layout, scale, need_dh0, kept=None,
             cfg: DeltaConfig = DEFAULT):
    """Gradients of the packed delta rule: prep and scan's outputs (kept by the forward, or
    recomputed), then reverse_scan -> grads_qk -> grads_wy.

    Every float32 intermediate is released as soon as the last kernel reading it has been
    launched (the caching allocator reuses a freed block only for later work on the same
    stream), so the peak is at grads_qk (tinv, h, vnew, dh, dv2, dq, dk_part, dw) instead of
    all of them at once. Callers must not keep references to them: this function makes them.

    Args: q, k [TT, H, K], v [TT, H, V], beta, g [TT, H] (inputs; g may be None);
        do [TT, H, V] (contiguous); dfinal [N, H, K, V] float32 or None;
        initial_state [N, H, K, V] float32 or None;
        layout: common.ChunkLayout (delta_api.chunk_layout);
        kept: None, or a list holding the forward's (gc, tinv, h, vnew) or None; it is
        emptied here, so that these buffers too are freed after their last kernel;
        cfg: launch choices (the forward's).
    Returns: dq, dk, dv (inputs' dtypes), dbeta (beta's dtype), dg (g's dtype or None),
        dh0 (initial_state's dtype, or None unless need_dh0).
    """
    kept = kept.pop() if kept else None
    if kept is None:                                       # recompute prep and scan
        gc, tinv = delta_fwd.prep(k, beta, g, layout, cfg)
        h, vnew, _ = delta_fwd.scan(k, v, beta, gc, tinv, initial_state, layout, False, cfg)
    else:
        gc, tinv, h, vnew = kept
        del kept
    dh, dv2, dh0 = reverse_scan(q, k, beta, tinv, gc, do, dfinal, initial_state, layout, scale,
                                need_dh0, cfg)
    dq, dk_part, dw, db = grads_qk(q, k, vnew, gc, h, dh, do, dv2, layout, scale, cfg)
    if db is not None and h.dtype != torch.float32:
        db = boundary_states_db(db, gc, h, dh, initial_state, dfinal, layout)
    del h, vnew, dh                                        # last read by grads_qk
    dk, dv, dbeta, dg = grads_wy(k, v, beta, g, gc, tinv, dw, dv2, dk_part, db, layout, cfg)
    return dq, dk, dv, dbeta, dg, dh0
