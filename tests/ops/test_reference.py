"""The oracle itself, against closed forms written independently of its loops (float64)."""
import torch
import torch.nn.functional as F

import helpers
from linattn.ops import reference

F64 = torch.float64


def _inputs(B=2, T=23, H=2, K=5, V=4, seed=0):
    gen = helpers.seeded(seed)
    return gen, [helpers.randn(B, T, H, D, gen=gen) for D in (K, K, V)]


def _closed_form_gated(q, k, v, b, S0, scale):
    """o_t = sum_{s<=t} (q^_t * exp(b_t - b_s)) . k_s v_s + (q^_t * exp(b_t)) S0, b per key."""
    T = q.shape[1]
    outs = []
    for t in range(T):
        w = torch.exp(b[:, t : t + 1] - b[:, : t + 1])                          # [B, s, H, K]
        a = torch.einsum("bhk,bshk->bsh", q[:, t] * scale, w * k[:, : t + 1])
        o = torch.einsum("bsh,bshv->bhv", a, v[:, : t + 1])
        o = o + torch.einsum("bhk,bhkv->bhv", q[:, t] * scale * torch.exp(b[:, t]), S0)
        outs.append(o)
    return torch.stack(outs, 1)


def test_linear_attention_matches_closed_form_for_every_gate():
    gen, (q, k, v) = _inputs()
    B, T, H, K = q.shape
    S0 = helpers.randn(B, H, K, v.shape[-1], gen=gen)
    for kind in ("none", "const", "scalar", "key"):
        g = helpers.rand_gate(kind, B, T, H, K, gen, -2.0, 0.0)
        gk = torch.zeros(B, T, H, K, dtype=F64) if g is None else (
            g.expand(B, T, H)[..., None].expand(B, T, H, K) if g.dim() == 1 else
            g[..., None].expand(B, T, H, K) if g.dim() == 3 else g)
        b = gk.cumsum(1)
        o, S = reference.linear_attention(q, k, v, g, initial_state=S0, output_final_state=True)
        helpers.assert_allclose_f64(o, _closed_form_gated(q, k, v, b, S0, K ** -0.5), kind)
        S_expect = torch.exp(b[:, -1])[..., None] * S0 + torch.einsum(
            "bshk,bshv->bhkv", k * torch.exp(b[:, -1:] - b), v)
        helpers.assert_allclose_f64(S, S_expect, kind + " state")


def test_delta_rule_matches_explicit_matrices():
    gen, (q, k, v) = _inputs(T=9)
    k = helpers.unit_keys(k)
    B, T, H, K = q.shape
    beta = torch.rand(B, T, H, generator=gen, dtype=F64)
    g = helpers.rand_gate("scalar", B, T, H, K, gen, -1.0, 0.0)
    S = helpers.randn(B, H, K, v.shape[-1], gen=gen)
    o, S_fin = reference.delta_rule(q, k, v, beta, g, initial_state=S, output_final_state=True)
    eye = torch.eye(K, dtype=F64)
    for t in range(T):
        kt = k[:, t]                                                          # [B, H, K]
        P = eye - beta[:, t, :, None, None] * kt[..., :, None] * kt[..., None, :]
        S = torch.exp(g[:, t])[..., None, None] * (P @ S) \
            + beta[:, t, :, None, None] * kt[..., :, None] * v[:, t][..., None, :]
        helpers.assert_allclose_f64(o[:, t], torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S))
    helpers.assert_allclose_f64(S_fin, S)


def test_mlstm_exp_equals_unstabilised_form():
    """C~ = C exp(m): o = C~^T q / (max(|n~ . q|, 1) + eps exp(m)), with m in closed form."""
    gen, (q, k, v) = _inputs(T=17)
    B, T, H, K = q.shape
    i = helpers.randn(B, T, H, gen=gen, scale=2.0)
    f = helpers.randn(B, T, H, gen=gen).add(1.0)
    o, (C, n, m) = reference.mlstm(q, k, v, i, f, output_final_state=True)
    lf = F.logsigmoid(f)
    b = lf.cumsum(1)                                                          # [B, T, H]
    qh = q * K ** -0.5
    for t in range(T):
        w = torch.exp(i[:, : t + 1] + b[:, t : t + 1] - b[:, : t + 1])        # [B, s, H]
        Ct = torch.einsum("bsh,bshk,bshv->bhkv", w, k[:, : t + 1], v[:, : t + 1])
        nt = torch.einsum("bsh,bshk->bhk", w, k[:, : t + 1])
        m_t = torch.maximum(b[:, t], (i[:, : t + 1] + b[:, t : t + 1] - b[:, : t + 1]).amax(1))
        den = torch.maximum(torch.einsum("bhk,bhk->bh", nt, qh[:, t]).abs(), torch.ones_like(m_t))
        expect = torch.einsum("bhkv,bhk->bhv", Ct, qh[:, t]) / (den + 1e-6 * torch.exp(m_t))[..., None]
        helpers.assert_allclose_f64(o[:, t], expect, f"o[{t}]")
    helpers.assert_allclose_f64(m, m_t, "m")
    helpers.assert_allclose_f64(C * torch.exp(m)[..., None, None], Ct, "C")
    helpers.assert_allclose_f64(n * torch.exp(m)[..., None], nt, "n")


def test_mlstm_sigmoid_equals_its_definition():
    gen, (q, k, v) = _inputs(T=11)
    B, T, H, K = q.shape
    i, f = helpers.randn(B, T, H, gen=gen), helpers.randn(B, T, H, gen=gen)
    o, C_fin = reference.mlstm(q, k, v, i, f, input_gate="sigmoid", output_final_state=True)
    C = torch.zeros(B, H, K, v.shape[-1], dtype=F64)
    for t in range(T):
        C = torch.sigmoid(f[:, t])[..., None, None] * C + torch.sigmoid(i[:, t])[..., None, None] \
            * k[:, t][..., :, None] * v[:, t][..., None, :]
        helpers.assert_allclose_f64(o[:, t], torch.einsum("bhkv,bhk->bhv", C, q[:, t] * K ** -0.5))
    helpers.assert_allclose_f64(C_fin, C)


def test_varlen_equals_separate_calls_and_empty_sequences_keep_their_state():
    gen, (q, k, v) = _inputs(B=1, T=12)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    cu = helpers.cu_seqlens_from_lengths([4, 0, 8])
    S0 = helpers.randn(3, H, K, V, gen=gen)
    o, S = reference.linear_attention(q, k, v, initial_state=S0, output_final_state=True,
                                      cu_seqlens=cu)
    helpers.assert_allclose_f64(S[1], S0[1], "empty sequence's state")
    o2, S2 = reference.linear_attention(q[:, 4:], k[:, 4:], v[:, 4:], initial_state=S0[2:],
                                        output_final_state=True)
    helpers.assert_allclose_f64(o[:, 4:], o2)
    helpers.assert_allclose_f64(S[2:], S2)
