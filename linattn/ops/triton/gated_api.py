"""Entry points of the gated linear-attention family on the Triton kernels.

    linear_attention(q, k, v, g=None, *, scale, initial_state, output_final_state, cu_seqlens, causal)
    mlstm(q, k, v, i, f, *, input_gate, scale, initial_state, output_final_state, cu_seqlens)

Both take validated inputs (linattn.ops.api) and return (o, final_state) as
linattn.ops.reference does. Every variant maps onto one autograd.Function over one set of
chunk kernels (gated_fwd, gated_bwd):

    g None            GATE_NONE                 (the gate kinds of common.GATE_KINDS)
    g [H]             GATE_SCALAR, broadcast to [B, T, H] (its gradient is the sum)
    g [B, T, H]       GATE_SCALAR
    g [B, T, H, K]    GATE_KEY
    causal=False      GATE_NONE, NONCAUSAL
    mLSTMsig          GATE_SCALAR with g = logsigmoid(f) and key log-weight w = logsigmoid(i)
    mLSTMexp          GATE_SCALAR with g = logsigmoid(f), w = i, MEXP (stabiliser m, normaliser n)

float64 inputs run on linattn.ops.torch_chunked (the kernels compute in float32).

mLSTMexp backward: the kernels differentiate with the stabiliser m held constant; the exact
gradient through m (o depends on m_t through eps, the final state through m_T) is added here
by a segmented reverse scan over the m_t = max(logsigmoid(f_t) + m_{t-1}, i_t) recursion.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import torch_chunked
from .common import (GATE_KEY, GATE_NONE, GATE_SCALAR, INTERPRET, chunk_cumsum, gate_grad_,
                     gate_of, head_tile, lengths_of, make_layout, row_dot)
from . import mexp_norm
from .gated_bwd import bwd_dqk, bwd_dv, bwd_states, key_dscores
from .gated_fwd import fwd_o, fwd_states, key_scores, mexp_prep, state_dtype

MLSTM_EPS = 1e-6


@dataclass(frozen=True)
class Override:
    """Departures from _config's choice for one call (tests reach several chunks and tiles at
    tiny T with them; sweeps time other forms). chunk: tokens between stored states (a power
    of two, a multiple of tile); tile: the tokens a program holds; None keeps the device's.
    fields: (name, value) pairs replacing KernelConfig fields."""
    chunk: int | None = None
    tile: int | None = None
    fields: tuple = ()

# The state scans' register caps aim for this many programs per SM out of the SM's 64K
# 32-bit registers (KernelConfig.fwd_scan_maxnreg, bwd_scan_maxnreg).
SCAN_PROGRAMS_PER_SM = 4
SCAN_REGISTERS = 65536


@dataclass(frozen=True)
class KernelConfig:
    gate: int          # GATE_NONE, GATE_SCALAR or GATE_KEY (common.GATE_KINDS; a constant
                       # decay arrives as GATE_SCALAR)
    has_kw: bool       # key log-weight (mLSTM input gate)
    mexp: bool         # mLSTMexp stabiliser and normaliser
    noncausal: bool    # bidirectional
    ieee: bool         # float32 inputs: exact float32 dots
    BK: int            # K block
    BV: int            # V block of the per-tile kernels
    BVS: int           # V block of the state scans
    warps: int         # num_warps of the per-tile kernels (fwd_o, bwd_dv, bwd_dqk)
    scan_warps: int    # num_warps of the state scans (fwd_states, bwd_states)
    stages: int
    # bwd_dqk, the largest kernel: each K block's program recomputes do v^T for its tile
    # pairs, so one K block (BKQ = K) halves that work at D = 128 for more registers, which 8
    # warps supply (_config).
    BKQ: int = 0       # K block of bwd_dqk; 0: BK
    dqk_warps: int = 0  # num_warps of bwd_dqk; 0: warps
    # num_stages of the state scans; 0: stages. Per-key gates run their tile kernels on 1
    # stage but their scans on 2: at 1 Triton prefetches nothing and every step of the scans'
    # chains waits on global memory.
    scan_stages: int = 0
    # register caps of the state scans (ptx .maxnreg); 0: none. Each scan is one program per
    # (sequence, head, K block, V block), 4 warps each: under 128 registers 4 programs share an
    # SM and the bench's grid runs in one wave instead of two (PERF_NOTES "Gated family: launch
    # choices"); set where sm_90 compiles spill little under the cap (_config).
    fwd_scan_maxnreg: int = 0
    bwd_scan_maxnreg: int = 0
    # Per-key gates run bwd_dqk on tiles of BTQ = 16 tokens (its diagonal tile's weights are
    # formed per token pair) while fwd_o and bwd_dv take BT-token tiles whose scores come
    # precomputed (gated_fwd.key_scores). 0: BT.
    BTQ: int = 0
    score_warps: int = 0  # num_warps of gated_fwd.key_scores (per-key gates); 0: warps
    # mLSTMexp's backward on a float32 do (and float32 dh, tf32 dots): set for float16 inputs,
    # where do / normaliser reaches exp(m), beyond float16's 65504; bfloat16 has float32's
    # range and keeps 16-bit operands (tests clear it to run bfloat16's form in float16,
    # which the interpreter computes correctly)
    mexp_float32_do: bool = False

    @property
    def scan_num_stages(self) -> int:
        """num_stages of the state scans (scan_stages, or stages where it is 0)."""
        return self.scan_stages or self.stages


def _config(gate, K, V, dtype, *, has_kw=False, mexp=False, noncausal=False,
            override: Override | None = None):
    """(KernelConfig, chunk length L, tile BT) for the device; a heuristic, no autotuning
    (so no config depends on B, and the interpreter needs none). Every choice is measured in
    PERF_NOTES "Gated family: launch choices". override: departures for this call."""
    if gate not in (GATE_NONE.value, GATE_SCALAR.value, GATE_KEY.value):
        raise ValueError(f"gate {gate}: the gated kernels take GATE_NONE, GATE_SCALAR or GATE_KEY "
                         "(a constant decay broadcast to GATE_SCALAR)")
    override = override or Override()
    chunk, tile = override.chunk, override.tile
    BKQ = dqk_warps = scan_stages = fwd_cap = bwd_cap = 0
    BTQ = 16 if gate == GATE_KEY.value else 0
    if INTERPRET:
        BT, L = tile or 16, chunk or 64
        BK, BV, BVS, warps, stages = head_tile(K, 32), head_tile(V, 32), head_tile(V, 32), 4, 1
        scan_warps = warps
    else:
        # per-key gates too: their tile's scores come from gated_fwd.key_scores (16-token
        # blocks), so fwd_o and bwd_dv run 64-token tiles as the other gates do; bwd_dqk keeps
        # 16-token tiles (BTQ)
        BT = tile or 64
        # L = 64 (one tile per chunk) where it is faster than 128: no gate and scalar gates at
        # K <= 128, mLSTMexp, per-key gates (each of bwd_dqk's 16-token query tiles pairs with
        # up to L / 16 - 1 earlier key tiles). mLSTMsig keeps 128: at 64 its peak memory
        # rises over TFLA's.
        chunk64 = gate == GATE_KEY.value or (K <= 128 and (mexp or not has_kw))
        L = chunk or (64 if chunk64 else 128)
        BK = head_tile(K, 64)
        # per-key: 64 (the tile's scores come precomputed, so a second V block repeats no
        # exponentials; at 128 the 64-token fwd_o and bwd_dv spill on sm_90)
        BV = head_tile(V, 64 if gate == GATE_KEY.value else 128)
        BVS = head_tile(V, 64)
        # 4 warps everywhere: 8 warps on the per-tile kernels spill less on sm_90 but run slower
        warps, scan_warps, stages = 4, 4, 2
        # the scans on 3 stages (loads issued two tiles ahead): faster on long sequences
        scan_stages = 3
        # the scans' register caps where sm_90 (bf16, D 128) spills little under them: fwd
        # with a scalar gate, bwd without per-key gates or mLSTMexp; not fwd without a gate,
        # per-key or mLSTMexp, which spill hundreds of bytes under the cap
        cap = SCAN_REGISTERS // (SCAN_PROGRAMS_PER_SM * 32 * scan_warps)
        fwd_cap = cap if gate == GATE_SCALAR.value and not mexp else 0
        bwd_cap = cap if gate != GATE_KEY.value and not mexp else 0
        if gate != GATE_KEY.value:
            # bwd_dqk with one 128-wide K block on 8 warps (faster than BK 64 on 4 warps; BK
            # 128 on 4 warps spills)
            BKQ, dqk_warps = head_tile(K, 128), 8
        else:
            # per-key bwd_dqk: the diagonal's [BT, BT, BKQ] weights bound BKQ (gated_bwd); 64
            # on 4 warps is the fastest (each K block recomputes do v^T and the earlier tiles'
            # weights)
            BKQ = head_tile(K, 64)
            # per-key: tile kernels on 1 stage, scans on 2
            stages, scan_stages = 1, 2
    if L % BT or L & (L - 1) or BT < 16:
        raise ValueError(f"chunk length {L} must be a power of two and a multiple of the tile {BT} >= 16")
    cfg = KernelConfig(gate, has_kw, mexp, noncausal, dtype == torch.float32, BK, BV, BVS, warps,
                       scan_warps, stages, BKQ, dqk_warps, scan_stages=scan_stages,
                       fwd_scan_maxnreg=fwd_cap, bwd_scan_maxnreg=bwd_cap, BTQ=BTQ,
                       mexp_float32_do=mexp and dtype == torch.float16)
    if override.fields:
        cfg = dataclasses.replace(cfg, **dict(override.fields))
    return cfg, L, BT


def gate_dtype(cfg) -> torch.dtype:
    """dtype of the chunk-local log-decay cumsums b (and mLSTMexp's m) that the kernels turn
    into exp(b_t - b_s). float32 holds b_t only to eps * |b_t|, and |b_t| grows along the
    chunk (~64 at L = 128 for log-decays around -0.5), so for float32 inputs a float32 b
    alone costs weights a relative 1e-5: measured on the H200 as 10-25x the float32
    oracle's error. float64 sums keep the differences exact to float32 rounding; the
    16-bit paths keep float32 (their tolerance is 2^-8)."""
    return torch.float64 if cfg.ieee else torch.float32


class Saved(NamedTuple):
    """What chunk_forward keeps for chunk_backward (None where the flags need none).

    gb    chunk-local cumsum of the log-decays, [TT, H] or [TT, H, K] in gate_dtype (gated)
    gm    mLSTMexp's stabiliser m, [TT, H] in gate_dtype
    start mLSTMexp's "m set by i here" flags, [TT, H] int8
    mpc   mLSTMexp's m before each chunk, [max(NC, 1), H] in gate_dtype
    qn    mLSTMexp's n^T q, [TT, H] float32
    hfin  mLSTMexp's final C, [N, H, K, V] float32 (the m-path's share of the gradient)
    A     per-key gates' intra-tile scores, [TT, H, BT] in q's dtype
    h     chunk states, [NC + N, H, K, V] in gated_fwd.state_dtype (keep_states)
    hn    mLSTMexp's normaliser at the same slots, [NC + N, H, K] float32 (keep_states)
    """
    gb: torch.Tensor | None
    gm: torch.Tensor | None
    start: torch.Tensor | None
    mpc: torch.Tensor | None
    qn: torch.Tensor | None
    hfin: torch.Tensor | None
    A: torch.Tensor | None
    h: torch.Tensor | None
    hn: torch.Tensor | None


def saved_specs(cfg, BT, TT, H, K, V, N, slots, chunk_rows, dtype, keep_states):
    """{name: (shape, dtype)} of the Saved fields chunk_forward fills for these flags (the
    others are None), in Saved's order: what a fake (shape-only) forward must return. BT:
    the layout's tile; slots = NC + N (state slots), chunk_rows = max(NC, 1); sizes may be
    symbolic; dtype is q's."""
    gdt = gate_dtype(cfg)
    specs = {}
    if cfg.mexp or cfg.gate:
        specs["gb"] = ((TT, H, K) if cfg.gate == GATE_KEY.value else (TT, H), gdt)
    if cfg.mexp:
        specs.update(gm=((TT, H), gdt), start=((TT, H), torch.int8),
                     mpc=((chunk_rows, H), gdt), qn=((TT, H), torch.float32),
                     hfin=((N, H, K, V), torch.float32))
    if cfg.gate == GATE_KEY.value:
        specs["A"] = ((TT, H, BT), dtype)
    if keep_states:
        specs["h"] = ((slots, H, K, V), state_dtype(cfg, dtype))
        if cfg.mexp:
            specs["hn"] = ((slots, H, K), torch.float32)
    return specs


