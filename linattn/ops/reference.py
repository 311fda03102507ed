"""Naive step-by-step recurrences: the project's oracle.

One Python loop over time per op, written to be obviously right rather than fast. Run it in
float64 to judge every other path (docs/design.md section 5). Arguments are assumed valid
(`linattn.ops.api` validates); layout is [B, T, H, D], states are [B, H, K, V].

Computation happens in float64 for float64 inputs and float32 otherwise; outputs take v's
dtype, states stay in the compute dtype. Gradients come from autograd through the loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MLSTM_EPS = 1e-6  # mLSTMexp: o = h / (max(|n^T q|, exp(-m)) + eps)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_key_log_decay(g, B, T, H, K, dtype, device):
    """Any gate shape -> [B, T, H, K] log-decay (None -> zeros)."""
    if g is None:
        return torch.zeros(B, T, H, K, dtype=dtype, device=device)
    g = g.to(dtype)
    if g.dim() == 1:  # [H] constant per head
        return g.view(1, 1, H, 1).expand(B, T, H, K)
    if g.dim() == 3:  # [B, T, H] scalar per step
        return g.unsqueeze(-1).expand(B, T, H, K)
    return g  # [B, T, H, K]


def _zeros_or(state, shape, dtype, device):
    """The given state in the compute dtype, or zeros of shape."""
    return torch.zeros(shape, dtype=dtype, device=device) if state is None else state.to(dtype)


def over_sequences(run, cu_seqlens, tensors, initial_state, output_final_state, out_dtype):
    """run(*tensors, state) on the whole batch, or on each packed sequence of cu_seqlens.

    Each packed sequence n gets its own slice of initial_state (a tensor [N, ...] or a tuple
    of them) or None. Tensors that are None or per-head ([H]) pass unsliced. Returns o in
    out_dtype and the final states concatenated over sequences (tuples element-wise), or
    None when not asked for. cu_seqlens: None, an int tensor [N+1], or its offsets as a list
    (from a caller that has read them to the host). Shared by the reference and the chunked
    PyTorch path (linattn.ops.varlen)."""
    if cu_seqlens is None:
        o, st = run(*tensors, initial_state)
        return o.to(out_dtype), (st if output_final_state else None)
    c = cu_seqlens if isinstance(cu_seqlens, list) else cu_seqlens.tolist()
    outs, finals = [], []
    for n, (s, e) in enumerate(zip(c[:-1], c[1:])):
        sub = [t if t is None or t.dim() == 1 else t[:, s:e] for t in tensors]
        st0 = None if initial_state is None else (
            tuple(x[n : n + 1] for x in initial_state) if isinstance(initial_state, tuple)
            else initial_state[n : n + 1])
        o_n, st_n = run(*sub, st0)
        outs.append(o_n)
        finals.append(st_n)
    o = torch.cat(outs, dim=1).to(out_dtype)
    if not output_final_state:
        return o, None
    if isinstance(finals[0], tuple):
        return o, tuple(torch.cat([f[j] for f in finals], 0) for j in range(len(finals[0])))
    return o, torch.cat(finals, 0)


def linear_attention(q, k, v, g=None, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, causal=True):
    """S_t = exp(g_t) * S_{t-1} + k_t v_t^T,  o_t = S_t^T (scale q_t).  (gates per key row)"""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q)

    if not causal:
        def bidir(qs, ks, vs):
            kv = torch.einsum("bthk,bthv->bhkv", ks.to(dt), vs.to(dt))
            return torch.einsum("bthk,bhkv->bthv", qs.to(dt) * scale, kv)
        return over_sequences(lambda qs, ks, vs, st: (bidir(qs, ks, vs), None), cu_seqlens,
                              (q, k, v), None, False, v.dtype)

    def run(qs, ks, vs, gs, st):
        Bs, Ts = qs.shape[:2]
        S = _zeros_or(st, (Bs, H, K, V), dt, q.device)
        gk = _per_key_log_decay(gs, Bs, Ts, H, K, dt, q.device)
        os = []
        for t in range(Ts):
            S = torch.exp(gk[:, t]).unsqueeze(-1) * S \
                + ks[:, t].to(dt).unsqueeze(-1) * vs[:, t].to(dt).unsqueeze(-2)
            os.append(torch.einsum("bhk,bhkv->bhv", qs[:, t].to(dt) * scale, S))
        o = torch.stack(os, dim=1) if os else vs.new_zeros(Bs, 0, H, V, dtype=dt)
        return o, S

    return over_sequences(run, cu_seqlens, (q, k, v, g), initial_state, output_final_state,
                          v.dtype)


def delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None,
               output_final_state=False, cu_seqlens=None):
    """S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q)

    def run(qs, ks, vs, bs, gs, st):
        Bs, Ts = qs.shape[:2]
        S = _zeros_or(st, (Bs, H, K, V), dt, q.device)
        os = []
        for t in range(Ts):
            kt, vt, bt = ks[:, t].to(dt), vs[:, t].to(dt), bs[:, t].to(dt)  # [B,H,K] [B,H,V] [B,H]
            if gs is not None:
                S = torch.exp(gs[:, t].to(dt))[..., None, None] * S
            # S <- S + beta k (v - S^T k)^T  ==  (I - beta k k^T) S + beta k v^T
            err = vt - torch.einsum("bhkv,bhk->bhv", S, kt)
            S = S + bt[..., None, None] * kt.unsqueeze(-1) * err.unsqueeze(-2)
            os.append(torch.einsum("bhk,bhkv->bhv", qs[:, t].to(dt) * scale, S))
        o = torch.stack(os, dim=1) if os else vs.new_zeros(Bs, 0, H, V, dtype=dt)
        return o, S

    return over_sequences(run, cu_seqlens, (q, k, v, beta, g), initial_state,
                          output_final_state, v.dtype)


