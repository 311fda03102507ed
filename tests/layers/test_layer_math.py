"""Layers against independent, quadratic-form statements of their math (float64)."""
import pytest
import torch
import torch.nn.functional as F

import helpers
from linattn.layers import MIXERS, FeatureMap, ShortConv
from linattn.layers.attention import rope
from linattn.layers.lightning import alibi_slopes
from mixer_cases import D_MODEL, build

T = 11


def _x(B=2, T_=T, seed=1):
    return torch.randn(B, T_, D_MODEL, generator=helpers.seeded(seed), dtype=torch.float64)


@pytest.mark.parametrize("kernel_size", [1, 4])
def test_short_conv_matches_conv1d(kernel_size):
    conv = ShortConv(6, kernel_size).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    y, cache = conv(x, return_cache=True)
    want = F.conv1d(F.pad(x.transpose(1, 2), (kernel_size - 1, 0)),
                    conv.weight.unsqueeze(1), groups=6).transpose(1, 2)
    helpers.assert_allclose_f64(y, F.silu(want), "conv")
    helpers.assert_allclose_f64(cache, x[:, 9 - (kernel_size - 1):], "cache")


def _heads(x, H=4):
    return x.unflatten(-1, (H, -1))  # [B, T, d] -> [B, T, H, D]


def _causal_weights(scores):
    """scores [B, H, T, S] -> scores with future (s > t) entries zeroed."""
    Tq = scores.shape[-2]
    return scores * torch.ones(Tq, Tq, dtype=scores.dtype).tril()


@pytest.mark.parametrize("fmap", ["identity", "elu", "hedgehog"])
def test_linear_denominator_matches_quadratic_form(fmap):
    """o_t = sum_{s<=t} (phi(q_t).phi(k_s)) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps)."""
    m = build(("linear", {"feature_map": fmap}))
    x = _x()
    y, _ = m(x)
    q = m.q_map(_heads(m.q_proj(x)))
    k = m.k_map(_heads(m.k_proj(x)))
    v = _heads(m.v_proj(x))
    A = _causal_weights(torch.einsum("bthf,bshf->bhts", q, k))       # [B, H, T, T]
    o = torch.einsum("bhts,bshd->bthd", A, v) / (A.sum(-1).transpose(1, 2)[..., None] + m.eps)
    helpers.assert_allclose_f64(y, m.o_proj(o.flatten(-2)), f"linear/{fmap}")


def test_norm_attention_matches_quadratic_form():
    m = build(("linear", {"feature_map": "norm"}))
    x = _x()
    y, _ = m(x)
    q, k = (F.elu(_heads(p(x))) + 1 for p in (m.q_proj, m.k_proj))
    v = _heads(m.v_proj(x))
    D = q.shape[-1]
    o = torch.einsum("bhts,bshd->bthd", _causal_weights(torch.einsum("bthf,bshf->bhts", q, k)), v) * D ** -0.5
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * m.out_norm.norm.weight
    helpers.assert_allclose_f64(y, m.o_proj(o.flatten(-2)), "norm attention")


def test_hedgehog_map_is_two_distributions_and_trains():
    """[softmax(xW), softmax(-xW)]: each half sums to 1 (Hedgehog's and LoLCATs' map), not one
    softmax over both halves."""
    fm = FeatureMap("hedgehog", 3, 5).double()
    z = fm(torch.randn(2, 4, 3, 5, dtype=torch.float64))
    assert z.shape == (2, 4, 3, 10) and bool((z > 0).all())
    helpers.assert_allclose_f64(z[..., :5].sum(-1), torch.ones(2, 4, 3), "sum over the positive half")
    helpers.assert_allclose_f64(z[..., 5:].sum(-1), torch.ones(2, 4, 3), "sum over the negative half")
    z.pow(2).sum().backward()
    assert fm.hedgehog.weight.grad.abs().max() > 0
    narrow = FeatureMap("hedgehog", 3, 6, hedgehog_dim=3, hedgehog_init="kaiming").double()  # LoLCATs' map
    z = narrow(torch.randn(2, 4, 3, 6, dtype=torch.float64))
    assert narrow.out_dim == 6 and z.shape == (2, 4, 3, 6)
    helpers.assert_allclose_f64(z[..., :3].sum(-1) + z[..., 3:].sum(-1), 2 * torch.ones(2, 4, 3), "two halves")
    with pytest.raises(ValueError, match="identity"):
        FeatureMap("hedgehog", 3, 6, hedgehog_dim=3)