def chunk_forward(q, k, v, g, kw, h0, n0, m0, layout, cfg, scale, want_final, keep_states,
                  defined=False):
    """The family's forward (see GatedChunkFunction for the tensors). defined: every element
    of the saved tensors written (the custom op returns them; see key_scores).

    Returns (o, ht, nt, mt, saved): o [TT, H, V]; the final state (ht [N, H, K, V], and
    nt [N, H, K], mt [N, H] for MEXP) or Nones unless want_final; saved (Saved) for
    chunk_backward, with h and hn only when keep_states (else the backward recomputes them)."""
    gf_is_const = g is not None and g.dim() == 1
    gb = gm = start = mpc = mfin = None
    gdt = gate_dtype(cfg)
    if gf_is_const:                                               # constant decay [H]
        g = g.view(1, -1).expand(layout.TT, -1).contiguous()      # [TT, H]
    if cfg.mexp:
        gb, gm, start, mpc, mfin = mexp_prep(g, kw, m0, layout, gdt)  # b, m, m's sources
    elif g is not None:
        gb = chunk_cumsum(g, layout, dtype=gdt)                   # chunk-local cumsum
    h, hn, hf = _states(k, v, gb, gm, kw, mpc, h0, n0, layout, cfg)
    A = key_scores(q, k, gb, layout, cfg, scale, defined) if cfg.gate == GATE_KEY.value else None  # [TT, H, BT]
    o, qn = fwd_o(q, k, v, gb, gm, kw, mpc, h, hn, layout, cfg, scale, A=A)
    ht = nt = mt = None
    if want_final:
        ht = hf                                                   # [N, H, K, V] float32
        if cfg.mexp:
            nt, mt = hn.index_select(0, layout.final_slot), mfin
    keep = (h, hn) if keep_states else (None, None)
    hfin = hf if cfg.mexp else None                               # the m-path's final C
    return o, ht, nt, mt, Saved(gb, gm, start, mpc, qn, hfin, A, *keep)


