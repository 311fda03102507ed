"""Chunkwise-parallel PyTorch path: the CPU backend and the readable statement of the math.

The sequence is cut into chunks of L = CHUNK tokens. Inside a chunk, outputs come from dense
(L x L) products; across chunks, a short sequential scan carries the [K, V] state. With b the
inclusive cumulative sum of the log-decays inside a chunk and S the state at the chunk's start:

    gated linear attention:
        O = (Q * exp(b)) S + ((Q K^T) * D) V,    D_ij = exp(b_i - b_j) for i >= j, else 0
        S <- exp(b_L) S + (K * exp(b_L - b))^T V
    delta rule (WY / UT form), Gamma_ij = exp(b_i - b_j):
        A = tril(diag(beta) (K K^T * Gamma), -1),   T = (I + A)^-1
        W = T diag(beta exp(b)) K,   U = T diag(beta) V,   U' = U - W S
        O = (Q * exp(b)) S + (tril(Q K^T) * Gamma) U'
        S <- exp(b_L) S + (K * exp(b_L - b))^T U'
    mLSTMexp: the gated form with the stabiliser m in closed form (see `_mlstm_exp_chunks`).

Numerics: gates in the compute dtype (float32, float64 for float64 inputs); their cumulative
sums b and every exponent in float64, the exponentials cast back to the compute dtype: float32
holds b_t only to eps |b_t|, and |b_t| grows along a chunk (~32 at L 64 for log-decays
around -0.5), which alone put float32 states and gate gradients over the tests' tolerance
rule (the Triton kernels' gated_api.gate_dtype makes the same choice). Every exponent is <= 0. Masked exponentials are exp(where(mask, x, -inf)), never where(mask, exp(x),
0), whose backward would give inf * 0 = NaN. Per-key gates are never exponentiated over a
whole chunk in one sign: each query sub-tile of SUB tokens takes its exponents relative to
its own first token, and the diagonal sub-tiles use exp(b_i - b_j) elementwise.

Packed sequences (cu_seqlens) run as one padded batch [N, Tpad] when the padding is bounded,
else one call per sequence (linattn.ops.varlen, whose `varlen` mode each op takes as a
keyword). A padding slot is an exact identity step of the recurrence:
    gated linear attention (and mLSTMsig, which is one): k = 0, g = 0, so S <- 1 * S + 0;
    delta rule: k = 0, beta = 0, g = 0, so W, U and K^T U' get zero rows and S <- 1 * S;
    mLSTMexp: k = 0, log forget gate 0 and input gate MLSTM_PAD_INPUT_GATE, so b_t and m_t
        stay those of the last real token (no padded term i_s + b_t - b_s wins the max),
        every padded weight exp(i_s + ... - m_t) is exp(~-1e30) = 0, and C, n, m pass
        unchanged.

Differentiable through torch autograd. Same signatures as linattn.ops.reference, plus the
keyword varlen ("auto" | "padded" | "loop").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .reference import MLSTM_EPS, compute_dtype
from .varlen import run_packed

CHUNK = 64  # tokens per chunk: one dense L x L block per chunk
SUB = 16    # query sub-tile for per-key gates (relative exponents within a sub-tile)
# mLSTMexp padding slot's input-gate preactivation: finite (the stabiliser's maxima subtract
# it without inf - inf), and so far below any real i + log-decay sum that exp of it minus the
# stabiliser underflows to exactly 0 in float32 and float64.
MLSTM_PAD_INPUT_GATE = -1e30


def _cumsum64(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Inclusive cumulative sum of log-decays along dim, in float64 (module docstring)."""
    return g.to(torch.float64).cumsum(dim=dim)


def _exp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(x) of a float64 exponent, in the compute dtype: the exponent (a difference of
    float64 cumsums, exact to its own rounding) is rounded to dtype first."""
    return torch.exp(x.to(dtype))


# ----------------------------------------------------------------------------- plumbing

def _chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """[B, T, H, ...] with T = N * L  ->  [B, H, N, L, ...]."""
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // L, L, H, *x.shape[3:])          # [B, N, L, H, ...]
    return x.movedim(3, 1)                                  # [B, H, N, L, ...]


def _unchunk(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, L, D]  ->  [B, N * L, H, D]."""
    B, H, N, L, D = x.shape
    return x.movedim(1, 3).reshape(B, N * L, H, D)