def test_lightning_decay_matches_quadratic_form():
    """o_t = sum_{s<=t} lambda^(t-s) (q_t.k_s) v_s / sqrt(D), then norm and sigmoid gate."""
    m = build(("lightning", {}), layer_idx=1, n_layers=3)
    want = -alibi_slopes(4) * (1 - 1 / 2 + 1e-5)
    helpers.assert_allclose_f64(m.log_decay, want, "log decay")
    x = _x()
    y, _ = m(x)
    q, k = (F.silu(_heads(p(x))) for p in (m.q_proj, m.k_proj))
    v = _heads(m.v_proj(x))
    t = torch.arange(T, dtype=torch.float64)
    decay = torch.exp(m.log_decay[:, None, None] * (t[:, None] - t[None, :]).clamp(min=0))  # [H, T, S]
    A = _causal_weights(torch.einsum("bthf,bshf->bhts", q, k) * decay) * q.shape[-1] ** -0.5
    o = torch.einsum("bhts,bshd->bthd", A, v)
    helpers.assert_allclose_f64(y, m.o_proj(m.out_norm(o, m.u_proj(x))), "lightning")


def test_alibi_slopes_non_power_of_two():
    assert torch.allclose(alibi_slopes(8), 2.0 ** (-torch.arange(1, 9, dtype=torch.float64)))
    s = alibi_slopes(6)  # 4 from the power-of-two list, then every other one of 8's
    assert torch.allclose(s, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3],
                                          dtype=torch.float64))


@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_naive_softmax(window):
    m = build(("attention", {"window": window}))
    x = _x()
    y, _ = m(x)
    pos = torch.arange(T)
    q, k = (rope(_heads(p(x)), pos, m.rope_theta) for p in (m.q_proj, m.k_proj))
    v = _heads(m.v_proj(x))
    s = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
    d = pos[:, None] - pos[None, :]
    ok = (d >= 0) & ((d < window) if window else True)
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(s.masked_fill(~ok, float("-inf")), -1), v)
    helpers.assert_allclose_f64(y, m.o_proj(o.flatten(-2)), "attention")


def test_attention_without_rope_matches_zoologys_mha():
    """rope=False with biases: Zoology's MHA (zoology/mixers/attention.py), softmax(q k^T /
    sqrt(D)) v over s <= t with q, k, v from biased projections and a biased out_proj; the
    dropout on the probabilities acts only in training."""
    m = build(("attention", {"rope": False, "qkv_bias": True, "o_bias": True, "dropout": 0.5}))
    for p in (m.q_proj.bias, m.k_proj.bias, m.v_proj.bias, m.o_proj.bias):
        torch.nn.init.normal_(p)
    x = _x()
    m.eval()
    y, _ = m(x)
    q, k, v = (_heads(p(x)) for p in (m.q_proj, m.k_proj, m.v_proj))
    s = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
    s = s + torch.triu(torch.full((T, T), -10000.0, dtype=s.dtype), 1)
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), v)
    helpers.assert_allclose_f64(y, m.o_proj(o.flatten(-2)), "attention without rope")
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(x)[0], y)


def test_rope_is_relative():
    """Rotated dot products depend only on the position difference."""
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64).unbind(0)
    dot = lambda a, b: (rope(q, torch.tensor([a]), 1e4) * rope(k, torch.tensor([b]), 1e4)).sum()
    helpers.assert_allclose_f64(dot(7, 3), dot(104, 100), "rope")


