"""Forward chunk kernels of the gated linear-attention family (docs/design.md section 4).

One set of kernels serves every member, chosen by constexpr flags:
    GATE     common.GATE_NONE: no decay, GATE_SCALAR: a decay per (token, head) (constant
             [H] decays arrive broadcast), GATE_KEY: a decay per (token, head, key)
    HAS_KW   a key log-weight w_s (mLSTM's input gate): key s enters as exp(w_s) k_s
    MEXP     mLSTMexp: stabiliser m_t and normaliser n (implies GATE_SCALAR and HAS_KW; the
             scans carry the state alone, mexp_norm forms n beside them)
    NONCAUSAL  bidirectional attention: every token reads its sequence's total state

Tokens are packed along one axis ([TT, H, D] tensors, see common.ChunkLayout). With b the
chunk-local inclusive cumsum of the log-decay, a query t and key s of one chunk meet with
weight exp(qe_t + ke_s) where qe_t = b_t (- m_t) and ke_s = -b_s (+ w_s): the sum is formed
before exp() and masked to -inf above the diagonal, so nothing overflows. The state at the
chunk's start enters with exp(qe_t + mp) (mp: the stabiliser at the chunk start, 0 unless
MEXP); the state after the chunk is exp(le + mp) S + sum_s exp(le + ke_s) k_s v_s^T with
le = b_last (- m_last). Per-key decays take exponents relative to a reference row between
the key and the query tile, so both factors are <= 1, and form the diagonal tile elementwise.

Module order: kernels, then launchers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..alloc import empty
from .common import (GATE_KEY, GATE_NONE, GATE_SCALAR, ChunkLayout, dot, exp, fill_v_block,
                     ld_gtok, ld_raw, ld_state, ld_tile, ld_tok, sm_count)

# Globals a kernel reads must be instantiated tl.constexpr objects (not annotations).
MLSTM_EPS = tl.constexpr(1e-6)  # mLSTMexp: o = h / (max(|n^T q|, exp(-m)) + eps)
NEG_INF = tl.constexpr(float("-inf"))
# Per-key scores are formed in blocks of this many tokens (key_scores_kernel's SUB): across
# blocks on tensor cores, inside a block elementwise.
KEY_SUB = 16
# mLSTMexp's stabiliser carry scans this many chunks at a time (mexp_carry_kernel): 256 chunks
# of 128 tokens, a 32768-token sequence, in one step.
MEXP_CARRY_BLOCK = 256


def diag_dot_range(dtype: torch.dtype) -> float:
    """Per-key diagonal blocks by dots (key_diag_scores, bwd_dqk's diagonal tile): taken
    where the block's log-decays stay within this many nats of its middle row in every key
    column, so that both factors exp(+-(b - b_mid)) stay finite in the dots' operand dtype:
    e^30 for bfloat16 and float32, e^4 for float16 (largest value 65504). Elsewhere the
    block goes one key token at a time."""
    return 4.0 if dtype == torch.float16 else 30.0


# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def chunk_of(tile_seq, tile_start, cu, coff, it, L: tl.constexpr):
    """Tile it -> (first token t0, sequence end eos, chunk start cs, chunk end ce, slot of the
    state before the chunk, global chunk index)."""
    n = tl.load(tile_seq + it).to(tl.int64)
    t0 = tl.load(tile_start + it).to(tl.int64)
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    c = (t0 - bos) // L                                          # chunk index in the sequence
    cs = bos + c * L
    ce = tl.minimum(cs + L, eos)
    c0 = tl.load(coff + n).to(tl.int64)
    nc = tl.cdiv(eos - bos, L)
    return n, t0, eos, cs, ce, c0 + n + c, c0 + c, c0 + n + nc


@triton.jit
def tile_program(tile_seq, tile_start, cu, coff, L: tl.constexpr, BT: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, NONCAUSAL: tl.constexpr):
    """Where a per-tile program (grid: tile, K or V block, head) works: (its block index blk,
    head hh, the tile's first token t0, its rows and their mask mr, the sequence's end eos,
    the chunk's start cs and end ce, the slots of the states before (slot) and after (slot1)
    the chunk, the global chunk index ic). NONCAUSAL: both slots are the sequence's final
    one (every token reads the total state)."""
    tl.static_assert(L % BT == 0)
    tl.static_assert(BT >= 16 and BK >= 16 and BV >= 16)
    n, t0, eos, cs, ce, slot, ic, fslot = chunk_of(tile_seq, tile_start, cu, coff,
                                                   tl.program_id(0), L)
    slot1 = slot + 1
    if NONCAUSAL:
        slot = fslot
        slot1 = fslot
    rows = t0 + tl.arange(0, BT)
    return (tl.program_id(1), tl.program_id(2).to(tl.int64), t0, rows, rows < eos, eos, cs, ce,
            slot, slot1, ic)


@triton.jit
def state_block_of(cu, coff, H, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """A scan program (sequence * head, K block, V block) -> (i_nh = n * H + h, K block kb,
    V block vb, head hh, sequence n, its first token bos and end eos, its first chunk c0,
    the block's K columns ck and mask mk, V columns cv and mask mv)."""
    i_nh = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    vb = tl.program_id(2)
    n = i_nh // H
    hh = i_nh % H
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    c0 = tl.load(coff + n).to(tl.int64)
    ck = kb * BK + tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    return i_nh, kb, vb, hh, n, bos, eos, c0, ck, ck < K, cv, cv < V


@triton.jit
def key_exp(gb, kw, hh, rows, mask, H, HAS_KW: tl.constexpr):
    """Key exponents ke_s = -b_s (+ w_s) of the tokens rows: key s enters a later query t with
    exp(qe_t + ke_s) and the state after its chunk with exp(le + ke_s)."""
    ke = -ld_gtok(gb + hh, rows, mask, H)
    if HAS_KW:
        ke += ld_tok(kw + hh, rows, mask, H)
    return ke


@triton.jit
def chunk_end_exp(gb, gm, ce, ok, hh, H, MEXP: tl.constexpr):
    """le = b at the chunk's last token (minus the stabiliser m there for MEXP); 0 where ok is
    False (an empty chunk: nothing is read)."""
    le = tl.load(gb + (ce - 1) * H + hh, mask=ok, other=0.0)
    if MEXP:
        le = le - tl.load(gm + (ce - 1) * H + hh, mask=ok, other=0.0)
    return le


@triton.jit
def chunk_decay(gb, gm, mpc, it, bos, eos, c0, hh, H, ck, mk, K, L: tl.constexpr,
                BT: tl.constexpr, GATE: tl.constexpr, MEXP: tl.constexpr):
    """The decay over the chunk of tile it, as exponents: scalar gates (b - m at the chunk's
    last token, the chunk's shift mp (MEXP; else 0)), scalars; per-key ([BK] b at the chunk's last
    token, 0). The scans load it one tile ahead: Triton's pipeliner prefetches the loads that
    feed a dot, not one that scales only the carried state, and waiting on that load each
    step cost bwd_states 0.50 against 0.31 ms without a gate (H200, T 8192, D 128)."""
    c = it // (L // BT)
    ce = tl.minimum(bos + c * L + L, eos)
    ok = ce > bos                                   # an empty sequence has no chunk to read
    de = tl.full((), 0.0, tl.float32)
    mp = tl.full((), 0.0, tl.float32)
    if GATE == GATE_SCALAR:
        de = chunk_end_exp(gb, gm, ce, ok, hh, H, MEXP)
        if MEXP:
            mp = tl.load(mpc + (c0 + c) * H + hh, mask=ok, other=0.0)
    if GATE == GATE_KEY:
        de = tl.load(gb + ((ce - 1) * H + hh) * K + ck, mask=mk & ok, other=0.0)
    return de, mp


@triton.jit
def gate_diag(A, rows, mr, qe, ke, GATE: tl.constexpr, IEEE: tl.constexpr):
    """A tile's raw scores against itself, A[t, s] = scale q_t . k_s (fwd_o and bwd_dv form
    them in their pass over K), or their cotangents do_t . v_s (bwd_dqk) -> zero above the
    diagonal and past the sequence's end, times exp(qe_t + ke_s) for scalar gates. Per-key gates:
    key_scores_kernel."""
    causal = (rows[:, None] >= rows[None, :]) & mr[:, None] & mr[None, :]
    if GATE == GATE_SCALAR:
        return A * exp(tl.where(causal, qe[:, None] + ke[None, :], NEG_INF), IEEE)
    else:
        return tl.where(causal, A, 0.0)


@triton.jit
def mid_row_exponents(gb, bq, hh, r0, eos, mask, ck, mk, H, K, SUB: tl.constexpr,
                      DRANGE: tl.constexpr):
    """Per-key diagonal blocks by dots: the block's log-decays bq [SUB, BK] relative to its
    middle row m, e = b_t - b_m (0 where mask is off), and whether every |e| <= DRANGE, so that
    exp(b_t - b_s) = exp(e_t) exp(-e_s) has both factors finite in the dots' operand dtype
    (diag_dot_range). The block's tokens are r0 .. r0 + SUB - 1, those at or past eos masked."""
    m = tl.minimum(r0 + SUB // 2, eos - 1)
    bm = tl.load(gb + (m * H + hh) * K + ck, mask=mk, other=0.0)
    e = tl.where(mask, bq - bm[None, :], 0.0)
    return e, tl.max(tl.max(tl.abs(e), axis=1), axis=0) <= DRANGE


@triton.jit
def key_diag_cols(qt, bq, k, gb, hh, r0, eos, rows, mr, ck, mk, H, K, SUB: tl.constexpr,
                  IEEE: tl.constexpr):
    """One K block's part of a diagonal block's per-key scores, one key token s at a time:
    [SUB, SUB] float32, column s = sum_k qt_tk k_sk exp(bq_tk - b_sk) for t >= s (qt scaled,
    bq: the block's queries and their b over the K block ck)."""
    A = tl.zeros([SUB, SUB], dtype=tl.float32)
    cols = tl.arange(0, SUB)
    for j in range(SUB):
        s = r0 + j                                               # key token j of the block
        ms = s < eos
        ks = tl.load(k + (s * H + hh) * K + ck, mask=mk & ms, other=0.0).to(tl.float32)
        bs = tl.load(gb + (s * H + hh) * K + ck, mask=mk & ms, other=0.0)
        w = exp(tl.where(mr[:, None] & (rows >= s)[:, None], bq - bs[None, :], NEG_INF),
                IEEE)                                                              # [SUB, BK]
        col = tl.sum(qt * ks[None, :] * w, axis=1)                                 # A[:, j]
        A += tl.where(cols[None, :] == j, col[:, None], 0.0)
    return A


@triton.jit
def key_diag_scores(q, k, gb, hh, r0, eos, scale, H, K, SUB: tl.constexpr, BK: tl.constexpr,
                    IEEE: tl.constexpr, DRANGE: tl.constexpr):
    """Per-key scores of a block of SUB tokens against itself, float32 [SUB, SUB], zero above
    the diagonal: scale sum_k q_tk k_sk exp(b_tk - b_sk). Per-key weights are no product of a
    row and a column factor that both stay finite everywhere (b_t - b_s reaches -20 per
    token), so per K block: one dot with both sides relative to the block's middle row m where
    |b - b_m| <= DRANGE (diag_dot_range), else one key token s at a time against the block's
    queries over [SUB, BK] tiles (key_diag_cols). The block's tokens are r0 .. r0 + SUB - 1,
    those at or past eos masked."""
    A = tl.zeros([SUB, SUB], dtype=tl.float32)
    cols = tl.arange(0, SUB)
    rows = r0 + cols
    mr = rows < eos
    DT = q.dtype.element_ty
    for kb in range(tl.cdiv(K, BK)):
        ck = kb * BK + tl.arange(0, BK)
        mk = ck < K
        qt = ld_tile(q + hh * K, rows, mr, ck, mk, H * K) * scale                 # [SUB, BK]
        bq = ld_raw(gb + hh * K, rows, mr, ck, mk, H * K)
        e, fits = mid_row_exponents(gb, bq, hh, r0, eos, mr[:, None] & mk[None, :], ck, mk, H,
                                    K, SUB, DRANGE)
        if fits:
            # q_t e^(b_t - b_m) . k_s e^(b_m - b_s) on tensor cores, then causal
            kt = ld_tile(k + hh * K, rows, mr, ck, mk, H * K)
            Ab = dot((qt * exp(e, IEEE)).to(DT), tl.trans((kt * exp(-e, IEEE)).to(DT)), IEEE)
            A += tl.where((rows[:, None] >= rows[None, :]) & mr[:, None] & mr[None, :], Ab, 0.0)
        else:
            A += key_diag_cols(qt, bq, k, gb, hh, r0, eos, rows, mr, ck, mk, H, K, SUB, IEEE)
    return A


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _max_plus_combine(a1, m1, a2, m2):
    """Compose x -> max(x + a1, m1) then x -> max(x + a2, m2): the stabiliser's recurrence
    m_t = max(m_{t-1} + lf_t, i_t) is x -> max(x + lf_t, i_t) applied token after token."""
    return a1 + a2, tl.maximum(m1 + a2, m2)


@triton.jit
def mexp_chunk_kernel(lf, ig, mpc, b, m, start, csum, cmax, chunk_start, chunk_end, H,
                      L: tl.constexpr, FINAL: tl.constexpr):
    """mLSTMexp gates of one chunk and head (grid NC x H), the two ends of mexp_prep:
    b = chunk-local cumsum of logsigmoid(f) and mi_t = max over s <= t of i_s + (b_t - b_s),
    both from one max-plus scan, so that m carries the rounding of the sums since the
    maximising token, not of b_t - b_s (|b| reaches 20 L at log-decays near -20: eps * 2560
    in float32).
    FINAL False: the chunk's summary for mexp_carry_kernel, m after the chunk being
    max(mp + csum, cmax) for m before it mp: csum = b and cmax = mi at its last token.
    FINAL True: with mp = mpc[chunk] writes b, m_t = max(mp + b_t, mi_t) and start_t = 1
    where i_t itself sets the maximum (the m-path of the backward)."""
    tl.static_assert(L >= 16)
    ic = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    cs = tl.load(chunk_start + ic).to(tl.int64)                 # chunk's first token
    ce = tl.load(chunk_end + ic).to(tl.int64)                   # one past its last token
    GDT = b.dtype.element_ty                                    # float32, or float64 (gated_api.gate_dtype)
    idx = tl.arange(0, L)
    rows = cs + idx
    mr = rows < ce
    lfc = ld_tok(lf + hh, rows, mr, H).to(GDT)                  # 0 past the end
    ic_ = tl.where(mr, ld_tok(ig + hh, rows, mr, H).to(GDT), NEG_INF)
    bc, mi = tl.associative_scan((lfc, ic_), 0, _max_plus_combine)  # b_t, max-plus of i
    if FINAL:
        mp = tl.load(mpc + ic * H + hh)                         # m of the chunk's previous token
        mc = tl.maximum(mp + bc, mi)                             # m_t
        st = mr & (mi == ic_) & (ic_ >= mp + bc)                 # i_t sets the maximum
        tl.store(b + rows * H + hh, bc, mask=mr)
        tl.store(m + rows * H + hh, mc, mask=mr)
        tl.store(start + rows * H + hh, st.to(tl.int8), mask=mr)
    else:
        last = idx == ce - cs - 1                                # the chunk's last token
        tl.store(csum + ic * H + hh, tl.sum(tl.where(last, bc, 0.0), axis=0))
        tl.store(cmax + ic * H + hh, tl.sum(tl.where(last, mi, 0.0), axis=0))


@triton.jit
def mexp_carry_kernel(csum, cmax, m0, mpc, mfin, coff, H, CB: tl.constexpr, HAS_M0: tl.constexpr):
    """The stabiliser across the chunks of sequence n, head h (grid N x H): m after chunk c is
    max(m before it + csum_c, cmax_c), a max-plus recurrence over chunks, scanned CB chunks at
    a time. Writes mpc[c] = m before chunk c (m0, or 0, at the sequence start) and mfin = m
    after the last chunk."""
    tl.static_assert(CB >= 16)
    n = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    c0 = tl.load(coff + n).to(tl.int64)
    c1 = tl.load(coff + n + 1).to(tl.int64)
    GDT = mpc.dtype.element_ty
    mp = tl.zeros([], dtype=GDT)
    if HAS_M0:
        mp = tl.load(m0 + n * H + hh).to(GDT)                   # stabiliser before the sequence
    for j in range(tl.cdiv(c1 - c0, CB)):
        cb0 = c0 + j * CB
        cidx = cb0 + tl.arange(0, CB)
        mc = cidx < c1
        a = tl.load(csum + cidx * H + hh, mask=mc, other=0.0)   # (0, -inf): the identity map
        x = tl.load(cmax + cidx * H + hh, mask=mc, other=NEG_INF)
        A, X = tl.associative_scan((a, x), 0, _max_plus_combine)  # chunks cb0..c composed
        after = tl.maximum(mp + A, X)                            # m after chunk c
        tl.store(mpc + cb0 * H + hh, mp)                         # before the block's first chunk
        tl.store(mpc + (cidx + 1) * H + hh, after, mask=cidx + 1 < c1)
        mp = tl.sum(tl.where(cidx == tl.minimum(c1, cb0 + CB) - 1, after, 0.0), axis=0)
    tl.store(mfin + n * H + hh, mp)


@triton.jit
def fwd_states_kernel(k, v, gb, gm, kw, mpc, h0, h, hf, cu, coff, H,
                      K, V, L: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                      HAS_KW: tl.constexpr, MEXP: tl.constexpr, HAS_H0: tl.constexpr,
                      IEEE: tl.constexpr):
    """Sequential scan over the tiles of sequence n, head h, one [BK, BV] block of the state,
    carried in float32: writes the state before every chunk and the final state into h (in
    h's dtype: its readers' dot operand type), and the final state into hf (float32).
    mLSTMexp's normaliser n is formed outside (mexp_norm)."""
    tl.static_assert(L % BT == 0)
    tl.static_assert(BT >= 16 and BK >= 16 and BV >= 16)
    i_nh, kb, vb, hh, n, bos, eos, c0, ck, mk, cv, mv = state_block_of(cu, coff, H, K, V, BK, BV)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S = ld_state(h0 + i_nh * K * V, ck, mk, cv, mv, V)      # initial state block
    # one flat loop over the sequence's tiles (not chunks, then tiles), so that Triton's
    # pipeliner prefetches the next tile's k and v while this one's dot runs: it pipelines
    # innermost loops only. A chunk's first tile stores the state before the chunk and applies
    # the decay over the whole chunk.
    NJ: tl.constexpr = L // BT                                  # tiles per chunk
    mkv = mk[:, None] & mv[None, :]
    nt = tl.cdiv(eos - bos, BT)
    de_n, mp_n = chunk_decay(gb, gm, mpc, 0, bos, eos, c0, hh, H, ck, mk, K, L, BT, GATE, MEXP)
    for it in range(nt):
        c = it // NJ                                            # chunk of this tile
        first = (it % NJ) == 0                                  # its first tile
        slot = c0 + n + c
        sp = h + (slot * H + hh) * K * V                        # state before chunk c
        tl.store(sp + ck[:, None] * V + cv[None, :], S.to(h.dtype.element_ty), mask=mkv & first)
        cs = bos + c * L
        ce = tl.minimum(cs + L, eos)
        le, mp = de_n, mp_n                                     # this chunk's decay exponents
        if GATE != GATE_NONE:                                        # the next tile's, loaded ahead
            de_n, mp_n = chunk_decay(gb, gm, mpc, tl.minimum(it + 1, nt - 1), bos, eos, c0,
                                     hh, H, ck, mk, K, L, BT, GATE, MEXP)
        if GATE == GATE_SCALAR:
            S = S * tl.where(first, exp(le + mp, IEEE), 1.0)    # decay over the whole chunk
        if GATE == GATE_KEY:
            bl = le
            S = S * tl.where(first, exp(bl, IEEE), 1.0)[:, None]
        rows = bos + it * BT + tl.arange(0, BT)
        mr = rows < ce
        vt = ld_tile(v + hh * V, rows, mr, cv, mv, H * V)       # [BT, BV]
        if GATE == GATE_NONE:
            # k^T read as a [BK, BT] tile in k's dtype, straight into the dot: a float32 k
            # transposed in registers made the pipeliner leave its load synchronous, and the
            # scan took 142 registers (3 programs per SM)
            kT = tl.load(k + hh * K + rows[None, :] * (H * K) + ck[:, None],
                         mask=mk[:, None] & mr[None, :], other=0.0)
        else:
            kt = ld_tile(k + hh * K, rows, mr, ck, mk, H * K)   # [BT, BK]
        if GATE == GATE_SCALAR:
            ke = key_exp(gb, kw, hh, rows, mr, H, HAS_KW)
            kt = kt * exp(tl.where(mr, le + ke, NEG_INF), IEEE)[:, None]
        if GATE == GATE_KEY:
            bk = ld_raw(gb + hh * K, rows, mr, ck, mk, H * K)
            kt = kt * exp(tl.where(mr[:, None], bl[None, :] - bk, NEG_INF), IEEE)
        if GATE == GATE_NONE:
            S += dot(kT, vt.to(v.dtype.element_ty), IEEE)
        else:
            S += dot(tl.trans(kt).to(v.dtype.element_ty), vt.to(v.dtype.element_ty), IEEE)
    slot = c0 + n + tl.cdiv(eos - bos, L)                        # final state
    sp = h + (slot * H + hh) * K * V
    tl.store(sp + ck[:, None] * V + cv[None, :], S.to(h.dtype.element_ty), mask=mkv)
    tl.store(hf + i_nh * K * V + ck[:, None] * V + cv[None, :], S, mask=mkv)


@triton.jit
def key_scores_kernel(q, k, gb, A, tile_seq, tile_start, cu, coff, scale, H, K,
                      L: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr,
                      IEEE: tl.constexpr, DRANGE: tl.constexpr):
    """Per-key scores inside one tile (first token t0): A[t, h, s - t0] = scale sum_k q_tk
    k_sk exp(b_tk - b_sk) for the keys s <= t of t's tile, one [SUB, SUB] block (query block
    i, key block j <= i) per program, so that each program is a short chain (the kernel is
    latency-bound: many small independent programs hide it best). Blocks left of the diagonal
    go through tensor cores with both factors taken relative to the query block's first row r:
    exp(b_t - b_r) <= 1 for t >= r and exp(b_r - b_s) <= 1 for s < r, so neither overflows;
    diagonal blocks by dots relative to their middle row where the decays allow, else one key
    token at a time (key_diag_scores).
    Entries above the diagonal are not written: readers mask them."""
    NSUB: tl.constexpr = BT // SUB
    it = tl.program_id(0)
    i = tl.program_id(1) // NSUB                                 # query block of the tile
    j = tl.program_id(1) % NSUB                                  # key block
    hh = tl.program_id(2).to(tl.int64)
    n, t0, eos, cs, ce, slot, ic, fslot = chunk_of(tile_seq, tile_start, cu, coff, it, L)
    r0 = t0 + i * SUB                                            # the query block's first row
    if (j <= i) & (r0 < eos):
        DT = q.dtype.element_ty
        cols = tl.arange(0, SUB)
        rows = r0 + cols
        mr = rows < eos
        out = A + (rows[:, None] * H + hh) * BT + (j * SUB + cols)[None, :]   # block (i, j) of A
        if j < i:
            # every key of block j precedes r0: one [SUB, SUB] dot per K block
            krows = t0 + j * SUB + cols
            Ab = tl.zeros([SUB, SUB], dtype=tl.float32)
            for kb in range(tl.cdiv(K, BK)):
                ck = kb * BK + tl.arange(0, BK)
                mk = ck < K
                br = tl.load(gb + (r0 * H + hh) * K + ck, mask=mk, other=0.0)       # b_r
                qt = ld_tile(q + hh * K, rows, mr, ck, mk, H * K) * scale
                bq = ld_raw(gb + hh * K, rows, mr, ck, mk, H * K)
                kt = ld_tile(k + hh * K, krows, krows < eos, ck, mk, H * K)
                bk = ld_raw(gb + hh * K, krows, krows < eos, ck, mk, H * K)
                qt = qt * exp(tl.where(mr[:, None], bq - br[None, :], NEG_INF), IEEE)  # <= 1
                kt = kt * exp(br[None, :] - bk, IEEE)                                # <= 1
                Ab += dot(qt.to(DT), tl.trans(kt.to(DT)), IEEE)
        else:
            # the diagonal block, causal
            Ab = key_diag_scores(q, k, gb, hh, r0, eos, scale, H, K, SUB, BK, IEEE, DRANGE)
        tl.store(out, Ab.to(A.dtype.element_ty), mask=mr[:, None])


@triton.jit
def ld_scores(Asc, hh, rows, mr, t0, H, BT: tl.constexpr):
    """float32 [BT, BT] per-key scores of a tile (key_scores_kernel's A), zero above the
    diagonal and past the sequence's end."""
    cols = tl.arange(0, BT)
    keep = mr[:, None] & (rows[:, None] >= (t0 + cols)[None, :])
    return tl.load(Asc + (rows[:, None] * H + hh) * BT + cols[None, :], mask=keep,
                   other=0.0).to(tl.float32)


@triton.jit
def ld_query(q, hh, rows, mr, ck, mk, scale, H, K, SCALE_AFTER: tl.constexpr):
    """float32 [len(rows), len(ck)] tile of q [TT, H, K], times scale unless SCALE_AFTER (then
    fwd_o scales the dots' results)."""
    qt = ld_tile(q + hh * K, rows, mr, ck, mk, H * K)
    if not SCALE_AFTER:
        qt = qt * scale
    return qt


@triton.jit
def fwd_o_kernel(q, k, v, gb, gm, kw, mpc, h, hn, Asc, o, qn, tile_seq, tile_start, cu, coff,
                 scale, H, K, V, L: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                 HAS_KW: tl.constexpr, MEXP: tl.constexpr, NONCAUSAL: tl.constexpr,
                 IEEE: tl.constexpr, SCALE_AFTER: tl.constexpr):
    """Output of one query tile (BT tokens), one block of V: the chunk-start state's part
    plus the causal part of the keys of this chunk up to the tile (tile by tile; per-key gates read
    the tile's own scores from Asc, key_scores_kernel's output)."""
    vb, hh, t0, rows, mr, eos, cs, ce, slot, slot1, ic = tile_program(
        tile_seq, tile_start, cu, coff, L, BT, BK, BV, NONCAUSAL)
    # operand types of the dots: the scores and the state's part in q's and h's stored dtype
    # (the same as v's in the gated family), the values' part in v's. The delta rule passes
    # float32 U' as v with 16-bit q, k and h: their dots take 16-bit operands, exact products,
    # with the scale applied to their float32 results (SCALE_AFTER) so that q enters unrounded.
    # The gated family scales q first (its mLSTMexp bf16 test sits near the normaliser's kink,
    # where the other order flips a token's branch: o error 28 against a bound of 26)
    tl.static_assert(not (SCALE_AFTER and MEXP), "n^T q (MEXP) takes the scale with q")
    DT = v.dtype.element_ty
    DQ = q.dtype.element_ty
    DS = h.dtype.element_ty
    cv = vb * BV + tl.arange(0, BV)
    mv = cv < V
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    accn = tl.zeros([BT], dtype=tl.float32)                     # n_t^T q_t (MEXP)
    qe = tl.zeros([BT], dtype=tl.float32)
    ke = tl.zeros([BT], dtype=tl.float32)
    if GATE == GATE_SCALAR:
        qe = ld_gtok(gb + hh, rows, mr, H)                       # query exponent b_t (- m_t)
        ke = key_exp(gb, kw, hh, rows, mr, H, HAS_KW)           # key exponent -b_s (+ w_s)
        mp = 0.0
        if MEXP:
            qe -= ld_gtok(gm + hh, rows, mr, H)
            mp = tl.load(mpc + ic * H + hh)
        wq = exp(tl.where(mr, qe + mp, NEG_INF), IEEE)             # weight of the chunk-start state
    # 1) the state before the chunk, o += (q S) exp(qe + mp) (a row weight, applied after the
    #    dot), and in the same pass over K the tile's own raw scores q k^T (no gate, scalar gates)
    OWN: tl.constexpr = (not NONCAUSAL) and GATE != GATE_KEY
    Ad = tl.zeros([BT, BT], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BK)):
        ck = kb * BK + tl.arange(0, BK)
        mk = ck < K
        qt = ld_query(q, hh, rows, mr, ck, mk, scale, H, K, SCALE_AFTER)
        qs = qt
        if GATE == GATE_KEY:
            bq = ld_raw(gb + hh * K, rows, mr, ck, mk, H * K)
            qs = qt * exp(tl.where(mr[:, None], bq, NEG_INF), IEEE)
        S = ld_state(h + (slot * H + hh) * K * V, ck, mk, cv, mv, V)
        acc += dot(qs.to(DS), S.to(DS), IEEE)
        if MEXP:
            nprev = tl.load(hn + (slot * H + hh) * K + ck, mask=mk, other=0.0)
            accn += tl.sum(qt * nprev[None, :], axis=1)
        if OWN:
            kt = ld_tile(k + hh * K, rows, mr, ck, mk, H * K)
            Ad += dot(qt.to(DQ), tl.trans(kt.to(DQ)), IEEE)
    if SCALE_AFTER:
        Ad = Ad * scale
        acc = acc * scale
    if GATE == GATE_SCALAR:
        acc = acc * wq[:, None]
        accn = accn * wq
    if not NONCAUSAL:
        # 2) the diagonal tile, causal mask t >= s (per-key: formed by key_scores_kernel),
        #    first, so that Ad is dead before the earlier tiles' scores are formed
        if GATE == GATE_KEY:
            A = ld_scores(Asc, hh, rows, mr, t0, H, BT)
        else:
            A = gate_diag(Ad, rows, mr, qe, ke, GATE, IEEE)
        vt = ld_tile(v + hh * V, rows, mr, cv, mv, H * V)
        acc += dot(A.to(DT), vt.to(DT), IEEE)
        if MEXP:
            accn += tl.sum(A, axis=1)
        # 3) earlier key tiles of this chunk (every key before every query)
        for j in range((t0 - cs) // BT):
            krows = cs + j * BT + tl.arange(0, BT)
            A = tl.zeros([BT, BT], dtype=tl.float32)
            for kb in range(tl.cdiv(K, BK)):
                ck = kb * BK + tl.arange(0, BK)
                mk = ck < K
                qt = ld_query(q, hh, rows, mr, ck, mk, scale, H, K, SCALE_AFTER)
                kt = ld_tile(k + hh * K, krows, krows < eos, ck, mk, H * K)
                if GATE == GATE_KEY:
                    br = tl.load(gb + ((t0 - 1) * H + hh) * K + ck, mask=mk, other=0.0)
                    bq = ld_raw(gb + hh * K, rows, mr, ck, mk, H * K)
                    bk = ld_raw(gb + hh * K, krows, krows < eos, ck, mk, H * K)
                    qt = qt * exp(tl.where(mr[:, None], bq - br[None, :], NEG_INF), IEEE)
                    kt = kt * exp(br[None, :] - bk, IEEE)           # reference t0-1 >= every key
                A += dot(qt.to(DQ), tl.trans(kt.to(DQ)), IEEE)
            if SCALE_AFTER:
                A = A * scale
            if GATE == GATE_SCALAR:
                kej = key_exp(gb, kw, hh, krows, krows < eos, H, HAS_KW)
                A = A * exp(tl.where(mr[:, None], qe[:, None] + kej[None, :], NEG_INF), IEEE)
            vt = ld_tile(v + hh * V, krows, krows < eos, cv, mv, H * V)
            acc += dot(A.to(DT), vt.to(DT), IEEE)
            if MEXP:
                accn += tl.sum(A, axis=1)
    if MEXP:
        # normaliser: o = h / (max(|n^T q|, exp(-m)) + eps)
        mt = ld_gtok(gm + hh, rows, mr, H)
        den = tl.maximum(tl.abs(accn), exp(-mt, IEEE)) + MLSTM_EPS
        acc = acc / den[:, None]
        tl.store(qn + rows * H + hh, accn, mask=mr & (vb == 0))
    tl.store(o + (rows[:, None] * H + hh) * V + cv[None, :], acc.to(o.dtype.element_ty),
             mask=mr[:, None] & mv[None, :])


# ----------------------------------------------------------------------------- launchers

def mexp_prep(lf, ig, m0, layout: ChunkLayout, gate_dtype=torch.float32,
              carry_block: int = MEXP_CARRY_BLOCK):
    """mLSTMexp gates: lf, ig [TT, H] float32, m0 [N, H] or None ->
    b, m [TT, H] and mpc [NC, H] in gate_dtype, start [TT, H] int8, mfin [N, H] float32.
    Three launches, none of them a loop over a sequence's tokens: every chunk's summary, the
    stabiliser's carry across chunks (carry_block chunks a step), every chunk's b, m and
    start."""
    TT, H = lf.shape
    dev = lf.device
    b = empty(TT, H, dtype=gate_dtype, device=dev)
    m = empty(TT, H, dtype=gate_dtype, device=dev)
    start = torch.zeros(TT, H, dtype=torch.int8, device=dev)
    NC = max(layout.NC, 1)
    mpc = empty(NC, H, dtype=gate_dtype, device=dev)
    csum = empty(NC, H, dtype=gate_dtype, device=dev)
    cmax = empty(NC, H, dtype=gate_dtype, device=dev)
    mfin = empty(layout.N, H, dtype=torch.float32, device=dev)
    chunk_args = (lf, ig, mpc, b, m, start, csum, cmax, layout.chunk_start, layout.chunk_end, H)
    if layout.NC:
        mexp_chunk_kernel[(layout.NC, H)](*chunk_args, L=layout.L, FINAL=False)
    mexp_carry_kernel[(layout.N, H)](csum, cmax, m0 if m0 is not None else lf, mpc, mfin,
                                     layout.chunk_off, H, CB=carry_block,
                                     HAS_M0=m0 is not None)
    if layout.NC:
        mexp_chunk_kernel[(layout.NC, H)](*chunk_args, L=layout.L, FINAL=True)
    return b, m, start, mpc, mfin


def fwd_states(k, v, gb, gm, kw, mpc, h0, layout: ChunkLayout, cfg):
    """States before every chunk and at every sequence's end: h [slots, H, K, V] in
    state_dtype, and each sequence's final state hf [N, H, K, V] float32. k [TT, H, K],
    v [TT, H, V]. (mLSTMexp's normaliser: mexp_norm.forward.)"""
    TT, H, K = k.shape
    V = v.shape[-1]
    h = empty(layout.n_slots, H, K, V, dtype=state_dtype(cfg, k.dtype), device=k.device)
    hf = empty(layout.N, H, K, V, dtype=torch.float32, device=k.device)
    BVS = fill_v_block(cfg.BVS, V, layout.N * H * triton.cdiv(K, cfg.BK), sm_count(k.device))
    grid = (layout.N * H, triton.cdiv(K, cfg.BK), triton.cdiv(V, BVS))
    x = k  # placeholder pointer for absent optional tensors
    fwd_states_kernel[grid](
        k, v, _or(gb, x), _or(gm, x), _or(kw, x), _or(mpc, x), _or(h0, x), h, hf, layout.cu,
        layout.chunk_off, H, K=K, V=V, L=layout.L, BT=layout.BT, BK=cfg.BK, BV=BVS,
        GATE=cfg.gate, HAS_KW=cfg.has_kw, MEXP=cfg.mexp, HAS_H0=h0 is not None, IEEE=cfg.ieee,
        num_warps=cfg.scan_warps, num_stages=cfg.scan_num_stages,
        maxnreg=cfg.fwd_scan_maxnreg or None)
    return h, hf


def state_dtype(cfg, dtype: torch.dtype) -> torch.dtype:
    """dtype of the stored chunk states h (and of their gradients dh): float32 for float32
    inputs; for 16-bit inputs their dtype, because every reader but one rounds a state to it
    before its dot (fwd_o, bwd_dqk; bwd_dv for dh), so storing it rounded gives the same
    results for half the bytes (at T 8192, D 128, B*T 65536: 512 -> 256 MiB, read three
    times per fwd+bwd). The scans carry the state in float32 across chunks; the final state
    is returned in float32 (hf); the one reader of the rounded value is bwd_states' <dS, S>
    for the gate gradient, a sum of K*V products whose rounding errors average out (the
    initial state's, which no input rounding offsets, gated_api._initial_state_sdot takes
    back out)."""
    return torch.float32 if cfg.ieee else dtype


def key_scores(q, k, gb, layout: ChunkLayout, cfg, scale, defined: bool = False):
    """Per-key gates' intra-tile scores A [TT, H, BT] in q's dtype (what their readers' dots
    round them to): A[t, h, s - t0] for the keys s <= t of t's tile (first token t0), scale
    included; the sub-tiles above the diagonal are left unwritten (nothing reads them), or
    zero with defined=True (A is then an output of a custom op, which must not depend on
    leftover memory)."""
    TT, H, K = q.shape
    if layout.BT % KEY_SUB:
        raise ValueError(f"per-key gates need tiles of a multiple of {KEY_SUB} tokens, got {layout.BT}")
    A = (torch.zeros if defined else empty)(TT, H, layout.BT, dtype=q.dtype, device=q.device)
    if layout.NT:
        key_scores_kernel[(layout.NT, (layout.BT // KEY_SUB) ** 2, H)](
            q, k, gb, A, layout.tile_seq, layout.tile_start, layout.cu, layout.chunk_off, scale,
            H, K=K, L=layout.L, BT=layout.BT, SUB=KEY_SUB, BK=cfg.BK, IEEE=cfg.ieee,
            DRANGE=diag_dot_range(q.dtype),
            num_warps=cfg.score_warps or cfg.warps,
            num_stages=cfg.stages)
    return A


def fwd_o(q, k, v, gb, gm, kw, mpc, h, hn, layout: ChunkLayout, cfg, scale, out_dtype=None,
          A=None):
    """o [TT, H, V] in out_dtype (default v's dtype), and qn = n^T q [TT, H] float32 for MEXP
    (else None). The dots take v's dtype (the delta rule passes float32 values U'). A: the
    per-key scores (key_scores) for GATE_KEY."""
    TT, H, K = q.shape
    V = v.shape[-1]
    o = empty(TT, H, V, dtype=out_dtype or v.dtype, device=v.device)
    qn = empty(TT, H, dtype=torch.float32, device=v.device) if cfg.mexp else None
    if layout.NT:
        x = q
        fwd_o_kernel[(layout.NT, triton.cdiv(V, cfg.BV), H)](
            q, k, v, _or(gb, x), _or(gm, x), _or(kw, x), _or(mpc, x), h, _or(hn, x), _or(A, x), o,
            _or(qn, x),
            layout.tile_seq, layout.tile_start, layout.cu, layout.chunk_off, scale, H,
            K=K, V=V, L=layout.L, BT=layout.BT, BK=cfg.BK, BV=cfg.BV, GATE=cfg.gate,
            HAS_KW=cfg.has_kw, MEXP=cfg.mexp, NONCAUSAL=cfg.noncausal, IEEE=cfg.ieee,
            SCALE_AFTER=v.dtype != q.dtype, num_warps=cfg.warps, num_stages=cfg.stages)
    return o, qn


def _or(x, fallback):
    """A tensor for a pointer argument the kernel never reads (its flag is off)."""
    return fallback if x is None else x