def _scan_in_chunks(chunk_fn, seq_tensors, state, L=CHUNK):
    """Runs chunk_fn over the full chunks, then over the tail as one shorter chunk.

    seq_tensors: [B, T, H, ...] tensors (None entries pass through). chunk_fn(state, *chunked)
    -> (o [B, H, N, L, V], state). Returns (o [B, T, H, V], final state)."""
    T = next(t for t in seq_tensors if t is not None).shape[1]
    outs = []
    head = (T // L) * L
    for start, end, length in ((0, head, L), (head, T, T - head)):
        if end == start:
            continue
        part = [None if t is None else _chunks(t[:, start:end], length) for t in seq_tensors]
        o, state = chunk_fn(state, *part)
        outs.append(_unchunk(o))
    return (torch.cat(outs, dim=1) if outs else None), state


def _causal_log_mask(b: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """[..., L] cumulative log-decays -> [..., L, L] with b_i - b_j where j <= i, else -inf."""
    L = b.shape[-1]
    keep = torch.ones(L, L, dtype=torch.bool, device=b.device).tril(-1 if strict else 0)
    diff = b.unsqueeze(-1) - b.unsqueeze(-2)
    return torch.where(keep, diff, torch.full_like(diff, float("-inf")))


# ----------------------------------------------------------------------------- gated family

def _intra_per_key(q, k, b):
    """(Q K^T * D) for per-key decays, [..., L, L], with every exponent <= 0.

    q, k, b: [..., L, K]. Query sub-tile a (rows a*SUB..) against earlier keys uses
    q_i exp(b_i - r) . k_j exp(r - b_j) with r = b at the sub-tile's first row; against its own
    sub-tile it uses exp(b_i - b_j) elementwise under the causal mask."""
    L = q.shape[-2]
    rows = []
    for a0 in range(0, L, SUB):
        a1 = min(a0 + SUB, L)
        r = b[..., a0 : a0 + 1, :]                                           # [..., 1, K]
        qa = q[..., a0:a1, :]
        blocks = []
        if a0 > 0:
            q_rel = qa * _exp(b[..., a0:a1, :] - r, qa.dtype)                 # [..., s, K]
            k_rel = k[..., :a0, :] * _exp(r - b[..., :a0, :], qa.dtype)       # [..., a0, K]
            blocks.append(q_rel @ k_rel.transpose(-1, -2))
        ba = b[..., a0:a1, :]                                                # [..., s, K]
        keep = torch.ones(a1 - a0, a1 - a0, dtype=torch.bool, device=b.device).tril()
        diff = ba.unsqueeze(-2) - ba.unsqueeze(-3)                           # [..., s, s, K]
        dmat = _exp(torch.where(keep[..., None], diff, torch.full_like(diff, float("-inf"))),
                    qa.dtype)
        blocks.append(torch.einsum("...ik,...jk,...ijk->...ij", qa, k[..., a0:a1, :], dmat))
        if a1 < L:
            blocks.append(qa.new_zeros(*qa.shape[:-1], L - a1))
        rows.append(torch.cat(blocks, dim=-1))
    return torch.cat(rows, dim=-2)


def _gated_chunks(state, q, k, v, g):
    """One pass over chunks of gated linear attention.

    q, k: [B, H, N, L, K]; v: [B, H, N, L, V]; g: None, [B, H, N, L] (scalar) or
    [B, H, N, L, K] (per key), log-decays; state [B, H, K, V]. All in the compute dtype."""
    if g is None:
        attn = (q @ k.transpose(-1, -2)).tril()                               # [B, H, N, L, L]
        q_in, k_out, chunk_decay = q, k, None
    else:
        b = _cumsum64(g, 3)                                                  # inclusive cumsum
        dt = q.dtype
        if g.dim() == 4:  # scalar gate: b [B, H, N, L]
            attn = (q @ k.transpose(-1, -2)) * _exp(_causal_log_mask(b), dt)
            b_last = b[..., -1:]                                             # [B, H, N, 1]
            q_in = q * _exp(b, dt).unsqueeze(-1)
            k_out = k * _exp(b_last - b, dt).unsqueeze(-1)
            chunk_decay = _exp(b_last, dt).unsqueeze(-1)                     # [B, H, N, 1, 1]
        else:             # per-key gate: b [B, H, N, L, K]
            attn = _intra_per_key(q, k, b)
            b_last = b[..., -1:, :]                                          # [B, H, N, 1, K]
            q_in = q * _exp(b, dt)
            k_out = k * _exp(b_last - b, dt)
            chunk_decay = _exp(b_last, dt).transpose(-1, -2)                 # [B, H, N, K, 1]
    o = attn @ v                                                             # intra-chunk
    kv = k_out.transpose(-1, -2) @ v                                         # [B, H, N, K, V]
    starts = []
    for n in range(q.shape[2]):                                              # inter-chunk scan
        starts.append(state)
        decayed = state if chunk_decay is None else chunk_decay[:, :, n] * state
        state = decayed + kv[:, :, n]
    o = o + q_in @ torch.stack(starts, dim=2)                                # + (Q exp(b)) S
    return o, state


def _prepare_gate(g, B, T, H, dt):
    """Any gate shape -> None, [B, T, H] or [B, T, H, K] in the compute dtype."""
    if g is None:
        return None
    g = g.to(dt)
    if g.dim() == 1:
        return g.view(1, 1, H).expand(B, T, H)
    return g


def linear_attention(q, k, v, g=None, *, scale, initial_state=None, output_final_state=False,
                     cu_seqlens=None, causal=True, varlen="auto"):
    """Chunked gated linear attention; same contract as linattn.ops.reference.linear_attention."""
    if not causal:  # bidirectional: one K^T V product per sequence, already parallel
        return reference.linear_attention(q, k, v, scale=scale, cu_seqlens=cu_seqlens, causal=False)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q)

    def run(qs, ks, vs, gs, st):
        Bs, Ts = qs.shape[:2]
        S = torch.zeros(Bs, H, K, V, dtype=dt, device=q.device) if st is None else st.to(dt)
        gs = _prepare_gate(gs, Bs, Ts, H, dt)
        o, S = _scan_in_chunks(_gated_chunks, [qs.to(dt) * scale, ks.to(dt), vs.to(dt), gs], S)
        return (vs.new_zeros(Bs, 0, H, V, dtype=dt) if o is None else o), S

    return run_packed(run, cu_seqlens, (q, k, v, g), (0.0, 0.0, 0.0, 0.0), initial_state,
                      output_final_state, v.dtype, chunk=CHUNK, mode=varlen)


# ----------------------------------------------------------------------------- mLSTM

def _mlstm_exp_chunks(state, q, k, v, i, lf):
    """mLSTMexp over chunks, with the stabiliser in closed form.

    q, k: [B, H, N, L, K]; v: [B, H, N, L, V]; i, lf: [B, H, N, L]; state (C, n, m).
    With b = cumsum(lf) in the chunk and m' the stabiliser at the chunk's start:
        m_t = max(b_t + m', max_{s<=t} (i_s + b_t - b_s))        (exactly the recurrence's m)
        h_t = exp(b_t + m' - m_t) C^T q_t + sum_{s<=t} exp(i_s + b_t - b_s - m_t) (q_t.k_s) v_s
    and likewise the normaliser with v_s -> k_s, which we get by appending a ones column to v:
    the running [C | n] is one [K, V+1] state."""
    C, nvec, m = state
    ones = torch.ones_like(v[..., :1])
    v1 = torch.cat([v, ones], dim=-1)                                        # [B, H, N, L, V+1]
    Cn = torch.cat([C, nvec.unsqueeze(-1)], dim=-1)                          # [B, H, K, V+1]
    dt = q.dtype
    b = _cumsum64(lf, -1)                                                    # [B, H, N, L]
    logw = _causal_log_mask(b) + i.unsqueeze(-2)                             # i_s + b_t - b_s
    row_max = logw.amax(dim=-1)                                              # [B, H, N, L]
    N = q.shape[2]
    outs = []
    for n in range(N):
        m_t = torch.maximum(b[:, :, n] + m.unsqueeze(-1), row_max[:, :, n])  # [B, H, L]
        carry = _exp(b[:, :, n] + m.unsqueeze(-1) - m_t, dt).unsqueeze(-1)   # [B, H, L, 1]
        w = _exp(logw[:, :, n] - m_t.unsqueeze(-1), dt)                      # [B, H, L, L]
        qn = q[:, :, n]
        h = carry * (qn @ Cn) + ((qn @ k[:, :, n].transpose(-1, -2)) * w) @ v1[:, :, n]
        num, den = h[..., :-1], h[..., -1]
        outs.append(num / (torch.maximum(den.abs(), _exp(-m_t, dt)) + MLSTM_EPS).unsqueeze(-1))
        m_new = m_t[..., -1].to(dt)                                          # [B, H]
        w_last = _exp(i[:, :, n] + b[:, :, n, -1:] - b[:, :, n] - m_new.unsqueeze(-1), dt)
        Cn = _exp(b[:, :, n, -1] + m - m_new, dt)[..., None, None] * Cn \
            + (k[:, :, n] * w_last.unsqueeze(-1)).transpose(-1, -2) @ v1[:, :, n]
        m = m_new
    return torch.stack(outs, dim=2), (Cn[..., :-1], Cn[..., -1], m)


def mlstm(q, k, v, i, f, *, input_gate="exp", scale, initial_state=None,
          output_final_state=False, cu_seqlens=None, varlen="auto"):
    """Chunked mLSTM; same contract as linattn.ops.reference.mlstm."""
    dt = compute_dtype(q)
    if input_gate == "sigmoid":  # linear attention with g = logsigmoid(f), keys scaled by sigmoid(i)
        k_in = k.to(dt) * torch.sigmoid(i.to(dt)).unsqueeze(-1)
        return linear_attention(q.to(dt), k_in, v, F.logsigmoid(f.to(dt)), scale=scale,
                                initial_state=initial_state, output_final_state=output_final_state,
                                cu_seqlens=cu_seqlens, varlen=varlen)
    B, T, H, K = q.shape
    V = v.shape[-1]

    def run(qs, ks, vs, is_, lfs, st):
        Bs = qs.shape[0]
        if st is None:
            st = (torch.zeros(Bs, H, K, V, dtype=dt, device=q.device),
                  torch.zeros(Bs, H, K, dtype=dt, device=q.device),
                  torch.zeros(Bs, H, dtype=dt, device=q.device))
        else:
            st = tuple(x.to(dt) for x in st)
        o, st = _scan_in_chunks(_mlstm_exp_chunks, [qs.to(dt) * scale, ks.to(dt), vs.to(dt),
                                                    is_, lfs], st)
        return (vs.new_zeros(Bs, 0, H, V, dtype=dt) if o is None else o), st

    # the gates in the compute dtype and the forget gate as its log, before padding: the
    # padding slots hold the fills themselves (log forget gate exactly 0)
    return run_packed(run, cu_seqlens, (q, k, v, i.to(dt), F.logsigmoid(f.to(dt))),
                      (0.0, 0.0, 0.0, MLSTM_PAD_INPUT_GATE, 0.0), initial_state,
                      output_final_state, v.dtype, chunk=CHUNK, mode=varlen)


# ----------------------------------------------------------------------------- delta rule

def _delta_chunks(state, q, k, v, beta, g):
    """Delta rule over chunks in the UT form (module docstring).

    q, k: [B, H, N, L, K]; v: [B, H, N, L, V]; beta, g: [B, H, N, L] (g may be None)."""
    L = q.shape[3]
    if g is None:
        gamma = torch.ones(L, L, dtype=q.dtype, device=q.device).tril()     # [L, L]
        q_in, k_out, chunk_decay, beta_eb = q, k, None, beta
    else:
        dt = q.dtype
        b = _cumsum64(g, -1)                                                 # [B, H, N, L]
        gamma = _exp(_causal_log_mask(b), dt)                                # [B, H, N, L, L]
        b_last = b[..., -1:]
        q_in = q * _exp(b, dt).unsqueeze(-1)
        k_out = k * _exp(b_last - b, dt).unsqueeze(-1)
        chunk_decay = _exp(b_last, dt).unsqueeze(-1)                         # [B, H, N, 1, 1]
        beta_eb = beta * _exp(b, dt)
    eye = torch.eye(L, dtype=q.dtype, device=q.device)
    a = (beta.unsqueeze(-1) * (k @ k.transpose(-1, -2)) * gamma).tril(-1)    # [B, H, N, L, L]
    w = torch.linalg.solve_triangular(eye + a, beta_eb.unsqueeze(-1) * k, upper=False,
                                      unitriangular=True)                   # T diag(beta e^b) K
    u = torch.linalg.solve_triangular(eye + a, beta.unsqueeze(-1) * v, upper=False,
                                      unitriangular=True)                   # T diag(beta) V
    attn = (q @ k.transpose(-1, -2)) * gamma                                 # tril(QK^T) * Gamma
    outs = []
    for n in range(q.shape[2]):
        u_n = u[:, :, n] - w[:, :, n] @ state                                # U' = U - W S
        outs.append(q_in[:, :, n] @ state + attn[:, :, n] @ u_n)
        decayed = state if chunk_decay is None else chunk_decay[:, :, n] * state
        state = decayed + k_out[:, :, n].transpose(-1, -2) @ u_n
    return torch.stack(outs, dim=2), state


def delta_rule(q, k, v, beta, g=None, *, scale, initial_state=None, output_final_state=False,
               cu_seqlens=None, varlen="auto"):
    """Chunked (Gated) DeltaNet; same contract as linattn.ops.reference.delta_rule."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q)

    def run(qs, ks, vs, bs, gs, st):
        Bs = qs.shape[0]
        S = torch.zeros(Bs, H, K, V, dtype=dt, device=q.device) if st is None else st.to(dt)
        o, S = _scan_in_chunks(_delta_chunks, [qs.to(dt) * scale, ks.to(dt), vs.to(dt),
                                               bs.to(dt), None if gs is None else gs.to(dt)], S)
        return (vs.new_zeros(Bs, 0, H, V, dtype=dt) if o is None else o), S

    return run_packed(run, cu_seqlens, (q, k, v, beta, g), (0.0, 0.0, 0.0, 0.0, 0.0),
                      initial_state, output_final_state, v.dtype, chunk=CHUNK, mode=varlen)
