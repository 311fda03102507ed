"""mLSTMexp's normaliser n and its cotangent dn, beside the state scans (gated_api calls
these after gated_fwd.fwd_states and gated_bwd.bwd_states, which carry the state alone).

n is the state's recurrence with a column of ones for v: per chunk c of a sequence

    n_after_c = dec_c n_before_c + csum_c,   dec_c = exp(le_c + mp_c),
    csum_c = sum over the chunk's tokens t of exp(le_c + ke_t) k_t,

(le, mp, ke as in gated_fwd.fwd_states_kernel), and its cotangent runs the same affine map
backwards with csum_c = sum_t scale exp(qe_t + mp_c) dqn_t q_t (gated_bwd.bwd_states_kernel).
Inside the scans those [K]-sums were a cross-warp reduction in every step of a 512-step chain
at T 32768; here the chunk sums are one parallel pass over the chunks, and the chain is an
affine scan over the chunks' [K] vectors, CB chunks at a time by tl.associative_scan (as
gated_fwd.mexp_carry_kernel scans the stabiliser). Long sequences gain most, and the scans
without the normaliser's sums take fewer registers and spill nothing (PERF_NOTES "mLSTMexp:
the normaliser's scan").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..alloc import empty
from .common import ChunkLayout, exp, head_tile, ld_gtok, ld_tile, ld_tok
from .gated_fwd import NEG_INF, chunk_end_exp, key_exp

# chunks per step of the affine scan: its serial steps are cdiv(chunks, this) per sequence
# (T 32768 at L 64: 512 chunks, 32 steps at 16). 64 (8 steps, no spills on sm_90) passes the
# GPU tests but is untimed (PERF_NOTES "Open levers")
NORM_SCAN_BLOCK = 16


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """Compose x -> a1 x + b1, then x -> a2 x + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def norm_chunk_kernel(x, dqn, gb, gm, kw, mpc, csum, dec, chunk_start, chunk_end, scale, H, K,
                      L: tl.constexpr, BK: tl.constexpr, HAS_KW: tl.constexpr,
                      BWD: tl.constexpr, IEEE: tl.constexpr):
    """One chunk ic, head hh, K block (grid NC x H x cdiv(K, BK)): csum[ic, hh] = the chunk's
    weighted sum of x's rows (keys; BWD: queries times dqn), dec[ic, hh] = exp(le + mp)."""
    ic = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    kb = tl.program_id(2)
    cs = tl.load(chunk_start + ic).to(tl.int64)                 # chunk's first token
    ce = tl.load(chunk_end + ic).to(tl.int64)                   # one past its last
    rows = cs + tl.arange(0, L)
    mr = rows < ce
    ck = kb * BK + tl.arange(0, BK)
    mk = ck < K
    xt = ld_tile(x + hh * K, rows, mr, ck, mk, H * K)           # [L, BK] float32
    mp = tl.load(mpc + ic * H + hh)                             # stabiliser before the chunk
    le = chunk_end_exp(gb, gm, ce, ce > cs, hh, H, True)        # b - m at its last token
    if BWD:
        # scale exp(b_t - m_t + mp) dqn_t: the query weights of bwd_states times dn's cotangent
        qe = ld_gtok(gb + hh, rows, mr, H) - ld_gtok(gm + hh, rows, mr, H)
        w = exp(tl.where(mr, qe + mp, NEG_INF), IEEE) * ld_tok(dqn + hh, rows, mr, H) * scale
    else:
        # exp(le + ke_s): key s's weight in the state after its chunk (fwd_states)
        w = exp(tl.where(mr, le + key_exp(gb, kw, hh, rows, mr, H, HAS_KW), NEG_INF), IEEE)
    tl.store(csum + (ic * H + hh) * K + ck, tl.sum(xt * w[:, None], axis=0), mask=mk)
    tl.store(dec + ic * H + hh, exp(le + mp, IEEE), mask=kb == 0)


