"""The fused recurrent step kernel: a few tokens at a time, state in registers (decoding).

One kernel serves every member of the family, picked by constexprs:

    GATE   common.GATE_KINDS: none | constant [H] | scalar [B, T, H] | per-key [B, T, H, K]
           (log-decay g)
    DELTA  the delta rule:  S <- A S;  S <- S + beta k (v - S^T k)^T
    MLSTM  0 no | 1 mLSTMsig: g = logsigmoid(f) (scalar), k scaled by sigmoid(i)
             | 2 mLSTMexp: stabiliser m and normaliser n carried beside C

Per step t (A_t the decay, w_t the input weight: 1, sigmoid(i_t) or exp(i_t - m_t)):

    S_t = A_t S_{t-1} + w_t k_t v_t^T          (delta: S_t = A_t S_{t-1} + beta_t k_t e_t^T,
                                                  e_t = v_t - (A_t S_{t-1})^T k_t)
    o_t = S_t^T (scale q_t)                    (mLSTMexp: / (max(|n_t^T q^_t|, exp(-m_t)) + eps))

One program per (batch * head, tile of BV value columns). Columns of S evolve independently
(the delta rule's error e_t is column-wise too), so tiling V needs no communication, while
the whole key dimension stays in one program (k^T S contracts over K). The [BK, BV] slice of
the state is loaded once, kept in registers for all T steps, and stored once, to a new
buffer or over the input (in place); all math is in ACC (float32, float64 for float64
inputs), whatever the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..alloc import empty
from ..reference import MLSTM_EPS
from .common import GATE_CONST, GATE_KEY, GATE_KINDS, GATE_SCALAR

MLSTM_KINDS = {None: 0, "sigmoid": 1, "exp": 2}


@triton.jit
def _logsigmoid(x):
    # log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), never overflows.
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def fused_recurrent_kernel(
    q, k, v, g, beta, gi, o,                    # inputs (g: log-decay or mLSTM's f; gi: mLSTM's i), output
    s_in, s_out, n_in, n_out, m_in, m_out,      # state: C [B,H,K,V]; mLSTMexp's n [B,H,K], m [B,H]
    scale, eps, T, H,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    K: tl.constexpr, V: tl.constexpr,
    GATE: tl.constexpr, DELTA: tl.constexpr, MLSTM: tl.constexpr,
    HAS_STATE: tl.constexpr, ACC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    tl.static_assert(BK >= K, "BK must cover the whole key dimension")
    tl.static_assert(BK <= 256, "head dims over 256 are not supported")
    tl.static_assert(BV <= 256, "BV tiles must be at most 256 wide")
    i_bh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]

    # [BK, BV] slice of the state, float32 (ACC) in registers for all T steps
    o_s = o_k[:, None] * V + o_v[None, :]          # int32 offsets inside one [K, V] state
    base_s = i_bh * K * V                          # int64 offset of this (batch, head)
    if HAS_STATE:
        b_s = tl.load(s_in + base_s + o_s, mask=mask_kv, other=0.0).to(ACC)
    else:
        b_s = tl.zeros([BK, BV], dtype=ACC)
    if MLSTM == 2:
        if HAS_STATE:
            b_n = tl.load(n_in + i_bh * K + o_k, mask=mask_k, other=0.0).to(ACC)
            b_m = tl.load(m_in + i_bh).to(ACC)
        else:
            b_n = tl.zeros([BK], dtype=ACC)
            b_m = tl.zeros([], dtype=ACC)
    if GATE == GATE_CONST:
        b_decay_const = tl.exp(tl.load(g + i_h).to(ACC))

    # token (b, t=0, h) in the [B, T, H] layout of the gates and o (advanced by H per step)
    tok = i_b * T * H + i_h
    p_q = q + i_b * stride_qb + i_h * stride_qh + o_k
    p_k = k + i_b * stride_kb + i_h * stride_kh + o_k
    p_v = v + i_b * stride_vb + i_h * stride_vh + o_v
    p_o = o + tok * V + o_v
    for _ in range(T):
        b_q = tl.load(p_q, mask=mask_k, other=0.0).to(ACC) * scale
        b_k = tl.load(p_k, mask=mask_k, other=0.0).to(ACC)
        b_v = tl.load(p_v, mask=mask_v, other=0.0).to(ACC)
        if GATE == GATE_SCALAR:
            b_g = tl.load(g + tok).to(ACC)
            if MLSTM != 0:
                b_g = _logsigmoid(b_g)  # mLSTM's f is a pre-activation
        if GATE == GATE_KEY:
            b_g = tl.load(g + tok * K + o_k, mask=mask_k, other=0.0).to(ACC)

        if MLSTM == 2:
            b_i = tl.load(gi + tok).to(ACC)
            b_m_new = tl.maximum(b_g + b_m, b_i)
            b_decay = tl.exp(b_g + b_m - b_m_new)
            b_kw = b_k * tl.exp(b_i - b_m_new)          # [BK] k_t exp(i_t - m_t)
            b_s = b_s * b_decay + b_kw[:, None] * b_v[None, :]
            b_n = b_n * b_decay + b_kw
            b_m = b_m_new
        else:
            if GATE == GATE_CONST:
                b_s = b_s * b_decay_const
            if GATE == GATE_SCALAR:
                b_s = b_s * tl.exp(b_g)
            if GATE == GATE_KEY:
                b_s = b_s * tl.exp(b_g)[:, None]
            if DELTA:
                b_beta = tl.load(beta + tok).to(ACC)
                b_err = b_v - tl.sum(b_s * b_k[:, None], axis=0)   # [BV] v - S^T k
                b_s = b_s + (b_beta * b_k)[:, None] * b_err[None, :]
            else:
                if MLSTM == 1:
                    b_i = tl.load(gi + tok).to(ACC)
                    b_k = b_k / (1.0 + tl.exp(-b_i))              # k sigmoid(i)
                b_s = b_s + b_k[:, None] * b_v[None, :]

        b_o = tl.sum(b_s * b_q[:, None], axis=0)                  # [BV] S^T q^
        if MLSTM == 2:
            b_den = tl.maximum(tl.abs(tl.sum(b_n * b_q, axis=0)), tl.exp(-b_m)) + eps
            b_o = b_o / b_den
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=mask_v)

        p_q += stride_qt
        p_k += stride_kt
        p_v += stride_vt
        p_o += H * V
        tok += H

    tl.store(s_out + base_s + o_s, b_s.to(s_out.dtype.element_ty), mask=mask_kv)
    if MLSTM == 2:
        # Every V tile computes n and m; the first one writes them.
        tl.store(n_out + i_bh * K + o_k, b_n.to(n_out.dtype.element_ty), mask=mask_k & (i_v == 0))
        tl.store(m_out + i_bh, b_m.to(m_out.dtype.element_ty), mask=i_v == 0)


def _pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python: triton.next_power_of_2 costs a few us a
    call, and a decode step is launch-latency bound)."""
    return 1 << (n - 1).bit_length()


