"""Every mixer: backends agree in float64, decoding and packing match the plain forward."""
import copy

import pytest
import torch

import helpers
from mixer_cases import CASES, D_MODEL, RECURRENT, build, cat_states, flat_state, params

T = 70  # crosses the chunked path's 64-token chunk boundary
REL = 1e-8  # float64 agreement through a whole layer (brief: ~1e-8)


def _x(B, T_, seed=1):
    return torch.randn(B, T_, D_MODEL, generator=helpers.seeded(seed), dtype=torch.float64)


def _run_with_grads(m, x, state, cot_y, cot_state):
    """y and state from m, and the gradients of <y, cot_y> + <state, cot_state> w.r.t. x, the
    initial state's tensors and every parameter."""
    x = x.detach().requires_grad_(True)
    state = None if state is None else _leaf_state(state)
    y, s = m(x, state=state, return_state=True)
    loss = (y * cot_y).sum() + sum((a * c).sum() for a, c in zip(flat_state(s), cot_state))
    leaves = [x] + flat_state(state) + [p for _, p in m.named_parameters()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [y] + flat_state(s), grads


def _leaf_state(state):
    if isinstance(state, dict):
        return {k: _leaf_state(v) for k, v in state.items()}
    if isinstance(state, tuple):
        return tuple(_leaf_state(s) for s in state)
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        return state.detach().requires_grad_(True)
    return state


@pytest.mark.parametrize("case", params(RECURRENT))
def test_torch_backend_matches_reference(case):
    """Same weights, backend "torch" vs "reference": outputs, final states and the gradients of
    the input, the initial state and every parameter agree in float64."""
    ref = build(case, backend="reference")
    fast = copy.deepcopy(ref)
    fast.backend = "torch"
    x = _x(2, T)
    with torch.no_grad():
        _, s0 = ref(_x(2, 5, seed=2), return_state=True)  # a non-trivial initial state
    gen = helpers.seeded(3)
    y_probe, s_probe = ref(x, state=s0, return_state=True)
    cot_y = torch.randn(y_probe.shape, generator=gen, dtype=torch.float64)
    cot_s = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in flat_state(s_probe)]
    outs_r, grads_r = _run_with_grads(ref, x, s0, cot_y, cot_s)
    outs_f, grads_f = _run_with_grads(fast, x, s0, cot_y, cot_s)
    for j, (a, b) in enumerate(zip(outs_f, outs_r)):
        helpers.assert_allclose_f64(a, b, f"output[{j}]", rel=REL)
    names = ["x"] + [f"state[{j}]" for j in range(len(flat_state(s0)))] + [n for n, _ in ref.named_parameters()]
    for n, a, b in zip(names, grads_f, grads_r):
        assert (a is None) == (b is None), f"d{n}: gradient present in one backend only"
        if b is not None:
            assert not torch.isnan(a).any(), f"d{n}: NaN"
            helpers.assert_allclose_f64(a, b, f"d{n}", rel=REL)
    for n, b in zip(names, grads_r):
        if n != "x" and not n.startswith("state"):
            assert b is not None and b.abs().max() > 0, f"d{n}: parameter gets no gradient"


@pytest.mark.parametrize("case", params(CASES))
def test_decoding_with_state_matches_full_forward(case):
    """A prefix, then single tokens, then a chunk, each continuing from the returned state,
    give the full forward's outputs and final state."""
    m = build(case, backend="torch")
    x = _x(2, 13)
    with torch.no_grad():
        y_full, s_full = m(x, return_state=True)
        ys, s = [], None
        for a, b in ((0, 5), (5, 6), (6, 7), (7, 8), (8, 13)):
            y, s = m(x[:, a:b], state=s, return_state=True)
            ys.append(y)
    helpers.assert_allclose_f64(torch.cat(ys, 1), y_full, "decoded y", rel=REL)
    for j, (a, b) in enumerate(zip(flat_state(s), flat_state(s_full))):
        helpers.assert_allclose_f64(a, b, f"state[{j}]", rel=REL)


@pytest.mark.parametrize("case", params(CASES))
def test_packed_sequences_match_separate_runs(case):
    """cu_seqlens with an empty and a length-1 sequence: each packed sequence gives what it
    gives alone, from its own initial state (recurrent mixers), with its own final state."""
    m = build(case, backend="torch")
    lengths = [5, 0, 1, 9]
    cu = helpers.cu_seqlens_from_lengths(lengths)
    x = _x(1, sum(lengths))
    recurrent = case[0] != "attention"
    with torch.no_grad():
        s0 = [m(_x(1, 3, seed=10 + n), return_state=True)[1] for n in range(len(lengths))] if recurrent else None
        y_sep, s_sep = [], []
        for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            y, s = m(x[:, a:b], state=s0[n] if recurrent else None, return_state=recurrent)
            y_sep.append(y)
            s_sep.append(s)
        y, s = m(x, state=cat_states(s0) if recurrent else None, cu_seqlens=cu, return_state=recurrent)
    helpers.assert_allclose_f64(y, torch.cat(y_sep, 1), "packed y", rel=REL)
    if recurrent:
        for j, (a, b) in enumerate(zip(flat_state(s), flat_state(cat_states(s_sep)))):
            helpers.assert_allclose_f64(a, b, f"packed state[{j}]", rel=REL)


def test_attention_rejects_state_with_cu_seqlens():
    m = build(("attention", {}))
    cu = helpers.cu_seqlens_from_lengths([2, 3])
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(_x(1, 5), cu_seqlens=cu, return_state=True)


@pytest.mark.parametrize("name, opts, match", [
    ("linear", {"feature_map": "relu"}, "feature_map"),
    ("gla", {"expand_k": 0.01}, "expand_k"),
    ("gla", {"conv_size": -1}, "conv_size"),
    ("linear", {"conv_size": True}, "conv_size"),
    ("lightning", {"conv_size": -1}, "conv_size"),
    ("mlstm_sig", {"conv_size": 4.0}, "conv_size"),
    ("hgrn2", {"lower_bound": 1.0}, "lower_bound"),
    ("mlstm", {"input_gate": "tanh"}, "input_gate"),
    ("attention", {"window": 0}, "window"),
    ("gated_deltanet", {"backend": "cuda"}, "backend"),
])
def test_bad_options_raise(name, opts, match):
    from linattn.layers import MIXERS
    with pytest.raises(ValueError, match=match):
        MIXERS[name](D_MODEL, 4, **opts)


def test_bad_shapes_raise():
    from linattn.layers import MIXERS
    with pytest.raises(ValueError, match="divisible"):
        MIXERS["gla"](30, 4)
    with pytest.raises(ValueError, match="even head dim"):
        MIXERS["attention"](12, 4)
    m = MIXERS["deltanet"](D_MODEL, 4)
    with pytest.raises(ValueError, match="d_model"):
        m(torch.randn(1, 3, D_MODEL + 1))
    with pytest.raises(ValueError, match="B == 1"):
        m(torch.randn(2, 3, D_MODEL), cu_seqlens=torch.tensor([0, 3]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.timeout(600)])])
@pytest.mark.parametrize("case", params(CASES))
def test_mixer_under_bf16_autocast(case, device):
    """Mixed precision as training runs it (bf16 autocast; on CUDA through the Triton
    kernels): q, k, v reach the op in one dtype even where autocast runs the layer's
    normalisation or feature map in float32 (CUDA does, the CPU does not), and gradients flow."""
    m = build(case, backend="auto").float().to(device)
    x = torch.randn(2, 40, D_MODEL, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, _ = m(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad).all()