def chunk_backward(q, k, v, kw, h0, n0, m0, saved, o, layout, dqk_layout, cfg, scale, do, dht,
                   dnt, dmt, need_dg, const_gate):
    """The family's backward from chunk_forward's saved tensors and o; do [TT, H, V], dht,
    dnt, dmt the final state's cotangents or None. need_dg: the log-decay needs a gradient
    (a frozen decay skips the gate sums). const_gate: g was [H] (its gradient is summed).

    Returns dq, dk, dv, dg, dkw, dh0, dn0, dm0 (None where there is no such input)."""
    gb, gm, start, mpc, qn, hfin, A, h, hn = saved
    V = v.shape[-1]
    do = do.contiguous()
    if cfg.mexp_float32_do:
        do = do.float()                     # float16's range (KernelConfig.mexp_float32_do)
    dht = None if dht is None else dht.float().contiguous()
    dnt = None if dnt is None else dnt.float().contiguous()
    if cfg.mexp and dht is not None and dnt is None:
        dnt = torch.zeros(dht.shape[:-1], dtype=torch.float32, device=dht.device)
    if h is None:                                                  # recompute the states
        h, hn, _ = _states(k, v, gb, gm, kw, mpc, h0, n0, layout, cfg)
    rd = dqn = so = None
    if cfg.mexp:
        # o = h / d with d = max(|qn|, exp(-m)) + eps: cotangents of h (do / d) and of qn
        floor = torch.exp(-gm).float()
        rd = 1.0 / (torch.maximum(qn.abs(), floor) + MLSTM_EPS)
        so = row_dot(do, o)                                            # [TT, H] float32
        dqn = -(torch.sign(qn) * (qn.abs() > floor)) * so * rd
    # a frozen decay (g needs no gradient, e.g. RetNet's fixed gammas) skips the gate sums;
    # mLSTM's gates always take them (its key log-weight's gradient is one of them)
    gate_sums = need_dg or cfg.has_kw
    dh, dh0, sdot = bwd_states(q, do, gb, gm, mpc, rd, dht, h, h0 is not None, layout, cfg,
                               scale, V, gate_sums)
    if sdot is not None and h0 is not None and h.dtype != h0.dtype and not cfg.mexp:
        sdot = _initial_state_sdot(sdot, dh, h, h0, gb, layout)
    dhn = dn0 = None
    if cfg.mexp:
        dhn, dn0, npart = mexp_norm.backward(q, gb, gm, mpc, dqn, dnt, hn, h0 is not None,
                                             layout, cfg, scale)
        if sdot is not None:
            sdot = sdot + npart                     # the normaliser's share of the gate sums
    dv = bwd_dv(q, k, do, gb, gm, kw, rd, dh, layout, cfg, scale, v.dtype, V, A=A)
    del A
    dsc = key_dscores(do, v, layout, cfg) if cfg.gate == GATE_KEY.value else None  # [TT, H, L] float32
    dq, dk, gsum = bwd_dqk(q, k, v, do, gb, gm, kw, mpc, rd, dqn, h, hn, dh, dhn,
                           dqk_layout or layout, cfg, scale, gate_sums, dsc=dsc)
    del dsc
    dg = dkw = dm0 = None
    if gate_sums and cfg.gate == GATE_SCALAR.value:
        qdq, kdk, kdk_state, kdk_all = gsum
        if cfg.mexp and dht is not None and dh.dtype != torch.float32:
            _final_start_dht_(kdk_state, kdk_all, k, v, kw, gb, gm, start, dht, dh, layout)
        dg = _gate_grad(qdq - kdk, kdk_state, sdot, layout, gate_dtype(cfg))  # [TT, H]
        dkw = kdk_all
        if cfg.mexp:
            nfin = hn.index_select(0, layout.final_slot)
            dg, dkw, dm0 = _mexp_m_path(dg, dkw, start, rd, so, hfin, nfin, dht, dnt, dmt,
                                        h0, n0, m0, dh0, dn0, layout)
    elif gate_sums and cfg.gate == GATE_KEY.value:
        dg = _gate_grad(*gsum, sdot, layout, gate_dtype(cfg))         # [TT, H, K]
    if dg is not None and const_gate:
        dg = dg.sum(0)                                                 # [H], in gdt
    if dg is not None:
        dg = dg.float()
    return dq, dk, dv, dg, dkw, dh0, dn0, dm0


