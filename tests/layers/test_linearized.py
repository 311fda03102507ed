"""LinearizedAttention: streaming equals one call, packed sequences equal separate ones, a
window covering the sequence is exactly softmax attention; grouped-query attention."""
import pytest
import torch

from linattn.layers import Attention, LinearizedAttention

D_MODEL, H = 32, 4

CONFIGS = {
    "gla": dict(recurrence="gla"),
    "gla-window-mix": dict(recurrence="gla", window=5, combine="mix", mix=0.3, window_block=3),
    "linear-hedgehog-shared": dict(recurrence="linear", feature_map="hedgehog", rope_linear=True,
                                   window=5, combine="shared", window_block=4),
    "deltanet-window": dict(recurrence="gated_deltanet", window=3),
    "liger-unnormalized": dict(recurrence="gla", window=5, combine="mix", normalize=False, window_block=3),
    "lolcats-narrow-maps": dict(recurrence="linear", feature_map="hedgehog", rope_linear=True, window=5,
                                combine="shared", map_dim=4, map_init="kaiming"),
}


def make(n_kv=2, seed=0, **kw):
    torch.manual_seed(seed)
    m = LinearizedAttention(D_MODEL, H, n_kv_heads=n_kv, backend="torch", **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))  # move Hedgehog maps and window factors off their init
    return m


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streaming_equals_one_call(name):
    m = make(**CONFIGS[name])
    x = torch.randn(2, 20, D_MODEL, dtype=torch.float64)
    full, _ = m(x)
    ys, state = [], None
    for a, b in ((0, 7), (7, 8), (8, 20)):
        y, state = m(x[:, a:b], state=state, return_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["gla-window-mix", "linear-hedgehog-shared"])
def test_packed_sequences_equal_separate_calls(name):
    m = make(**CONFIGS[name])
    lengths = [6, 0, 9]
    xs = [torch.randn(1, n, D_MODEL, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, 6, 6, 15])
    y, state = m(torch.cat(xs, 1), cu_seqlens=cu, return_state=True)
    for n, x in enumerate(xs):
        if x.shape[1]:
            ref, ref_state = m(x, return_state=True)
            torch.testing.assert_close(y[:, cu[n]:cu[n + 1]], ref, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(state["S"][n:n + 1], ref_state["S"], rtol=1e-10, atol=1e-10)
    assert state["S"].shape[0] == 3 and state["kpos"][1].eq(-1).all()  # the empty one: nothing cached


def attention_twin(m: LinearizedAttention) -> Attention:
    """A softmax Attention layer with m's projections."""
    a = Attention(D_MODEL, H, n_kv_heads=m.n_kv_heads, rope_theta=m.rope_theta).double()
    a.load_state_dict({k: v for k, v in m.state_dict().items() if k.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj")})
    return a


@pytest.mark.parametrize("kw", [dict(recurrence="gla", window=16, combine="mix", mix=0.0),
                                dict(recurrence="linear", feature_map="hedgehog", rope_linear=True,
                                     window=16, combine="shared")])
def test_window_covering_the_sequence_is_softmax_attention(kw):
    m = make(window_block=5, **kw)
    x = torch.randn(2, 16, D_MODEL, dtype=torch.float64)
    ref, _ = attention_twin(m)(x)
    torch.testing.assert_close(m(x)[0], ref, rtol=1e-10, atol=1e-10)
    m.window = 4  # a window shorter than the sequence is no longer softmax attention
    assert (m(x)[0] - ref).abs().max() > 1e-3


def test_grouped_query_attention_equals_repeated_heads():
    torch.manual_seed(0)
    gqa = Attention(D_MODEL, H, n_kv_heads=2, qkv_bias=True).double()
    mha = Attention(D_MODEL, H, qkv_bias=True).double()
    sd = gqa.state_dict()
    D = D_MODEL // H
    for name in ("k_proj", "v_proj"):  # kv head j serves query heads 2j, 2j + 1
        for kind in ("weight", "bias"):
            t = sd[f"{name}.{kind}"]
            sd[f"{name}.{kind}"] = t.unflatten(0, (2, D)).repeat_interleave(2, 0).flatten(0, 1)
    mha.load_state_dict(sd)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    y, state = gqa(x, return_state=True)
    torch.testing.assert_close(y, mha(x)[0], rtol=1e-10, atol=1e-10)
    assert state["k"].shape == (2, 9, 2, D)  # the cache keeps the 2 key/value heads


def test_bad_options():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LinearizedAttention(D_MODEL, H, n_kv_heads=3)
    with pytest.raises(ValueError, match="additive recurrence"):
        LinearizedAttention(D_MODEL, H, recurrence="gated_deltanet", window=4, combine="shared")
    with pytest.raises(ValueError, match="denominator"):
        LinearizedAttention(D_MODEL, H, recurrence="linear", window=4, combine="shared", normalize=False)
    with pytest.raises(ValueError, match="recurrence"):
        LinearizedAttention(D_MODEL, H, recurrence="mamba")
    with pytest.raises(ValueError, match="n_kv_heads"):
        Attention(D_MODEL, H, n_kv_heads=0)


def test_attention_weights_are_the_two_attentions():
    """attention_weights gives the weights the softmax twin and the layer itself apply to v."""
    m = make(recurrence="linear", feature_map="hedgehog", rope_linear=True, eps=0.0)
    x = torch.randn(2, 12, D_MODEL, dtype=torch.float64)
    soft, lin = m.attention_weights(x)
    v = m._kv_to_heads(m.v_proj(x).unflatten(-1, (2, D_MODEL // H)))          # [B, T, H, D]
    apply = lambda w: m.o_proj(torch.einsum("bhts,bshd->bthd", w, v).flatten(-2))
    torch.testing.assert_close(apply(soft), attention_twin(m)(x)[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(apply(lin), m(x)[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="without a window"):
        make(window=4).attention_weights(x)