def mlstm(q, k, v, i, f, *, input_gate="exp", scale=None, initial_state=None,
          output_final_state=False, cu_seqlens=None):
    """xLSTM's mLSTM, input_gate "exp" (stabilised, normalised) or "sigmoid" (no normaliser)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q)

    if input_gate == "sigmoid":
        # C_t = sigmoid(f_t) C_{t-1} + sigmoid(i_t) k_t v_t^T: linear attention, scaled keys.
        k_in = k.to(dt) * torch.sigmoid(i.to(dt)).unsqueeze(-1)
        return linear_attention(q.to(dt), k_in, v, F.logsigmoid(f.to(dt)), scale=scale,
                                initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)

    def run(qs, ks, vs, is_, fs, st):
        Bs, Ts = qs.shape[:2]
        C0, n0, m0 = (None, None, None) if st is None else st
        C = _zeros_or(C0, (Bs, H, K, V), dt, q.device)
        nv = _zeros_or(n0, (Bs, H, K), dt, q.device)
        m = _zeros_or(m0, (Bs, H), dt, q.device)
        os = []
        for t in range(Ts):
            lf, it = F.logsigmoid(fs[:, t].to(dt)), is_[:, t].to(dt)  # [B, H]
            m_new = torch.maximum(lf + m, it)
            decay, inp = torch.exp(lf + m - m_new), torch.exp(it - m_new)
            kt, vt = ks[:, t].to(dt), vs[:, t].to(dt)
            C = decay[..., None, None] * C + inp[..., None, None] * kt.unsqueeze(-1) * vt.unsqueeze(-2)
            nv = decay[..., None] * nv + inp[..., None] * kt
            m = m_new
            qh = qs[:, t].to(dt) * scale
            num = torch.einsum("bhk,bhkv->bhv", qh, C)
            den = torch.maximum((nv * qh).sum(-1).abs(), torch.exp(-m)) + MLSTM_EPS
            os.append(num / den.unsqueeze(-1))
        o = torch.stack(os, dim=1) if os else vs.new_zeros(Bs, 0, H, V, dtype=dt)
        return o, (C, nv, m)

    return over_sequences(run, cu_seqlens, (q, k, v, i, f), initial_state, output_final_state,
                          v.dtype)
