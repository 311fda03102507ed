"""Backward chunk kernels of the gated linear-attention family (flags as in gated_fwd).

With do~ = do (/ d_t for mLSTMexp) and dqn the cotangent of n^T q (mLSTMexp), per chunk:
    dS_c  = exp(le + mp) dS_{c+1} + sum_t exp(qe_t + mp) scale q_t do~_t^T     (reverse scan)
    dq_t  = scale [exp(qe_t + mp) (S_c do~_t + dqn_t n_c) + sum_{s<=t} dA_ts exp(qe_t + ke_s) k_s]
    dk_s  = exp(le + ke_s) (dS_{c+1} v_s + dn_{c+1}) + scale sum_{t>=s} dA_ts exp(qe_t + ke_s) q_t
    dv_s  = exp(le + ke_s) dS_{c+1}^T k_s + scale sum_{t>=s} (q_t . k_s) exp(qe_t + ke_s) do~_t
with dA_ts = do~_t . v_s (+ dqn_t). The gates' gradient follows from the exponents: every
term holding q_t carries +b_t, every term holding k_s carries -b_s (+w_s), and the state
after a chunk carries +b_last, so db_t = q_t . dq_t - k_t . dk_t (+ <dS, S> after the chunk
at its last token) and dw_s = k_s . dk_s; dg is the chunk-local reverse cumsum of db. Summed
that way, large terms cancel (each token's pairing with itself appears in both q.dq and k.dk;
the state part of k.dk cancels against <dS, S>), which costs bf16 gradients their precision
at strong decays. So the kernels write the sums without the same-token terms, the state part
of k.dk apart, and sdot = <exp(le + mp) dS_{c+1}, S_c>; the launcher (gated_api._gate_grad)
forms dg_t = revcumsum(q.dq - k.dk)_t + sdot + sum of the state parts of the keys before t
(the same value). Every output element is written by exactly one program: no atomics,
bitwise deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..alloc import empty
from .common import (GATE_KEY, GATE_NONE, GATE_SCALAR, ChunkLayout, dot, exp, fill_v_block,
                     ld_gtok, ld_raw, ld_state, ld_tile, ld_tok, sm_count)
from .gated_fwd import (NEG_INF, _or, chunk_decay, chunk_end_exp, diag_dot_range,
                        gate_diag, key_exp, ld_scores, mid_row_exponents, state_block_of,
                        state_dtype, tile_program)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def chunk_start_state(h, it, nt, c0, n, hh, H, K, V, ck, mk, cv, mv, NJ: tl.constexpr):
    """For bwd_states' <dS, S>: the state before tile it's chunk, S_c [BK, BV] float32, if
    tile it is the chunk's last, else zeros (masked loads move no bytes). Loaded in the step
    that uses it: loaded a tile ahead it took 32 more registers (bwd_states 0.69 -> 0.62 ms
    with a scalar gate, H200), which the register cap that fits 4 programs per SM
    (KernelConfig.bwd_scan_maxnreg) turns into spills."""
    c = it // NJ
    last = (it == tl.minimum((c + 1) * NJ, nt) - 1) & (it >= 0)
    slot = c0 + n + c                                           # the state before chunk c
    return tl.load(h + (slot * H + hh) * K * V + ck[:, None] * V + cv[None, :],
                   mask=mk[:, None] & mv[None, :] & last, other=0.0).to(tl.float32)


@triton.jit
def bwd_states_kernel(q, do, gb, gm, mpc, rd, dht, dh, dh0, h, sdot,
                      cu, coff, scale, H, NS, K, V, L: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      GATE: tl.constexpr, MEXP: tl.constexpr, HAS_DHT: tl.constexpr,
                      HAS_H0: tl.constexpr, NONCAUSAL: tl.constexpr, IEEE: tl.constexpr,
                      SDOT: tl.constexpr):
    """Reverse scan over the chunks of sequence n, head h, one [BK, BV] block: writes the
    gradient of the state after every chunk (slot c + 1) and of the initial state (slot 0);
    NONCAUSAL sums q^T do over the sequence into the final slot. For the gates' gradient (SDOT)
    it also writes <dS_{c+1}, exp(le + mp) S_c> of every chunk c (summed over this block's V,
    and over its K too for scalar gates) into sdot, at the slot of the state after the chunk.
    mLSTMexp's normaliser's cotangent dn is formed outside (mexp_norm)."""
    tl.static_assert(L % BT == 0)
    tl.static_assert(BT >= 16 and BK >= 16 and BV >= 16)
    i_nh, kb, vb, hh, n, bos, eos, c0, ck, mk, cv, mv = state_block_of(cu, coff, H, K, V, BK, BV)
    nc = tl.cdiv(eos - bos, L)
    mkv = mk[:, None] & mv[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS = ld_state(dht + i_nh * K * V, ck, mk, cv, mv, V)    # cotangent of the final state
    # one flat loop over the sequence's tiles in reverse (see fwd_states_kernel: Triton
    # pipelines innermost loops only); the first tile visited of a chunk (its last) stores
    # the gradient of the state after the chunk, applies the chunk's decay and forms sdot
    NJ: tl.constexpr = L // BT                                  # tiles per chunk
    nt = tl.cdiv(eos - bos, BT)
    de_n, mp_n = chunk_decay(gb, gm, mpc, nt - 1, bos, eos, c0, hh, H, ck, mk, K, L, BT, GATE,
                             MEXP)
    GRAD_SDOT: tl.constexpr = GATE != GATE_NONE and SDOT
    for it2 in range(nt):
        it = nt - 1 - it2                                       # tiles in reverse
        c = it // NJ                                            # chunk of this tile
        first = it == tl.minimum((c + 1) * NJ, nt) - 1          # the chunk's last tile
        slot = c0 + n + c + 1
        if not NONCAUSAL:
            tl.store(dh + (slot * H + hh) * K * V + ck[:, None] * V + cv[None, :], dS,
                     mask=mkv & first)
        cs = bos + c * L
        ce = tl.minimum(cs + L, eos)
        le, mp = de_n, mp_n                                     # this chunk's decay exponents
        if GATE != GATE_NONE:                                        # the next tile's, loaded ahead
            de_n, mp_n = chunk_decay(gb, gm, mpc, tl.maximum(it - 1, 0), bos, eos, c0, hh, H,
                                     ck, mk, K, L, BT, GATE, MEXP)
        if GATE == GATE_SCALAR:
            dS = dS * tl.where(first, exp(le + mp, IEEE), 1.0)  # back through the chunk's decay
        if GATE == GATE_KEY:
            dS = dS * tl.where(first, exp(le, IEEE), 1.0)[:, None]
        if GRAD_SDOT:
            # <dS_{c+1}, decay * S_c>: the state path's share of the chunk-end gate gradient
            Sp = chunk_start_state(h, it, nt, c0, n, hh, H, K, V, ck, mk, cv, mv, NJ)
            rs = tl.sum(dS * Sp, axis=1)                                          # [BK]
            if GATE == GATE_SCALAR:
                tl.store(sdot + ((kb * tl.num_programs(2) + vb) * NS + slot) * H + hh,
                         tl.sum(rs, axis=0), mask=first)
            else:
                tl.store(sdot + ((vb * NS + slot) * H + hh) * K + ck, rs, mask=mk & first)
        rows = bos + it * BT + tl.arange(0, BT)
        mr = rows < ce
        qt = ld_tile(q + hh * K, rows, mr, ck, mk, H * K) * scale
        if GATE == GATE_SCALAR:
            qe = ld_gtok(gb + hh, rows, mr, H)
            if MEXP:
                qe -= ld_gtok(gm + hh, rows, mr, H)
            qt = qt * exp(tl.where(mr, qe + mp, NEG_INF), IEEE)[:, None]
        if GATE == GATE_KEY:
            bq = ld_raw(gb + hh * K, rows, mr, ck, mk, H * K)
            qt = qt * exp(tl.where(mr[:, None], bq, NEG_INF), IEEE)
        dot_ = ld_tile(do + hh * V, rows, mr, cv, mv, H * V)
        if MEXP:
            dot_ = dot_ * ld_tok(rd + hh, rows, mr, H)[:, None]
        if MEXP and HAS_H0:
            # float32 operands (tf32 products for 16-bit inputs): d C0 . C0 and d n0 . n0
            # cancel to d m0, and dn is summed in float32 (mexp_norm), so dS must not be
            # rounded coarser (without an initial state there is no d m0: 16-bit operands,
            # 0.6 ms less)
            dS += dot(tl.trans(qt), dot_, IEEE)
        else:
            dS += dot(tl.trans(qt).to(do.dtype.element_ty), dot_.to(do.dtype.element_ty), IEEE)
    slot = c0 + n
    if NONCAUSAL:
        slot = c0 + n + nc
    tl.store(dh + (slot * H + hh) * K * V + ck[:, None] * V + cv[None, :], dS, mask=mkv)
    if HAS_H0:
        tl.store(dh0 + i_nh * K * V + ck[:, None] * V + cv[None, :], dS, mask=mkv)


@triton.jit
def bwd_dv_kernel(q, k, do, gb, gm, kw, rd, dh, Asc, dv, tile_seq, tile_start, cu, coff, scale, H,
                  K, V, L: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                  HAS_KW: tl.constexpr, MEXP: tl.constexpr, NONCAUSAL: tl.constexpr,
                  IEEE: tl.constexpr):
    """dv of one key tile (BT tokens), one block of V: through the state after the chunk,
    then from the query tiles of the chunk at and after this one."""
    vb, hh, t0, rows, mr, eos, cs, ce, slot, slot1, ic = tile_program(
        tile_seq, tile_start, cu, coff, L, BT, BK, BV, NONCAUSAL)
    DT = do.dtype.element_ty
    cv = vb * BV + tl.arange(0, BV)
    mv = cv < V
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    ke = tl.zeros([BT], dtype=tl.float32)
    if GATE == GATE_SCALAR:
        ke = key_exp(gb, kw, hh, rows, mr, H, HAS_KW)
        le = chunk_end_exp(gb, gm, ce, True, hh, H, MEXP)        # a tile's chunk is not empty
        wk = exp(tl.where(mr, le + ke, NEG_INF), IEEE)             # weight into the next state
    # 1) through the state after the chunk, dv += (k dS_{c+1}) exp(le + ke) (a row weight,
    #    applied after the dot), and in the same pass over K the tile's own raw scores q k^T
    #    (no gate, scalar gates)
    OWN: tl.constexpr = (not NONCAUSAL) and GATE != GATE_KEY
    Ad = tl.zeros([BT, BT], dtype=tl.float32)                  # [query, key]
    for kb in range(tl.cdiv(K, BK)):
        ck = kb * BK + tl.arange(0, BK)
        mk = ck < K
        kt = ld_tile(k + hh * K, rows, mr, ck, mk, H * K)
        ks = kt
        if GATE == GATE_KEY:
            bl = tl.load(gb + ((ce - 1) * H + hh) * K + ck, mask=mk, other=0.0)
            bk = ld_raw(gb + hh * K, rows, mr, ck, mk, H * K)
            ks = kt * exp(tl.where(mr[:, None], bl[None, :] - bk, NEG_INF), IEEE)
        dS = ld_state(dh + (slot1 * H + hh) * K * V, ck, mk, cv, mv, V)
        acc += dot(ks.to(DT), dS.to(DT), IEEE)
        if OWN:
            qt = ld_tile(q + hh * K, rows, mr, ck, mk, H * K) * scale
            Ad += dot(qt.to(DT), tl.trans(kt.to(DT)), IEEE)
    if GATE == GATE_SCALAR:
        acc = acc * wk[:, None]
    if not NONCAUSAL:
        # 2) the diagonal tile (per-key: the forward's scores), first, so that Ad is dead
        #    before the later tiles' scores are formed
        if GATE == GATE_KEY:
            A = ld_scores(Asc, hh, rows, mr, t0, H, BT)
        else:
            qe = tl.zeros([BT], dtype=tl.float32)
            if GATE == GATE_SCALAR:
                qe = ld_gtok(gb + hh, rows, mr, H)
                if MEXP:
                    qe -= ld_gtok(gm + hh, rows, mr, H)
            A = gate_diag(Ad, rows, mr, qe, ke, GATE, IEEE)
        dot_ = ld_tile(do + hh * V, rows, mr, cv, mv, H * V)
        if MEXP:
            dot_ = dot_ * ld_tok(rd + hh, rows, mr, H)[:, None]
        acc += dot(tl.trans(A).to(DT), dot_.to(DT), IEEE)
        # 3) later query tiles of the chunk: dv += A^T do~ (reference row: this tile's end)
        for i in range(tl.cdiv(ce - t0, BT) - 1):
            qrows = t0 + (i + 1) * BT + tl.arange(0, BT)
            mq = qrows < ce
            A = tl.zeros([BT, BT], dtype=tl.float32)           # [query, key]
            for kb in range(tl.cdiv(K, BK)):
                ck = kb * BK + tl.arange(0, BK)
                mk = ck < K
                qt = ld_tile(q + hh * K, qrows, mq, ck, mk, H * K) * scale
                kt = ld_tile(k + hh * K, rows, mr, ck, mk, H * K)
                if GATE == GATE_KEY:
                    br = tl.load(gb + ((t0 + BT - 1) * H + hh) * K + ck, mask=mk, other=0.0)
                    bq = ld_raw(gb + hh * K, qrows, mq, ck, mk, H * K)
                    bk = ld_raw(gb + hh * K, rows, mr, ck, mk, H * K)
                    qt = qt * exp(tl.where(mq[:, None], bq - br[None, :], NEG_INF), IEEE)
                    kt = kt * exp(br[None, :] - bk, IEEE)
                A += dot(qt.to(DT), tl.trans(kt.to(DT)), IEEE)
            if GATE == GATE_SCALAR:
                qe = ld_gtok(gb + hh, qrows, mq, H)
                if MEXP:
                    qe -= ld_gtok(gm + hh, qrows, mq, H)
                A = A * exp(tl.where(mq[:, None], qe[:, None] + ke[None, :], NEG_INF), IEEE)
            dot_ = ld_tile(do + hh * V, qrows, mq, cv, mv, H * V)
            if MEXP:
                dot_ = dot_ * ld_tok(rd + hh, qrows, mq, H)[:, None]
            acc += dot(tl.trans(A).to(DT), dot_.to(DT), IEEE)
    tl.store(dv + (rows[:, None] * H + hh) * V + cv[None, :], acc.to(dv.dtype.element_ty),
             mask=mr[:, None] & mv[None, :])


@triton.jit
def do_v_tile(do, v, hh, rows, mr, krows, mkr, rdt, dqt, H, V, BT: tl.constexpr,
              BV: tl.constexpr, MEXP: tl.constexpr, IEEE: tl.constexpr):
    """dA[t, s] = do_t . v_s over all of V, float32 [BT, BT], for query rows t and key rows s.

    mLSTMexp: row t is scaled by 1 / normaliser (rdt) and the normaliser's cotangent dqt is
    added to every column (its n^T q term). The scale applies to the float32 product, not to
    do before the dot: do_t / normaliser rounded to do's 16 bits would cost dA_tt that
    rounding over V products, and for a key that dominates its state, dA_tt's two terms
    nearly cancel (o_t hardly changes with that key's weight), so the rounding would dominate
    d i_t."""
    DT = do.dtype.element_ty
    dA = tl.zeros([BT, BT], dtype=tl.float32)
    for vb in range(tl.cdiv(V, BV)):
        cv = vb * BV + tl.arange(0, BV)
        mv = cv < V
        dot_ = ld_tile(do + hh * V, rows, mr, cv, mv, H * V)             # [BT, BV] do
        vt = ld_tile(v + hh * V, krows, mkr, cv, mv, H * V)              # [BT, BV] v
        dA += dot(dot_.to(DT), tl.trans(vt).to(DT), IEEE)
    if MEXP:
        dA = dA * rdt[:, None] + dqt[:, None]
    return dA


@triton.jit
def pair_dA(do, v, dsc, hh, rows, mr, krows, mkr, rdt, dqt, cs, H, V, L: tl.constexpr,
            BT: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, MEXP: tl.constexpr,
            IEEE: tl.constexpr):
    """dA[t, s] for query rows t and key rows s of one chunk (first token cs), float32
    [BT, BT]: per-key gates read it from dsc (key_dscores_kernel, zero where s > t), the
    others form it (do_v_tile)."""
    if GATE == GATE_KEY:
        keep = mr[:, None] & mkr[None, :] & (rows[:, None] >= krows[None, :])
        return tl.load(dsc + (rows[:, None] * H + hh) * L + (krows - cs)[None, :], mask=keep,
                       other=0.0)
    else:
        return do_v_tile(do, v, hh, rows, mr, krows, mkr, rdt, dqt, H, V, BT, BV, MEXP, IEEE)


@triton.jit
def key_dscores_kernel(do, v, dsc, chunk_start, chunk_end, H, V, L: tl.constexpr,
                       BV: tl.constexpr, IEEE: tl.constexpr):
    """Per-key gates: dsc[t, h, s - cs] = do_t . v_s for the tokens t >= s of one chunk (first
    token cs), float32, formed once per chunk for bwd_dqk, whose 16-token tile pairs would
    otherwise each re-read do and v (once per K block). Entries above the diagonal are not
    written: pair_dA masks them."""
    ic = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    cs = tl.load(chunk_start + ic).to(tl.int64)
    ce = tl.load(chunk_end + ic).to(tl.int64)
    idx = tl.arange(0, L)
    rows = cs + idx
    mr = rows < ce
    # the chunk against itself (no mLSTM scaling: per-key gates only, so rdt, dqt go unread)
    acc = do_v_tile(do, v, hh, rows, mr, rows, mr, mr, mr, H, V, L, BV, False, IEEE)
    keep = mr[:, None] & (idx[:, None] >= idx[None, :])
    tl.store(dsc + (rows[:, None] * H + hh) * L + idx[None, :], acc, mask=keep)


@triton.jit
def key_diag_grads_cols(dA, qt, bq, k, gb, hh, t0, eos, rows, mr, ck, mk, H, K, BT: tl.constexpr,
                        IEEE: tl.constexpr):
    """Per-key diagonal tile's part of (dq, dk) over one K block, one key token s at a time,
    [BT, BK] tiles only: the weights dA_ts exp(b_t - b_s) of the pairs t > s serve dq_t (times
    k_s) and dk_s (summed over t). Unscaled, float32."""
    dq = tl.zeros_like(qt)
    dk = tl.zeros_like(qt)
    cols = tl.arange(0, BT)
    for j in range(BT):
        s = t0 + j
        ms = s < eos
        ks = tl.load(k + (s * H + hh) * K + ck, mask=mk & ms, other=0.0).to(tl.float32)
        bs = tl.load(gb + (s * H + hh) * K + ck, mask=mk & ms, other=0.0)
        dAj = tl.sum(tl.where(cols[None, :] == j, dA, 0.0), axis=1)                  # dA[:, s]
        w = exp(tl.where(mr[:, None] & (rows > s)[:, None], bq - bs[None, :], NEG_INF),
                IEEE) * dAj[:, None]                                               # [t, BK]
        dq += w * ks[None, :]
        dk += tl.where(cols[:, None] == j, tl.sum(w * qt, axis=0)[None, :], 0.0)
    return dq, dk


@triton.jit
def bwd_dqk_kernel(q, k, v, do, gb, gm, kw, mpc, rd, dqn, h, hn, dh, dhn, dsc, dq_out, dk_out, gq,
                   gk, gks, gkw, tile_seq, tile_start, cu, coff, scale, H, TT,
                   K, V, L: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                   HAS_KW: tl.constexpr, MEXP: tl.constexpr, NONCAUSAL: tl.constexpr,
                   IEEE: tl.constexpr, GATE_SUMS: tl.constexpr, DRANGE: tl.constexpr):
    """dq and dk of one tile (BT tokens), one block of K, and (GATE_SUMS: the gate needs a
    gradient) the gate sums of the tile:
    GATE_SCALAR writes q.dq and k.dk over the block into gq, gk [NKB, TT, H], k.dk without the
    part from the state after the chunk, which goes to gks, and with HAS_KW the whole k.dk
    into gkw; GATE_KEY writes q*dq - k*dk (same split) into gq [TT, H, K], the state part of
    k*dk into gks.
    The gate sums leave out each token's pairing with itself (query t, key t): its terms in
    q.dq and k.dk are equal and cancel in q.dq - k.dk, but are the largest of both, so
    summing them first would cost the float32 precision of the small difference.

    Order, chosen to keep few [BT, BK] float32 tiles alive at once (registers: sm_90 spills
    at BK 128): the chunk's intra part of dq and dk, with the same-token coefficients kept as
    a [BT] vector; dq's state part; the gate sums; dq stored; dk's state part (its own gate
    sum); dk stored."""
    kb, hh, t0, rows, mr, eos, cs, ce, slot, slot1, ic = tile_program(
        tile_seq, tile_start, cu, coff, L, BT, BK, BV, NONCAUSAL)
    DT = do.dtype.element_ty
    ck = kb * BK + tl.arange(0, BK)
    mk = ck < K
    mqk = mr[:, None] & mk[None, :]
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    dd = tl.zeros([BT], dtype=tl.float32)                       # same-token dA_tt (gated)
    qe = tl.zeros([BT], dtype=tl.float32)
    ke = tl.zeros([BT], dtype=tl.float32)
    rdt = tl.zeros([BT], dtype=tl.float32)
    dqt = tl.zeros([BT], dtype=tl.float32)
    if MEXP:
        rdt = ld_tok(rd + hh, rows, mr, H)                       # 1 / normaliser
        dqt = ld_tok(dqn + hh, rows, mr, H)                      # cotangent of n^T q
    if GATE == GATE_SCALAR:
        qe = ld_gtok(gb + hh, rows, mr, H)                       # query exponent b_t (- m_t)
        ke = key_exp(gb, kw, hh, rows, mr, H, HAS_KW)           # key exponent -b_s (+ w_s)
        if MEXP:
            qe -= ld_gtok(gm + hh, rows, mr, H)
    if GATE == GATE_KEY:
        bq = ld_raw(gb + hh * K, rows, mr, ck, mk, H * K)     # this tile's b, [BT, BK]
    if not NONCAUSAL:
        # 1) dq from the earlier key tiles of the chunk (reference row t0 - 1), unscaled
        if GATE == GATE_KEY:
            br = tl.load(gb + ((t0 - 1) * H + hh) * K + ck, mask=mk & (t0 > cs), other=0.0)
        for j in range((t0 - cs) // BT):
            krows = cs + j * BT + tl.arange(0, BT)
            mkr = krows < eos
            dA = pair_dA(do, v, dsc, hh, rows, mr, krows, mkr, rdt, dqt, cs, H, V, L, BT, BV,
                         GATE, MEXP, IEEE)
            kt = ld_tile(k + hh * K, krows, mkr, ck, mk, H * K)
            if GATE == GATE_SCALAR:
                kej = key_exp(gb, kw, hh, krows, mkr, H, HAS_KW)
                dA = dA * exp(tl.where(mr[:, None], qe[:, None] + kej[None, :], NEG_INF), IEEE)
            if GATE == GATE_KEY:
                bk = ld_raw(gb + hh * K, krows, mkr, ck, mk, H * K)
                kt = kt * exp(br[None, :] - bk, IEEE)
            dq += dot(dA.to(DT), kt.to(DT), IEEE)
        if GATE == GATE_KEY:                                        # dq holds only this part so far
            dq = dq * exp(tl.where(mr[:, None] & (t0 > cs), bq - br[None, :], NEG_INF), IEEE)
        # 2) dk from the later query tiles of the chunk (reference row t0 + BT - 1), unscaled
        has_later = t0 + BT < ce
        if GATE == GATE_KEY:
            br2 = tl.load(gb + ((t0 + BT - 1) * H + hh) * K + ck, mask=mk & has_later, other=0.0)
        for i in range(tl.cdiv(ce - t0, BT) - 1):
            qrows = t0 + (i + 1) * BT + tl.arange(0, BT)
            mq = qrows < ce
            rdi = rdt
            dqi = dqt
            if MEXP:
                rdi = ld_tok(rd + hh, qrows, mq, H)
                dqi = ld_tok(dqn + hh, qrows, mq, H)
            dA = pair_dA(do, v, dsc, hh, qrows, mq, rows, mr, rdi, dqi, cs, H, V, L, BT, BV,
                         GATE, MEXP, IEEE)                      # [query, key]
            qt = ld_tile(q + hh * K, qrows, mq, ck, mk, H * K)
            if GATE == GATE_SCALAR:
                qei = ld_gtok(gb + hh, qrows, mq, H)
                if MEXP:
                    qei -= ld_gtok(gm + hh, qrows, mq, H)
                dA = dA * exp(tl.where(mq[:, None], qei[:, None] + ke[None, :], NEG_INF), IEEE)
            if GATE == GATE_KEY:
                bqi = ld_raw(gb + hh * K, qrows, mq, ck, mk, H * K)
                qt = qt * exp(tl.where(mq[:, None], bqi - br2[None, :], NEG_INF), IEEE)
            dk += dot(tl.trans(dA).to(DT), qt.to(DT), IEEE)
        if GATE == GATE_KEY:                                        # dk holds only this part so far
            dk = dk * exp(tl.where(mr[:, None] & has_later, br2[None, :] - bq, NEG_INF), IEEE)
        # 3) the diagonal tile, causal mask t >= s, the same-token terms apart (dd)
        if GATE != GATE_KEY:
            dA = do_v_tile(do, v, hh, rows, mr, rows, mr, rdt, dqt, H, V, BT, BV, MEXP, IEEE)
            dA = gate_diag(dA, rows, mr, qe, ke, GATE, IEEE)
            qt = ld_tile(q + hh * K, rows, mr, ck, mk, H * K)
            kt = ld_tile(k + hh * K, rows, mr, ck, mk, H * K)
            if GATE == GATE_SCALAR and GATE_SUMS:                       # same-token terms apart (5)
                same = rows[:, None] == rows[None, :]
                dd = tl.sum(tl.where(same, dA, 0.0), axis=1)     # dA_tt
                dA = tl.where(same, 0.0, dA)
            dq += dot(dA.to(DT), kt.to(DT), IEEE)
            dk += dot(tl.trans(dA).to(DT), qt.to(DT), IEEE)
        else:
            # per-key decay: the pairs (query t, key s < t) of the tile, their weights
            # exp(b_t - b_s) serving dq_t (summed over s) and dk_s (over t): by two dots with b
            # relative to the tile's middle row, exp(b_t - b_s) = exp(e_t) exp(-e_s), where the
            # decays allow (diag_dot_range), else one key token at a time (key_diag_grads_cols)
            dA = pair_dA(do, v, dsc, hh, rows, mr, rows, mr, rdt, dqt, cs, H, V, L, BT, BV, GATE,
                         MEXP, IEEE)
            qt = ld_tile(q + hh * K, rows, mr, ck, mk, H * K)
            kt = ld_tile(k + hh * K, rows, mr, ck, mk, H * K)
            cols = tl.arange(0, BT)
            e, fits = mid_row_exponents(gb, bq, hh, t0, eos, mqk, ck, mk, H, K, BT, DRANGE)
            if fits:
                # two tensor-core dots: dq_t += e^e_t sum_s<t dA_ts (k_s e^-e_s), and
                # dk_s += e^-e_s sum_t>s dA_ts (q_t e^e_t)
                below = (rows[:, None] > rows[None, :]) & mr[:, None] & mr[None, :]
                dAs = tl.where(below, dA, 0.0)
                ef = exp(e, IEEE)
                ei = exp(-e, IEEE)
                dq += dot(dAs.to(DT), (kt * ei).to(DT), IEEE) * ef
                dk += dot(tl.trans(dAs).to(DT), (qt * ef).to(DT), IEEE) * ei
            else:
                dqc, dkc = key_diag_grads_cols(dA, qt, bq, k, gb, hh, t0, eos, rows, mr, ck, mk,
                                               H, K, BT, IEEE)
                dq += dqc
                dk += dkc
            # the same-token terms: dA_tt = do_t . v_t, weight exp(0)
            dd = tl.sum(tl.where(cols[:, None] == cols[None, :], dA, 0.0), axis=1)
        dq = dq * scale
        dk = dk * scale
        dd = dd * scale
    pqk = (rows[:, None] * H + hh) * K + ck[None, :]               # [BT, BK] offsets of a tile
    # 4) dq from the state before the chunk: exp(qe + mp) scale (S_c do~ + dqn n_c)
    dqs = tl.zeros([BT, BK], dtype=tl.float32)
    for vb in range(tl.cdiv(V, BV)):
        cv = vb * BV + tl.arange(0, BV)
        mv = cv < V
        dot_ = ld_tile(do + hh * V, rows, mr, cv, mv, H * V)
        if MEXP:
            dot_ = dot_ * rdt[:, None]
        S = ld_state(h + (slot * H + hh) * K * V, ck, mk, cv, mv, V)
        dqs += dot(dot_.to(DT), tl.trans(S).to(DT), IEEE)
    if MEXP:
        nprev = tl.load(hn + (slot * H + hh) * K + ck, mask=mk, other=0.0)
        dqs += dqt[:, None] * nprev[None, :]
    if GATE == GATE_NONE:
        dq += dqs * scale
    if GATE == GATE_SCALAR:
        mp = 0.0
        if MEXP:
            mp = tl.load(mpc + ic * H + hh)
        dq += dqs * (scale * exp(tl.where(mr, qe + mp, NEG_INF), IEEE))[:, None]
    if GATE == GATE_KEY:
        dq += dqs * scale * exp(tl.where(mr[:, None], bq, NEG_INF), IEEE)
    # 5) gate sums from the float32 accumulators (same-token terms and dk's state part left
    #    out), then dq with its same-token term (a frozen scalar gate kept it in the dots)
    SPLIT: tl.constexpr = GATE == GATE_KEY or (GATE == GATE_SCALAR and GATE_SUMS)
    if SPLIT:
        qs = ld_tile(q + hh * K, rows, mr, ck, mk, H * K)
        ks = ld_tile(k + hh * K, rows, mr, ck, mk, H * K)
        if GATE == GATE_SCALAR and GATE_SUMS:
            tl.store(gq + (kb * TT + rows) * H + hh, tl.sum(qs * dq, axis=1), mask=mr)
            tl.store(gk + (kb * TT + rows) * H + hh, tl.sum(ks * dk, axis=1), mask=mr)
        if GATE == GATE_KEY and GATE_SUMS:
            tl.store(gq + pqk, qs * dq - ks * dk, mask=mqk)
        dq += dd[:, None] * ks
    # (the offsets recomputed, not pqk: keeping pqk alive to the dq and dk stores takes the
    # gated bwd_dqk from 250-254 registers to 255 and 32-192 B of spills on sm_90)
    tl.store(dq_out + (rows[:, None] * H + hh) * K + ck[None, :], dq.to(dq_out.dtype.element_ty), mask=mqk)
    # 6) dk from the state after the chunk: exp(le + ke) (dS_{c+1} v + dn_{c+1}); its share of
    #    k.dk goes to gks apart: the launcher sums it over the earlier tokens of the chunk
    #    instead of letting it cancel against sdot (that cancellation loses the precision of
    #    the 16-bit dS operand: measured dg errors of 0.2 at log-decays near -20)
    dks = tl.zeros([BT, BK], dtype=tl.float32)
    for vb in range(tl.cdiv(V, BV)):
        cv = vb * BV + tl.arange(0, BV)
        mv = cv < V
        vt = ld_tile(v + hh * V, rows, mr, cv, mv, H * V)
        dS = ld_state(dh + (slot1 * H + hh) * K * V, ck, mk, cv, mv, V)
        dks += dot(vt.to(DT), tl.trans(dS).to(DT), IEEE)
    if MEXP:
        dnext = tl.load(dhn + (slot1 * H + hh) * K + ck, mask=mk, other=0.0)
        dks += tl.where(mr, 1.0, 0.0)[:, None] * dnext[None, :]
    if GATE == GATE_SCALAR:
        le = chunk_end_exp(gb, gm, ce, True, hh, H, MEXP)        # a tile's chunk is not empty
        dks = dks * exp(tl.where(mr, le + ke, NEG_INF), IEEE)[:, None]
        if GATE_SUMS:
            tl.store(gks + (kb * TT + rows) * H + hh, tl.sum(ks * dks, axis=1), mask=mr)
    if GATE == GATE_KEY:
        bl = tl.load(gb + ((ce - 1) * H + hh) * K + ck, mask=mk, other=0.0)
        dks = dks * exp(tl.where(mr[:, None], bl[None, :] - bq, NEG_INF), IEEE)
        if GATE_SUMS:
            tl.store(gks + pqk, ks * dks, mask=mqk)
    dk += dks
    if SPLIT:
        dk += dd[:, None] * qs
    if HAS_KW and GATE_SUMS:
        tl.store(gkw + (kb * TT + rows) * H + hh, tl.sum(ks * dk, axis=1), mask=mr)
    tl.store(dk_out + (rows[:, None] * H + hh) * K + ck[None, :], dk.to(dk_out.dtype.element_ty), mask=mqk)


# ----------------------------------------------------------------------------- launchers

def bwd_states(q, do, gb, gm, mpc, rd, dht, h, has_h0, layout: ChunkLayout, cfg, scale, V,
               gate_sums=True):
    """Gradients of the chunk-boundary states: dh [slots, H, K, V] in do's dtype (float32 for
    float32 inputs), and of the initial state, dh0 [N, H, K, V] float32 when has_h0; and
    <dS, S> of the state after every chunk: [NC, H] (GATE_SCALAR) or [NC, H, K] (GATE_KEY),
    else None (also when not gate_sums: the gate needs no gradient). (mLSTMexp's normaliser:
    mexp_norm.backward, whose share of the gate sums the caller adds.)"""
    TT, H, K = q.shape
    dev = q.device
    # dh's readers (bwd_dv, bwd_dqk) round it to the inputs' dtype before their dots, so for
    # 16-bit inputs it is stored rounded: the same results, half the bytes (the scan itself
    # carries dS in float32, and dh0 and the gate sums come from that float32 value)
    dh = empty(layout.n_slots, H, K, V, dtype=state_dtype(cfg, do.dtype), device=dev)
    dh0 = empty(layout.N, H, K, V, dtype=torch.float32, device=dev) if has_h0 else None
    x = q
    BVS = fill_v_block(cfg.BVS, V, layout.N * H * triton.cdiv(K, cfg.BK), sm_count(dev))
    grid = (layout.N * H, triton.cdiv(K, cfg.BK), triton.cdiv(V, BVS))
    NS = layout.n_slots
    sdot = None
    if cfg.gate == GATE_SCALAR and gate_sums:
        sdot = empty(grid[1] * grid[2], NS, H, dtype=torch.float32, device=dev)
    if cfg.gate == GATE_KEY and gate_sums:
        sdot = empty(grid[2], NS, H, K, dtype=torch.float32, device=dev)
    bwd_states_kernel[grid](
        q, do, _or(gb, x), _or(gm, x), _or(mpc, x), _or(rd, x), _or(dht, x), dh, _or(dh0, x), h,
        _or(sdot, x),
        layout.cu, layout.chunk_off, scale, H, NS, K=K, V=V, L=layout.L, BT=layout.BT, BK=cfg.BK,
        BV=BVS, GATE=cfg.gate,
        MEXP=cfg.mexp, HAS_DHT=dht is not None, HAS_H0=has_h0, NONCAUSAL=cfg.noncausal,
        IEEE=cfg.ieee, SDOT=sdot is not None, num_warps=cfg.scan_warps,
        num_stages=cfg.scan_num_stages, maxnreg=cfg.bwd_scan_maxnreg or None)
    if sdot is not None:
        sdot = sdot[:, layout.chunk_end_slot].sum(0)             # blocks -> [NC, H(, K)]
    return dh, dh0, sdot


def bwd_dv(q, k, do, gb, gm, kw, rd, dh, layout: ChunkLayout, cfg, scale, v_dtype, V, A=None):
    """dv [TT, H, V] in v's dtype. A: the per-key scores (gated_fwd.key_scores) for GATE_KEY."""
    TT, H, K = q.shape
    dv = empty(TT, H, V, dtype=v_dtype, device=q.device)
    if layout.NT:
        x = q
        bwd_dv_kernel[(layout.NT, triton.cdiv(V, cfg.BV), H)](
            q, k, do, _or(gb, x), _or(gm, x), _or(kw, x), _or(rd, x), dh, _or(A, x), dv,
            layout.tile_seq, layout.tile_start, layout.cu, layout.chunk_off, scale, H,
            K=K, V=V, L=layout.L, BT=layout.BT, BK=cfg.BK, BV=cfg.BV, GATE=cfg.gate,
            HAS_KW=cfg.has_kw, MEXP=cfg.mexp, NONCAUSAL=cfg.noncausal, IEEE=cfg.ieee,
            num_warps=cfg.warps, num_stages=cfg.stages)
    return dv