class GatedChunkFunction(torch.autograd.Function):
    """One chunked recurrence for the whole family (flags in cfg).

    Inputs: q, k [TT, H, K], v [TT, H, V] (one dtype); g None | [H] | [TT, H] | [TT, H, K]
    float32 log-decay; kw None | [TT, H] float32 key log-weight; h0 None | [N, H, K, V]
    float32; n0 [N, H, K], m0 [N, H] float32 (MEXP). Outputs: o [TT, H, V] in v's dtype and,
    when want_final, the final state [N, H, K, V] (and n [N, H, K], m [N, H] for MEXP).
    (Under torch.compile the same two functions run as the custom ops of
    linattn.ops.custom_ops.)
    """

    @staticmethod
    def forward(ctx, q, k, v, g, kw, h0, n0, m0, layout, cfg, scale, want_final, dqk_layout,
                keep_states):
        o, ht, nt, mt, saved = chunk_forward(q, k, v, g, kw, h0, n0, m0, layout, cfg, scale,
                                             want_final, keep_states)
        ctx.save_for_backward(q, k, v, kw, h0, n0, m0, o, *saved)
        ctx.layout, ctx.cfg, ctx.scale = layout, cfg, scale
        ctx.dqk_layout = dqk_layout or layout
        ctx.const_gate = g is not None and g.dim() == 1
        return o, ht, nt, mt

    @staticmethod
    def backward(ctx, do, dht, dnt, dmt):
        q, k, v, kw, h0, n0, m0, o, *saved = ctx.saved_tensors
        grads = chunk_backward(q, k, v, kw, h0, n0, m0, Saved(*saved), o, ctx.layout,
                               ctx.dqk_layout, ctx.cfg, ctx.scale, do, dht, dnt, dmt,
                               ctx.needs_input_grad[3], ctx.const_gate)
        return (*grads, None, None, None, None, None, None)