def choose_block_v(K: int, V: int) -> int:
    """V tile width: about 4096 state elements per program (32 float32 registers a thread
    with 4 warps), at least 16, at most V's power of two."""
    return min(_pow2(V), max(16, 4096 // _pow2(K)))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_recurrent(q, k, v, *, scale: float, g=None, gate_kind="none", beta=None, i=None,
                    mlstm=None, state=None, inplace=False, block_v=None, num_warps=None):
    """Runs T steps of the recurrence in one launch. Inputs are assumed validated.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; any float dtype, any strides.
        scale: float multiplying q.
        g: log-decay of gate_kind ("none" | "const" [H] | "scalar" [B, T, H] | "key"
            [B, T, H, K]); for mLSTM, its f [B, T, H] (pre-activation) with gate_kind "scalar".
        beta: [B, T, H] or None (the delta rule when given).
        i: mLSTM's input-gate pre-activation [B, T, H]; mlstm: None | "sigmoid" | "exp".
        state: None (zeros), C [B, H, K, V], or for mlstm="exp" the tuple (C, n [B, H, K],
            m [B, H]). With inplace=True it must be contiguous in the compute dtype and is
            overwritten with the new state.
        block_v, num_warps: the tile width / warps in place of choose_block_v and 4
            (benchmark sweeps, and tests that split V over several programs).

    Returns:
        o [B, T, H, V] in v's dtype, and the new state (same structure as state; float32,
        float64 for float64 inputs; the given tensors when inplace=True).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    is_exp = mlstm == "exp"
    C = n = m = None
    if is_exp and state is not None:
        C, n, m = state
    elif state is not None:
        C = state

    if inplace:
        C_out, n_out, m_out = C, n, m
    else:
        C = None if C is None else C.to(acc).contiguous()
        C_out = empty(B, H, K, V, dtype=acc, device=q.device)
        if is_exp:
            n = None if n is None else n.to(acc).contiguous()
            m = None if m is None else m.to(acc).contiguous()
            n_out = empty(B, H, K, dtype=acc, device=q.device)
            m_out = empty(B, H, dtype=acc, device=q.device)
        else:
            n_out = m_out = None
    o = empty(B, T, H, V, dtype=v.dtype, device=q.device)

    def result():
        return o, ((C_out, n_out, m_out) if is_exp else C_out)

    if B * H == 0:
        return result()

    BK = _pow2(K)
    BV = block_v or choose_block_v(K, V)
    NV = -(-V // BV)
    if inplace and is_exp and NV > 1 and state is not None:
        # Every V tile reads the old n and m, and tile 0 overwrites them: read from copies.
        n, m = n.clone(), m.clone()
    if acc == torch.float64:
        # A Python float reaches the kernel as float32: apply scale in float64 here instead.
        q, scale = q * scale, 1.0
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    g = None if g is None else g.contiguous()
    beta = None if beta is None else beta.contiguous()
    i = None if i is None else i.contiguous()

    fused_recurrent_kernel[(B * H, NV)](
        q, k, v, g, beta, i, o,
        C, C_out, n, n_out, m, m_out,
        float(scale), MLSTM_EPS, T, H,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        K=K, V=V,
        GATE=GATE_KINDS[gate_kind], DELTA=beta is not None, MLSTM=MLSTM_KINDS[mlstm],
        HAS_STATE=state is not None, ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BK=BK, BV=BV, num_warps=num_warps or 4,
    )
    return result()