def test_gated_deltanet_gate_and_keys():
    """g = -exp(A_log) softplus(a(x) + dt_bias) <= 0, dt starts in [1e-3, 1e-1], keys are unit."""
    m = MIXERS["gated_deltanet"](D_MODEL, 4)
    dt = F.softplus(m.dt_bias)
    assert bool(((dt > 0.9e-3) & (dt < 1.1e-1)).all())
    A = m.A_log.exp()
    assert bool(((A >= 1) & (A <= 16)).all())
    seen = {}
    import linattn.layers.deltanet as dn
    orig = dn.delta_rule

    def spy(q, k, v, beta, g, **kw):
        seen.update(q=q, k=k, beta=beta, g=g)
        return orig(q, k, v, beta, g, **kw)

    dn.delta_rule = spy
    try:
        m(torch.randn(1, 6, D_MODEL))
    finally:
        dn.delta_rule = orig
    assert torch.allclose(seen["k"].norm(dim=-1), torch.ones(1, 6, 4), atol=1e-5)
    assert torch.allclose(seen["q"].norm(dim=-1), torch.ones(1, 6, 4), atol=1e-5)
    assert bool((seen["g"] < 0).all()) and bool(((seen["beta"] > 0) & (seen["beta"] < 1)).all())


def _conv_then_l2norm(m, x, state, cu_seqlens):
    """DeltaNet as the conv (no norm) followed by an explicit l2norm of q and k per head:
    (y, S, conv cache)."""
    from linattn.layers.deltanet import mamba2_log_decay
    from linattn.ops.api import delta_rule
    from linattn.ops.fused import short_conv
    H, K, V = m.n_heads, m.key_dim, m.value_dim
    qkv, conv = short_conv(m.qkv_proj(x), m.conv.weight, state["conv"], cu_seqlens, "silu",
                           return_cache=True, backend="torch")
    q, k, v = qkv.split([H * K, H * K, H * V], -1)
    q = F.normalize(q.unflatten(-1, (H, K)), dim=-1, eps=1e-6)
    k = F.normalize(k.unflatten(-1, (H, K)), dim=-1, eps=1e-6)
    beta = torch.sigmoid(m.b_proj(x))
    g = mamba2_log_decay(m.a_proj(x), m.A_log, m.dt_bias) if m.gated else None
    o, S = delta_rule(q, k, v.unflatten(-1, (H, V)), beta, g, initial_state=state["S"],
                      output_final_state=True, cu_seqlens=cu_seqlens, backend=m.backend)
    return m.o_proj(m.out_norm(o, m.z_proj(x))), S, conv


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("varlen", [False, True])
def test_deltanet_conv_norm_equals_conv_then_l2norm(name, varlen):
    """q and k normalised inside the conv give the conv followed by l2norm of q and k: outputs,
    states and the gradients of x, the initial state and every parameter (float64, torch)."""
    m = build((name, {}), backend="torch")
    assert m.conv.norm_channels == 2 * m.n_heads * m.key_dim
    lengths = [5, 0, 1, 9]
    cu = helpers.cu_seqlens_from_lengths(lengths) if varlen else None
    x = _x(1, sum(lengths)) if varlen else _x()
    with torch.no_grad():
        _, s0 = m(_x(len(lengths) if varlen else x.shape[0], 4, seed=3), return_state=True)
    S0 = s0["S"].clone().requires_grad_()
    c0 = s0["conv"].clone().requires_grad_()
    x.requires_grad_()
    y, s = m(x, state={"S": S0, "conv": c0}, cu_seqlens=cu, return_state=True)
    y_ref, S_ref, conv_ref = _conv_then_l2norm(m, x, {"S": S0, "conv": c0}, cu)
    helpers.assert_allclose_f64(y, y_ref, "y")
    helpers.assert_allclose_f64(s["S"], S_ref, "S")
    helpers.assert_allclose_f64(s["conv"], conv_ref, "conv")
    gen = helpers.seeded(9)
    cy, cs = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (y, S_ref))
    leaves = [x, S0, c0] + list(m.parameters())
    g_new = torch.autograd.grad((y * cy).sum() + (s["S"] * cs).sum(), leaves, allow_unused=True)
    g_ref = torch.autograd.grad((y_ref * cy).sum() + (S_ref * cs).sum(), leaves,
                                allow_unused=True)
    names = ["x", "S0", "conv0"] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, g_new, g_ref):
        assert (a is None) == (b is None), n
        if a is not None:
            helpers.assert_allclose_f64(a, b, f"d{n}")