def _states(k, v, gb, gm, kw, mpc, h0, n0, layout, cfg):
    """(h, hn, hf): the chunk states and final state (gated_fwd.fwd_states), and mLSTMexp's
    normaliser at the same slots (mexp_norm.forward; None for the other ops)."""
    h, hf = fwd_states(k, v, gb, gm, kw, mpc, h0, layout, cfg)
    hn = mexp_norm.forward(k, gb, gm, kw, mpc, n0, layout, cfg) if cfg.mexp else None
    return h, hn, hf


def _gate_grad(db, state_part, sdot, layout, dtype):
    """d log-decay from the per-token sums: with b the chunk-local cumsum of the log-decays,
    dL/db_t = q_t.dq_t - k_t.dk_t (+ <dS_{c+1}, S_{c+1}> at the chunk's last token), and
    dg = the chunk-local reverse cumsum of dL/db. The state part of k.dk (state_part) and the
    fresh-key part of <dS_{c+1}, S_{c+1}> are equal sums over the chunk, so instead of adding
    both and letting them cancel in the reverse cumsum, dg_t takes sdot = <dS_{c+1}, decay S_c>
    and the state part of the keys before t (an exclusive forward cumsum): same value,
    without the cancellation that bf16 operands turn into an O(1e-1) error. Summed in dtype
    (float64 for float32 inputs: a constant decay's gradient adds up every token's)."""
    db = db.to(dtype).contiguous()           # q.dq - k.dk without the state part (may be a copy)
    db[layout.chunk_last] += sdot.to(dtype)
    return gate_grad_(db, state_part.contiguous(), layout)                # in place: no extra [TT, H, K]