def key_dscores(do, v, layout: ChunkLayout, cfg):
    """Per-key gates' intra-chunk dA = do v^T: [TT, H, L] float32, entry [t, h, s - cs] for the
    tokens t >= s of one chunk (first token cs); the rest is left unwritten."""
    TT, H, V = v.shape
    dsc = empty(TT, H, layout.L, dtype=torch.float32, device=v.device)
    if layout.NC:
        key_dscores_kernel[(layout.NC, H)](
            do, v, dsc, layout.chunk_start, layout.chunk_end, H, V=V, L=layout.L, BV=cfg.BV,
            IEEE=cfg.ieee, num_warps=cfg.warps, num_stages=cfg.stages)
    return dsc


def bwd_dqk(q, k, v, do, gb, gm, kw, mpc, rd, dqn, h, hn, dh, dhn, layout: ChunkLayout, cfg,
            scale, gate_sums=True, dsc=None):
    """dq, dk [TT, H, K] in q's dtype and the gate sums (same-token terms left out, see the
    kernel): GATE_SCALAR -> (q.dq, k.dk, the state part of k.dk, the whole k.dk or None without a
    key log-weight) each [TT, H] float32 (summed over K blocks here); GATE_KEY -> (q*dq - k*dk,
    the state part of k*dk) each [TT, H, K]; else, or without gate_sums, None. dsc: GATE_KEY's
    intra-chunk dA (key_dscores)."""
    TT, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    BK = cfg.BKQ or cfg.BK
    nkb = triton.cdiv(K, BK)
    dq = empty(TT, H, K, dtype=q.dtype, device=dev)
    dk = empty(TT, H, K, dtype=k.dtype, device=dev)
    gq = gk = gks = gkw = None
    gate_sums = bool(gate_sums and cfg.gate != GATE_NONE)
    if cfg.gate == GATE_SCALAR and gate_sums:
        gq = empty(nkb, TT, H, dtype=torch.float32, device=dev)
        gk = empty(nkb, TT, H, dtype=torch.float32, device=dev)
        gks = empty(nkb, TT, H, dtype=torch.float32, device=dev)
        if cfg.has_kw:
            gkw = empty(nkb, TT, H, dtype=torch.float32, device=dev)
    if cfg.gate == GATE_KEY and gate_sums:
        gq = empty(TT, H, K, dtype=torch.float32, device=dev)
        gks = empty(TT, H, K, dtype=torch.float32, device=dev)
    if layout.NT:
        x = q
        bwd_dqk_kernel[(layout.NT, nkb, H)](
            q, k, v, do, _or(gb, x), _or(gm, x), _or(kw, x), _or(mpc, x), _or(rd, x), _or(dqn, x),
            h, _or(hn, x), dh, _or(dhn, x), _or(dsc, x), dq, dk, _or(gq, x), _or(gk, x), _or(gks, x),
            _or(gkw, x),
            layout.tile_seq, layout.tile_start, layout.cu, layout.chunk_off, scale, H, TT,
            K=K, V=V, L=layout.L, BT=layout.BT, BK=BK, BV=cfg.BV, GATE=cfg.gate,
            HAS_KW=cfg.has_kw, MEXP=cfg.mexp, NONCAUSAL=cfg.noncausal, IEEE=cfg.ieee,
            GATE_SUMS=gate_sums, DRANGE=diag_dot_range(q.dtype),
            num_warps=cfg.dqk_warps or cfg.warps, num_stages=cfg.stages)
    if not gate_sums:
        return dq, dk, None
    if cfg.gate == GATE_SCALAR:
        return dq, dk, (gq.sum(0), gk.sum(0), gks.sum(0), gkw.sum(0) if cfg.has_kw else None)
    if cfg.gate == GATE_KEY:
        return dq, dk, (gq, gks)
    return dq, dk, None