@triton.jit
def norm_scan_kernel(csum, dec, init, out, out0, coff, H, K, CB: tl.constexpr,
                     BK: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
                     STORE_OUT0: tl.constexpr):
    """The affine recurrence x_after_c = dec_c x_before_c + csum_c over the chunks of
    sequence n, head hh, one K block (grid N * H x cdiv(K, BK)), from init (or 0):
    in chunk order into out's slots c0 + n + c (x before chunk c; the last, c = nc, after
    all of them), or (REVERSE) from the last chunk back, slot c0 + n + c + 1 holding the
    value entering chunk c from above and slot c0 + n the result (also into out0)."""
    tl.static_assert(CB >= 16)
    i_nh = tl.program_id(0).to(tl.int64)
    n = i_nh // H
    hh = i_nh % H
    ck = tl.program_id(1) * BK + tl.arange(0, BK)
    mk = ck < K
    c0 = tl.load(coff + n).to(tl.int64)
    nc = tl.load(coff + n + 1).to(tl.int64) - c0                # the sequence's chunks
    base = c0 + n                                               # its first slot
    x = tl.zeros([BK], dtype=tl.float32)
    if HAS_INIT:
        x = tl.load(init + i_nh * K + ck, mask=mk, other=0.0)
    first = base
    if REVERSE:
        first = base + nc
    tl.store(out + (first * H + hh) * K + ck, x, mask=mk)       # before any chunk is applied
    for j in range(tl.cdiv(nc, CB)):
        i = j * CB + tl.arange(0, CB)                           # positions in scan order
        mi = i < nc
        c = i                                                   # their chunks
        if REVERSE:
            c = nc - 1 - i
        a = tl.load(dec + (c0 + c) * H + hh, mask=mi, other=1.0)  # (1, 0): the identity map
        b = tl.load(csum + ((c0 + c) * H + hh)[:, None] * K + ck[None, :],
                    mask=mi[:, None] & mk[None, :], other=0.0)  # [CB, BK]
        A, B = tl.associative_scan((tl.broadcast_to(a[:, None], (CB, BK)), b), 0,
                                   _affine_combine)             # maps of chunks j CB .. i
        after = A * x[None, :] + B                              # [CB, BK]
        slot = base + c + 1                                     # after chunk c
        if REVERSE:
            slot = base + c                                     # entering chunk c - 1
        tl.store(out + (slot * H + hh)[:, None] * K + ck[None, :], after,
                 mask=mi[:, None] & mk[None, :])
        last = tl.minimum(nc, j * CB + CB) - 1                  # this block's last position
        x = tl.sum(tl.where((i == last)[:, None], after, 0.0), axis=0)
    if STORE_OUT0:
        tl.store(out0 + i_nh * K + ck, x, mask=mk)


# ----------------------------------------------------------------------------- launchers

def _sums(x, dqn, gb, gm, kw, mpc, layout: ChunkLayout, cfg, scale):
    """(csum [NC, H, K], dec [NC, H]) float32 for the forward (dqn None) or the backward."""
    TT, H, K = x.shape
    csum = empty(max(layout.NC, 1), H, K, dtype=torch.float32, device=x.device)
    dec = empty(max(layout.NC, 1), H, dtype=torch.float32, device=x.device)
    if layout.NC:
        BK = head_tile(K, 64)
        norm_chunk_kernel[(layout.NC, H, triton.cdiv(K, BK))](
            x, dqn if dqn is not None else gb, gb, gm, kw if kw is not None else gb, mpc, csum,
            dec, layout.chunk_start, layout.chunk_end, scale, H, K, L=layout.L, BK=BK,
            HAS_KW=kw is not None, BWD=dqn is not None, IEEE=cfg.ieee)
    return csum, dec


def _scan(csum, dec, init, out, out0, layout: ChunkLayout, reverse: bool):
    H, K = out.shape[1:]
    BK = head_tile(K, 64)
    norm_scan_kernel[(layout.N * H, triton.cdiv(K, BK))](
        csum, dec, init if init is not None else csum, out, out0 if out0 is not None else out,
        layout.chunk_off, H, K, CB=NORM_SCAN_BLOCK, BK=BK, HAS_INIT=init is not None,
        REVERSE=reverse, STORE_OUT0=out0 is not None)


def forward(k, gb, gm, kw, mpc, n0, layout: ChunkLayout, cfg):
    """hn [slots, H, K] float32: n before every chunk and at every sequence's end (the slots
    of gated_fwd.fwd_states' h). k [TT, H, K]; gb, gm [TT, H]; kw [TT, H] or None;
    mpc [NC, H]; n0 [N, H, K] or None."""
    hn = empty(layout.n_slots, k.shape[1], k.shape[2], dtype=torch.float32, device=k.device)
    csum, dec = _sums(k, None, gb, gm, kw, mpc, layout, cfg, 1.0)
    _scan(csum, dec, n0, hn, None, layout, reverse=False)
    return hn


def backward(q, gb, gm, mpc, dqn, dnt, hn, has_n0, layout: ChunkLayout, cfg, scale):
    """(dhn [slots, H, K] float32: dn after every chunk, the slots of gated_bwd.bwd_states'
    dh; dn0 [N, H, K] float32 when has_n0, else None; the normaliser's share of each chunk's
    gate sum, dec_c <dn after chunk c, n before it> [NC, H] float32, which the caller adds to
    bwd_states' sdot, the state's share). q [TT, H, K]; dqn [TT, H]; dnt [N, H, K] or None;
    hn from forward."""
    TT, H, K = q.shape
    dhn = empty(layout.n_slots, H, K, dtype=torch.float32, device=q.device)
    dn0 = empty(layout.N, H, K, dtype=torch.float32, device=q.device) if has_n0 else None
    csum, dec = _sums(q, dqn, gb, gm, None, mpc, layout, cfg, scale)
    _scan(csum, dec, dnt, dhn, dn0, layout, reverse=True)
    if not layout.NC:
        return dhn, dn0, torch.zeros(0, H, dtype=torch.float32, device=q.device)
    after = layout.chunk_end_slot                                # slot after each chunk
    return dhn, dn0, dec[:layout.NC] * (dhn[after] * hn[after - 1]).sum(-1)  # [NC, H]