def _initial_state_sdot(sdot, dh, h, h0, gb, layout):
    """sdot with each sequence's first chunk taking the initial state as given: bwd_states
    forms <exp(le) dS_1, S_0> from h, which holds S_0 rounded to the inputs' 16 bits; at short
    sequences that rounding, summed over K * V products, is most of the gate gradient's error
    (5x the inputs' own rounding at T 1). Adds <exp(le) dS_1, S_0 - rounded S_0>, with dS_1
    from dh (16-bit there too: the sum's error is the product of two roundings). Scalar
    ([NC, H]) and per-key ([NC, H, K]) sdot; not mLSTMexp, whose chunk decay carries the
    stabiliser."""
    ne = layout.nonempty                                                 # [N'] int64
    first = layout.chunk_off[:-1].long()[ne]                             # each first chunk
    slot = first + ne                                                    # S_0's slot in h
    rest = (dh[slot + 1].float() * (h0[ne] - h[slot].float())).sum(-1)  # [N', H, K]
    decay = torch.exp(gb[layout.chunk_last[first]].float())              # [N', H] or [N', H, K]
    corr = decay * (rest.sum(-1) if sdot.dim() == 2 else rest)
    return sdot.index_add(0, first, corr.to(sdot.dtype))


def _final_start_dht_(kdk_state, dkw, k, v, kw, gb, gm, start, dht, dh, layout):
    """Adds to the state part of k.dk (kdk_state and dkw, [TT, H] float32) of each sequence's
    last stabiliser start a (the token whose i_a set m_T) its share of the final state's
    cotangent as given, where a lies in the final chunk: bwd_dqk formed it from the 16-bit
    copy of dht in dh, and the m-path (_mexp_m_path) takes exactly that share back out in
    float32 (-<dht, C_T>, in which k_a v_a^T has weight exp(i_a + b_T - b_a - m_T) = 1). Left
    16-bit, the two cancel only to dht's rounding summed over K * V products, an error that
    no rounding of the inputs shows: 5.9x di's rounding-only error at `linattn selftest`'s T 1
    (bfloat16). Adds exp(b_T - m_T - b_a + i_a) k_a^T (dht - dh_T) v_a, one [N, H, K, V]
    product (no k_a where the final chunk has no start: the m-path's segment then reaches
    back past the chunk, into states that dh holds rounded as a whole)."""
    ne = layout.nonempty                                                  # [N'] int64
    if not ne.numel():
        return
    H = start.shape[1]
    last = layout.cu[1:].long()[ne] - 1                                   # each final token
    cs = layout.chunk_start[layout.chunk_off[1:].long()[ne] - 1].long()  # its chunk's first
    rows = cs[:, None] + torch.arange(layout.L, device=cs.device)        # [N', L]
    inside = rows <= last[:, None]
    rows = torch.minimum(rows, last[:, None])
    pos = torch.arange(layout.L, device=cs.device)[None, :, None]
    cand = torch.where(inside[..., None] & start[rows].bool(), pos, -1)  # [N', L, H]
    ia = cand.amax(1)                                                     # [N', H]
    a = cs[:, None] + ia.clamp(min=0)                                     # [N', H] token a
    hh = torch.arange(H, device=cs.device).expand_as(a)
    e = torch.exp(gb[last] - gm[last] - gb[a, hh] + kw[a, hh]).float()   # [N', H], <= 1
    e = torch.where(ia >= 0, e, torch.zeros_like(e))
    resid = dht[ne] - dh[layout.final_slot[ne]].float()                   # [N', H, K, V]
    ka, va = k[a, hh].float(), v[a, hh].float()                           # [N', H, K], [N', H, V]
    corr = e * torch.einsum("nhk,nhkv,nhv->nh", ka, resid, va)
    kdk_state[a, hh] += corr            # (a, h) pairs are distinct: no accumulation races
    dkw[a, hh] += corr


