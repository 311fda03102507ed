"""Decode functions (linattn.ops.decode) against the float64 reference ops.

A sequence decoded token by token (T == 1 calls chained through the state) or in a few
small-T calls must match the reference op run over the whole sequence: outputs and final
state, under the docs/design.md section 5 tolerance rule, for every gate kind, the delta rule with
and without gate, both mLSTM gates, K != V and non-power-of-two dims, inplace=True/False and
state=None, on the "torch" backend and on the fused Triton kernel (interpreter on CPU).
"""
from __future__ import annotations

import pytest
import torch

import helpers
from linattn.ops import reference
from linattn.ops.decode import delta_rule_decode, linear_attention_decode, mlstm_decode

VARIANTS = ["la_none", "la_const", "la_scalar", "la_key", "delta", "delta_gated",
            "mlstm_exp", "mlstm_sig"]


# ----------------------------------------------------------------------------- cases

def make_case(variant, B, T, H, K, V, seed, *, noncontig=False, with_state=True):
    """(decode function, oracle op, float64 inputs incl. initial_state, extra kwargs)."""
    gen = helpers.seeded(seed)
    q = helpers.randn(B, T, H, K, gen=gen, noncontig=noncontig)
    k = helpers.randn(B, T, H, K, gen=gen, noncontig=noncontig)
    v = helpers.randn(B, T, H, V, gen=gen, noncontig=noncontig)
    inputs, kw = dict(q=q, k=k, v=v), {}
    if variant.startswith("la_"):
        decode, oracle = linear_attention_decode, reference.linear_attention
        inputs["g"] = helpers.rand_gate(variant[3:], B, T, H, K, gen, low=-2.0)
    elif variant.startswith("delta"):
        decode, oracle = delta_rule_decode, reference.delta_rule
        inputs["k"] = helpers.unit_keys(k)
        inputs["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
        inputs["g"] = helpers.rand_gate("scalar" if variant == "delta_gated" else "none",
                                        B, T, H, K, gen)
    else:
        decode, oracle = mlstm_decode, reference.mlstm
        kw["input_gate"] = {"mlstm_exp": "exp", "mlstm_sig": "sigmoid"}[variant]
        inputs["i"] = helpers.randn(B, T, H, gen=gen)
        inputs["f"] = helpers.randn(B, T, H, gen=gen) + 2.0
    state = None
    if with_state:
        state = helpers.randn(B, H, K, V, gen=gen, scale=0.5)
        if kw.get("input_gate") == "exp":
            state = (state, helpers.randn(B, H, K, gen=gen, scale=0.5),
                     helpers.randn(B, H, gen=gen, scale=0.5))
    inputs["initial_state"] = state
    return decode, oracle, inputs, kw


def _tensors(state):
    return () if state is None else (tuple(state) if isinstance(state, tuple) else (state,))


def _clone(state):
    if state is None:
        return None
    return tuple(s.clone() for s in state) if isinstance(state, tuple) else state.clone()


def _time_slice(x, t0, t1):
    """Per-step tensors ([B, T, ...]) sliced along T; None and [H] gates pass through."""
    return x[:, t0:t1] if isinstance(x, torch.Tensor) and x.dim() >= 3 else x


def pieces_fn(decode, splits, *, inplace, backend):
    """A fast_fn for check_against_oracle: decodes the sequence in calls of `splits` tokens,
    chaining the state, and checks the state contract (in place / untouched) on every call."""
    def fn(initial_state=None, **inputs):
        state = _clone(initial_state) if inplace else initial_state  # ours to overwrite
        T = inputs["q"].shape[1]
        assert sum(splits) == T
        outs, t0 = [], 0
        for n in splits:
            piece = {name: _time_slice(x, t0, t0 + n) for name, x in inputs.items()}
            before = _clone(state)
            o, new = decode(**piece, state=state, inplace=inplace, backend=backend)
            assert o.dtype == inputs["v"].dtype and o.shape[1] == n
            if inplace:
                assert all(a is b for a, b in zip(_tensors(new), _tensors(state))), \
                    "inplace=True must return the given state tensors"
            else:
                for s, s0, s1 in zip(_tensors(state), _tensors(before), _tensors(new)):
                    assert torch.equal(s, s0), "inplace=False modified the input state"
                    assert s1.data_ptr() != s.data_ptr(), "new state aliases the input state"
            state, t0 = new, t0 + n
            outs.append(o)
        return torch.cat(outs, dim=1), state
    return fn


def oracle_fn(oracle, **kw):
    def fn(initial_state=None, **inputs):
        return oracle(**inputs, initial_state=initial_state, output_final_state=True, **kw)
    return fn


def check_decode(variant, backend, splits, *, inplace, with_state, dtype=torch.float32,
                 B=2, H=2, K=20, V=12, seed=0, noncontig=False, device="cpu"):
    decode, oracle, inputs, kw = make_case(variant, B, sum(splits), H, K, V, seed,
                                           noncontig=noncontig, with_state=with_state)
    fast = pieces_fn(lambda **a: decode(**a, **kw), splits, inplace=inplace, backend=backend)
    helpers.check_against_oracle(fast, oracle_fn(oracle, **kw), inputs, dtype=dtype,
                                 device=device)


# ----------------------------------------------------------------------------- CPU tests

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_token_by_token_inplace(variant, backend):
    """T == 1 calls chained through a given state, updated in place."""
    check_decode(variant, backend, [1] * 5, inplace=True, with_state=True, seed=1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_small_t_calls_from_zeros(variant, backend):
    """Calls of a few tokens from state=None, inputs untouched, non-contiguous q, k, v."""
    check_decode(variant, backend, [3, 1, 2], inplace=False, with_state=False, seed=2,
                 K=16, V=24, noncontig=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_float64_matches_reference(variant):
    """The kernel computes in float64 for float64 inputs: agreement to ~1e-10."""
    check_decode(variant, "triton", [4, 1], inplace=False, with_state=True, seed=3,
                 dtype=torch.float64, K=7, V=5)


def _step_kernel(variant, block_v):
    """The decode function of variant on the fused step kernel's launcher itself, with a V
    tile of block_v (its block_v argument; the public functions take the default)."""
    from linattn.ops.triton.recurrent import fused_recurrent

    def run(q, k, v, g=None, beta=None, i=None, f=None, *, state, inplace, backend,
            input_gate=None):
        kw = dict(scale=q.shape[-1] ** -0.5, state=state, inplace=inplace, block_v=block_v)
        if variant == "la_key":
            return fused_recurrent(q, k, v, g=g, gate_kind="key", **kw)
        if variant == "delta_gated":
            return fused_recurrent(q, k, v, g=g, gate_kind="scalar", beta=beta, **kw)
        return fused_recurrent(q, k, v, g=f, gate_kind="scalar", i=i, mlstm="exp", **kw)
    return run


@pytest.mark.parametrize("variant", ["la_key", "delta_gated", "mlstm_exp"])
@pytest.mark.parametrize("inplace", [True, False])
def test_triton_many_value_tiles(variant, inplace):
    """V split over several programs (16-wide tiles, the last one partial): mLSTMexp's n and
    m, computed by every tile and written by the first, must not be read after being
    overwritten."""
    from linattn.ops.triton.recurrent import choose_block_v
    assert choose_block_v(33, 40) == 64                        # one tile by default
    _, oracle, inputs, kw = make_case(variant, 2, 3, 2, 33, 40, seed=4)
    fast = pieces_fn(lambda **a: _step_kernel(variant, 16)(**a, **kw), [2, 1],
                     inplace=inplace, backend="triton")
    helpers.check_against_oracle(fast, oracle_fn(oracle, **kw), inputs, dtype=torch.float32,
                                 device="cpu")


def test_empty_time_returns_state():
    decode, _, inputs, _ = make_case("la_scalar", 2, 0, 2, 8, 8, seed=5)
    S0 = inputs["initial_state"].float()
    args = {n: (x.float() if isinstance(x, torch.Tensor) else x) for n, x in inputs.items()
            if n != "initial_state"}
    for backend in ("torch", "triton"):
        o, S = decode(**args, state=S0, backend=backend)
        assert o.shape == (2, 0, 2, 8) and torch.equal(S, S0) and S.data_ptr() != S0.data_ptr()


def test_backends_auto_and_reference_agree_with_torch():
    decode, _, inputs, _ = make_case("delta_gated", 1, 3, 2, 8, 8, seed=6)
    args = {n: (x.float() if isinstance(x, torch.Tensor) else x) for n, x in inputs.items()
            if n != "initial_state"}
    S0 = inputs["initial_state"].float()
    o_t, S_t = decode(**args, state=S0, backend="torch")
    for backend in ("auto", "reference"):
        o, S = decode(**args, state=S0, backend=backend)
        assert torch.equal(o, o_t) and torch.equal(S, S_t)


def test_inference_mode_and_no_grad():
    """A leaf that requires grad is refused with grad mode on, accepted under no_grad."""
    q = torch.randn(1, 1, 2, 8, requires_grad=True)
    k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match=r"q requires grad.*linattn\.linear_attention"):
        linear_attention_decode(q, k, v)
    with torch.no_grad():
        o, S = linear_attention_decode(q, k, v)
    assert S.shape == (1, 2, 8, 8) and not o.requires_grad


def _la_args(B=2, T=3, H=2, K=8, V=6):
    return torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)


def _bad_calls():
    """(call, exception, message regex) for each kind of bad input."""
    q, k, v = _la_args()
    S = torch.zeros(2, 2, 8, 6)
    b3 = torch.rand(2, 3, 2)
    la, dr, ml = linear_attention_decode, delta_rule_decode, mlstm_decode
    cases = {
        "q 3-d": (lambda: la(q[0], k, v), ValueError, r"q must be 4-d"),
        "k shape": (lambda: la(q, k[..., :4], v), ValueError, r"k must have q's shape"),
        "g shape": (lambda: la(q, k, v, torch.zeros(2, 3)), ValueError, r"g must be .*\[H\]"),
        "g > 0": (lambda: la(q, k, v, torch.ones(2)), ValueError, r"g holds log-decays"),
        "state shape": (lambda: la(q, k, v, state=S[:, :, :4]), ValueError,
                        r"state must be \[B, H, K, V\] = \(2, 2, 8, 6\)"),
        "state type": (lambda: la(q, k, v, state=[S]), TypeError, r"state must be a tensor"),
        "inplace no state": (lambda: la(q, k, v, inplace=True), ValueError,
                             r"inplace=True .* state is None"),
        "inplace bf16": (lambda: la(q, k, v, state=S.bfloat16(), inplace=True), TypeError,
                         r"inplace=True needs state in torch.float32"),
        "inplace noncontig": (lambda: la(q, k, v, state=S.transpose(2, 3).contiguous().transpose(2, 3),
                                         inplace=True), ValueError, r"contiguous state"),
        "inplace not bool": (lambda: la(q, k, v, state=S, inplace=1), TypeError,
                             r"inplace must be a bool"),
        "backend": (lambda: la(q, k, v, backend="cuda"), ValueError, r"backend must be one of"),
        "delta beta": (lambda: dr(q, k, v, b3[:, :2]), ValueError, r"beta must be \[B, T, H\]"),
        "delta key gate": (lambda: dr(q, k, v, b3, -torch.rand(2, 3, 2, 8)), ValueError,
                           r"g must be \[B, T, H\]"),
        "mlstm gate": (lambda: ml(q, k, v, b3, b3, input_gate="tanh"), ValueError,
                       r"input_gate must be one of"),
        "mlstm f": (lambda: ml(q, k, v, b3, b3[0]), ValueError, r"f must be \[B, T, H\]"),
        "mlstm exp state": (lambda: ml(q, k, v, b3, b3, state=S), TypeError, r"tuple \(C, n, m\)"),
        "mlstm exp n": (lambda: ml(q, k, v, b3, b3, state=(S, torch.zeros(2, 2, 6), torch.zeros(2, 2))),
                        ValueError, r"state\[1\] \(n\) must be \[B, H, K\] = \(2, 2, 8\)"),
        "scale": (lambda: la(q, k, v, scale="1"), TypeError, r"scale must be"),
    }
    return [pytest.param(*case, id=label) for label, case in cases.items()]


@pytest.mark.parametrize("call,exc,msg", _bad_calls())
def test_bad_inputs_raise(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _la_args()
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA"):
        linear_attention_decode(q, k, v, backend="triton")


# ----------------------------------------------------------------------------- GPU tests
# Each case compiles 3-4 small specialisations of the step kernel (K and V are constexprs; T
# == 1, HAS_STATE and the strides' classes vary): about 0.1 s each on the H200, so the whole
# product of variants, shapes and dtypes stays cheap. Collected before the chunk kernels'
# tests (tests/ops/triton/), which compile for seconds per test.

@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 16, 128, 128), (2, 4, 256, 64), (3, 2, 100, 72)],
                         ids=["H16-K128-V128", "K256-V64", "K100-V72"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_decode(variant, shape, dtype):
    B, H, K, V = shape
    check_decode(variant, "auto", [1, 1, 1, 5], inplace=True, with_state=True, dtype=dtype,
                 B=B, H=H, K=K, V=V, seed=7, device="cuda")
    check_decode(variant, "triton", [2, 1], inplace=False, with_state=False, dtype=dtype,
                 B=B, H=H, K=K, V=V, seed=8, device="cuda", noncontig=True)