def _mexp_m_path(dg, dkw, start, rd, so, hfin, nfin, dht, dnt, dmt, h0, n0, m0, dh0, dn0, layout):
    """Adds the gradient through the stabiliser m to d logsigmoid(f), d i and d m0.

    o_t depends on m_t only through eps: do_t/dm_t = -o_t eps / d_t; the final state (C, n, m)
    depends on m_T as C = C~ exp(-m_T). m_t = i_a + sum of logsigmoid(f) over (a, t] where a is
    the token that set the maximum (start_a = 1), or m0 + the sum from the sequence start: a
    segmented reverse cumsum G of those cotangents gives d i_a = G_a and d lf_w = G_w for w
    inside a segment. Computed in float64 on [TT, H]."""
    TT, H = start.shape
    gdir = (-MLSTM_EPS * rd * so).double()                                 # [TT, H]
    ne = layout.nonempty                                                   # int64 indices: no sync
    first = layout.first_tok[ne]
    last = layout.cu[1:].long()[ne] - 1
    if dht is not None:
        fin = -(dht * hfin).sum((-2, -1)) - (dnt * nfin).sum(-1)           # [N, H]
        if dmt is not None:
            fin = fin + dmt.float()
        gdir[last] += fin[ne].double()
    elif dmt is not None:
        gdir[last] += dmt[ne].double()
    st = start.bool()
    seg = st.clone()
    # sequences restart; index_fill_, not seg[first] = True: a Python scalar set through tensor
    # indices is copied host-to-device from pageable memory, a sync that stalls the queue
    seg.index_fill_(0, first, True)
    # The scans run along the last, contiguous axis ([H, TT], tokens innermost): PyTorch scans
    # a leading axis of [TT, H] with one thread per column, 65536 sequential steps each.
    idx = torch.arange(TT, device=st.device).expand(H, TT)
    cand = torch.where(seg.t(), idx, torch.full_like(idx, TT))            # [H, TT]
    cand = torch.cat([cand[:, 1:], torch.full((H, 1), TT, dtype=cand.dtype, device=cand.device)], 1)
    nxt = torch.flip(torch.cummin(torch.flip(cand, [1]), 1).values, [1])  # next segment start
    g_ht = gdir.t().contiguous()                                           # [H, TT]
    rc = torch.flip(torch.cumsum(torch.flip(g_ht, [1]), 1), [1])          # reverse cumsum
    rc = torch.cat([rc, torch.zeros(H, 1, dtype=rc.dtype, device=rc.device)], 1)
    G = (rc[:, :-1] - rc.gather(1, nxt)).t()                               # segment tail sums [TT, H]
    zero = torch.zeros((), dtype=G.dtype, device=G.device)
    dg = dg + torch.where(st, zero, G).float()
    dkw = dkw + torch.where(st, G, zero).float()
    dm0 = None
    if m0 is not None:
        dm0 = (dh0 * h0).sum((-2, -1)) + (dn0 * n0).sum(-1)                # exp(+m0) in every use
        g_first = torch.zeros(layout.N, H, dtype=torch.float64, device=G.device)
        g_first[ne] = torch.where(st[first], zero, G[first])
        dm0 = dm0 + g_first.float()
        empty_fin = dmt.float() if dmt is not None else torch.zeros_like(dm0)
        dm0 = torch.where((layout.seq_len > 0)[:, None], dm0, empty_fin)  # empty: m_T = m0
    return dg, dkw, dm0


# ----------------------------------------------------------------------------- entry points

def _flat(x, TT):
    """[B, T, H, D] -> contiguous [TT, H, D] (a copy only for non-contiguous inputs)."""
    return x.reshape(TT, *x.shape[2:]).contiguous()


def layouts(cfg, L, BT, B, T, cu_seqlens, device):
    """(layout, dqk_layout) of B sequences of T tokens or of cu_seqlens [N+1] (read on the
    host: one sync) for _config's (cfg, L, BT); dqk_layout is None where bwd_dqk shares the
    layout's tiles."""
    lengths = lengths_of(cu_seqlens, B, T)
    layout = make_layout(lengths, L, BT, device)
    dqk_layout = make_layout(lengths, L, cfg.BTQ, device) if cfg.BTQ not in (0, BT) else None
    return layout, dqk_layout


def run_chunks(q, k, v, g, kw, h0, n0, m0, cu_seqlens, B, *, gate, has_kw=False, mexp=False,
               noncausal=False, scale, want_final, save_for_backward="states",
               override: Override | None = None):
    """GatedChunkFunction on packed inputs (see it for the tensors; B: the batch, so that
    T = TT / B without cu_seqlens) -> (o, ht, nt, mt). save_for_backward: "states" keeps the
    forward's chunk states for the backward, "recompute" recomputes them there
    (linattn.ops.api.linear_attention); override: _config's departures for this call. Under
    torch.compile the same forward and backward run as the custom ops
    linattn::gated_chunk(_backward), which build the layout inside (linattn.ops.custom_ops)
    from the default config."""
    keep_states = save_for_backward == "states"
    if torch.compiler.is_compiling():
        from ..custom_ops import gated_chunk
        return gated_chunk(q, k, v, g, kw, h0, n0, m0, cu_seqlens, B, gate=gate, has_kw=has_kw,
                           mexp=mexp, noncausal=noncausal, scale=scale, want_final=want_final,
                           keep_states=keep_states)
    cfg, L, BT = _config(gate, q.shape[-1], v.shape[-1], q.dtype, has_kw=has_kw, mexp=mexp,
                         noncausal=noncausal, override=override)
    layout, dqk_layout = layouts(cfg, L, BT, B, q.shape[0] // max(B, 1), cu_seqlens, q.device)
    return GatedChunkFunction.apply(q, k, v, g, kw, h0, n0, m0, layout, cfg, scale, want_final,
                                    dqk_layout, keep_states)


def linear_attention(q, k, v, g=None, *, scale, initial_state=None, output_final_state=False,
                     cu_seqlens=None, causal=True, save_for_backward="states",
                     override: Override | None = None):
    """Gated linear attention on the Triton kernels (see linattn.ops.api.linear_attention).

    q, k [B, T, H, K], v [B, T, H, V] (float32 / bfloat16 / float16); g None | [H] |
    [B, T, H] | [B, T, H, K] log-decay; initial_state [B or N, H, K, V]; save_for_backward
    "states" | "recompute", override: departures from the launch choices (run_chunks).
    Returns o [B, T, H, V] in v's dtype and the final state [B or N, H, K, V] float32 or None.
    """
    if q.dtype == torch.float64:
        return torch_chunked.linear_attention(q, k, v, g, scale=scale, initial_state=initial_state,
                                              output_final_state=output_final_state,
                                              cu_seqlens=cu_seqlens, causal=causal)
    B, T, H, K = q.shape
    V = v.shape[-1]
    TT = B * T
    gate = gate_of(g)
    gf = None
    if g is not None:
        gf = g.float()
        if g.dim() > 1:
            gf = gf.reshape(TT, H, K) if g.dim() == 4 else gf.reshape(TT, H)
        gf = gf.contiguous()                                        # [H], [TT, H] or [TT, H, K]
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht, _, _ = run_chunks(_flat(q, TT), _flat(k, TT), _flat(v, TT), gf, None, h0, None, None,
                             cu_seqlens, B, gate=gate, noncausal=not causal, scale=float(scale),
                             want_final=bool(output_final_state),
                             save_for_backward=save_for_backward, override=override)
    return o.view(B, T, H, V), (ht if output_final_state else None)


def mlstm(q, k, v, i, f, *, input_gate="exp", scale, initial_state=None, output_final_state=False,
          cu_seqlens=None, save_for_backward="states", override: Override | None = None):
    """xLSTM's mLSTM on the Triton kernels (see linattn.ops.api.mlstm).

    q, k [B, T, H, K], v [B, T, H, V]; i, f [B, T, H] pre-activations. input_gate "exp":
    initial_state (C [N, H, K, V], n [N, H, K], m [N, H]) and the same tuple as final state;
    "sigmoid": C alone. save_for_backward "states" | "recompute", override (run_chunks). Returns o [B, T, H, V] in v's dtype and the final state or None.
    """
    if q.dtype == torch.float64:
        return torch_chunked.mlstm(q, k, v, i, f, input_gate=input_gate, scale=scale,
                                   initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    TT = B * T
    mexp = input_gate == "exp"
    lf = F.logsigmoid(f.float()).reshape(TT, H).contiguous()       # log forget gate
    h0 = n0 = m0 = None
    if mexp:
        kw = i.float().reshape(TT, H).contiguous()                  # exp(i - m) k v^T
        if initial_state is not None:
            h0, n0, m0 = (s.float().contiguous() for s in initial_state)
    else:
        kw = F.logsigmoid(i.float()).reshape(TT, H).contiguous()   # sigmoid(i) k v^T
        if initial_state is not None:
            h0 = initial_state.float().contiguous()
    o, ht, nt, mt = run_chunks(_flat(q, TT), _flat(k, TT), _flat(v, TT), lf, kw, h0, n0, m0,
                               cu_seqlens, B, gate=GATE_SCALAR.value, has_kw=True, mexp=mexp,
                               scale=float(scale), want_final=bool(output_final_state),
                               save_for_backward=save_for_backward, override=override)
    o = o.view(B, T, H, V)
    if not output_final_state:
        return o, None
    return o, ((ht, nt, mt) if mexp else ht)
