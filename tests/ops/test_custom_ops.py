"""The ops as torch custom ops (linattn.ops.custom_ops): opcheck on each op, and
torch.compile(fullgraph=True) of the public functions against eager, forward and gradients.

CPU: the "torch" and "reference" backends, and the Triton kernels in the interpreter, all
compiled with backend="aot_eager" (AOTAutograd traces forward and backward through the fake
implementations and autograd formulas; inductor would only add compile time here). The GPU
versions (inductor, CUDA graphs) are at the end, marked gpu.
"""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import linattn
from linattn.ops import custom_ops as co
from linattn.ops.triton.common import GATE_KINDS

from helpers import rand_gate, randn, seeded

B, T, H, K, V = 2, 20, 1, 16, 8
CU = [0, 7, 7, 20]                      # three packed sequences, one empty


def _leaves(inputs):
    """Fresh leaves (floating tensors require grad), so eager and compiled runs never share
    a graph."""
    def leaf(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().clone()
            return x.requires_grad_(x.is_floating_point())
        if isinstance(x, tuple):
            return tuple(leaf(t) for t in x)
        return x
    return {n: leaf(x) for n, x in inputs.items()}


def _flat(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _outputs_and_grads(fn, inputs, seed=0):
    """fn(**inputs) -> (o, state); returns [o, *state] and the gradients of every floating
    input from random cotangents of every output (the final state included)."""
    leaves = _leaves(inputs)
    o, st = fn(**leaves)
    outs = [o] + _flat(st)
    gen = seeded(seed)
    loss = sum((y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)
                .to(y.device)).sum() for y in outs)
    wrt = [t for x in leaves.values() for t in _flat(x)
           if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(loss, wrt)
    return [y.detach() for y in outs], list(grads)


def _assert_compiled_equals_eager(fn, inputs):
    """fullgraph aot_eager compile of fn gives eager's outputs and gradients, bitwise: both
    run the same kernels and the same aten ops. dynamic=True: the fake implementations see
    symbolic sizes (B, T, chunk counts), as after a recompile for a new shape."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    got_o, got_g = _outputs_and_grads(compiled, inputs)
    ref_o, ref_g = _outputs_and_grads(fn, inputs)
    assert len(got_o) == len(ref_o) and len(got_g) == len(ref_g)
    for a, b in zip(got_o + got_g, ref_o + ref_g):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return got_g


def _inputs(dtype, gate="none", states=False, cu=False, delta=False, mlstm=None, seed=0):
    gen = seeded(seed)
    Bx = 1 if cu else B
    N = len(CU) - 1 if cu else B
    d = dict(q=randn(Bx, T, H, K, gen=gen), k=randn(Bx, T, H, K, gen=gen),
             v=randn(Bx, T, H, V, gen=gen))
    if delta:
        d["k"] = F.normalize(d["k"], dim=-1)
        d["beta"] = torch.rand(Bx, T, H, generator=gen, dtype=torch.float64)
        d["g"] = rand_gate(gate, Bx, T, H, K, gen)
    elif mlstm:
        d["i"], d["f"] = randn(Bx, T, H, gen=gen), randn(Bx, T, H, gen=gen) + 2
    else:
        d["g"] = rand_gate(gate, Bx, T, H, K, gen)
    d = {n: (x.to(dtype) if x is not None else None) for n, x in d.items()}
    if states:
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        C0 = randn(N, H, K, V, gen=gen).to(sdt)
        d["initial_state"] = ((C0, randn(N, H, K, gen=gen).abs().to(sdt),
                               randn(N, H, gen=gen).to(sdt)) if mlstm == "exp" else C0)
    if cu:
        d["cu_seqlens"] = torch.tensor(CU, dtype=torch.int32)
    return d


# ----------------------------------------------------------------------------- compile = eager

OPS = {
    "linear_attention": lambda backend, states, **kw: (
        lambda **a: linattn.linear_attention(**a, output_final_state=states, backend=backend,
                                             **kw)),
    "delta_rule": lambda backend, states, **kw: (
        lambda **a: linattn.delta_rule(**a, output_final_state=states, backend=backend, **kw)),
    "mlstm": lambda backend, states, **kw: (
        lambda **a: linattn.mlstm(**a, output_final_state=states, backend=backend, **kw)),
}

# (op, gate or input gate, states, cu_seqlens): every gate kind, states and packed sequences
# at least once per op
CASES = [
    ("linear_attention", "none", True, True),
    ("linear_attention", "const", False, False),
    ("linear_attention", "scalar", True, False),
    ("linear_attention", "key", True, True),
    ("delta_rule", "none", False, True),
    ("delta_rule", "scalar", True, False),
    ("mlstm", "exp", True, True),
    ("mlstm", "sigmoid", True, False),
]


# bidirectional, and a constant decay that needs no gradient (the Triton backward then skips
# its gate sums)
TRITON_EXTRA = [("linear_attention", "noncausal", False, True),
                ("linear_attention", "const_frozen", True, False)]


def _case(op, gate, states, cu, dtype, seed=0):
    """(inputs, fn) of one case: fn(**inputs) -> (o, final state)."""
    kw = {}
    if op == "mlstm":
        kw["input_gate"] = gate
        inputs = _inputs(dtype, states=states, cu=cu, mlstm=gate, seed=seed)
    elif gate == "noncausal":
        inputs = _inputs(dtype, "none", cu=cu, seed=seed)
        del inputs["g"]
        kw["causal"] = False
    elif gate == "const_frozen":
        inputs = _inputs(dtype, "const", states=states, cu=cu, seed=seed)
        kw["g"] = inputs.pop("g").float()              # a constant: no gradient
    else:
        inputs = _inputs(dtype, gate, states=states, cu=cu, delta=op == "delta_rule", seed=seed)
    return inputs, kw


def _all_cases(cases, backend, dtype, **options):
    """One function running every case (one compile for all of them, CI's time) and its
    inputs: fn(**inputs) -> (o of the first case, every other o and final state). options:
    keywords of every op call (e.g. save_for_backward)."""
    inputs, runs = {}, []
    for n, (op, gate, states, cu) in enumerate(cases):
        case_inputs, kw = _case(op, gate, states, cu, dtype, seed=n)
        names = {f"{name}{n}": name for name in case_inputs}
        inputs.update({f"{name}{n}": x for name, x in case_inputs.items()})
        runs.append((OPS[op](backend, states, **kw, **options), names))

    def fn(**a):
        outs = []
        for run, names in runs:
            o, st = run(**{name: a[key] for key, name in names.items()})
            outs += [o] + _flat(st)
        return outs[0], tuple(outs[1:])

    return fn, inputs


@pytest.mark.parametrize("backend,dtype,cases", [
    ("torch", torch.float64, CASES + TRITON_EXTRA),
    ("reference", torch.float64, [CASES[3], CASES[5], CASES[6]]),
    # the interpreter is slow: one case per kind of saved tensors (per-key scores with
    # unbacked chunk counts, the delta rule's, mLSTMexp's stabiliser and (C, n, m) state, a
    # frozen constant decay); the rest run on the GPU (test_gpu_compile_inductor_equals_eager)
    ("triton", torch.float32, [CASES[3], CASES[5], CASES[6], TRITON_EXTRA[1]]),
], ids=["torch", "reference", "triton"])
def test_compile_fullgraph_equals_eager(backend, dtype, cases):
    """fullgraph aot_eager compile of every op (gate kinds, states, packed sequences): the
    outputs and every input's gradient (gates of every shape, beta, i, f, each initial state
    tensor; cotangents on the final states too) equal eager's bitwise. The PyTorch backends
    run as the plain_* custom ops (float64 here), the Triton kernels (interpreter) as
    gated_chunk / delta_chunk, whose forward hands its tensors to the backward op."""
    fn, inputs = _all_cases(cases, backend, dtype)
    grads = _assert_compiled_equals_eager(fn, inputs)
    assert all(g.abs().sum() > 0 for g in grads)  # every gradient reached its input


def _saved_for_backward(fn, inputs):
    """(outputs, gradients, the (shape, dtype) of every tensor saved for the backward) of
    fn on inputs (_outputs_and_grads), the last through saved_tensors_hooks."""
    saved = []

    def pack(x):
        saved.append((tuple(x.shape), x.dtype))
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        outs, grads = _outputs_and_grads(fn, inputs)
    return outs, grads, Counter(saved)


def test_compile_with_recompute_equals_eager_with_saved_states():
    """save_for_backward="recompute" compiled (the custom ops' forward hands no states to the
    backward op, which recomputes them) gives the outputs and gradients of the eager default
    ("states"), bitwise; the keyword reaches the custom ops: compiled, "recompute" saves for
    the backward what "states" saves less the delta rule's b, T, U' and chunk states
    (delta_api.saved_specs) and mLSTMexp's states."""
    from linattn.ops.triton import delta_api
    from linattn.ops.triton.delta_config import DEFAULT
    cases = [CASES[5], CASES[6]]
    got, saved = {}, {}
    for mode in ("states", "recompute"):
        fn, inputs = _all_cases(cases, "triton", torch.float32, save_for_backward=mode)
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        *got[mode], saved[mode] = _saved_for_backward(compiled, inputs)
    ref_o, ref_g = _outputs_and_grads(_all_cases(cases, "triton", torch.float32)[0], inputs)
    for mode in ("states", "recompute"):
        got_o, got_g = got[mode]
        assert len(got_o) == len(ref_o) and len(got_g) == len(ref_g)
        for a, b in zip(got_o + got_g, ref_o + ref_g):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # CASES[5]: B sequences of T tokens, one 64-token chunk each: 2 B state slots
    delta = delta_api.saved_specs(B * T, H, K, V, 2 * B, torch.float32, gated=True, keep=True,
                                  cfg=DEFAULT)
    extra = saved["states"] - saved["recompute"]
    assert not saved["recompute"] - saved["states"]
    assert not Counter(delta.values()) - extra                # every one of the delta rule's
    assert sum(extra.values()) > len(delta)                   # and mLSTMexp's


def test_save_for_backward_is_validated():
    inputs, _ = _case(*CASES[0], torch.float32)
    with pytest.raises(ValueError, match="save_for_backward must be one of"):
        linattn.linear_attention(**inputs, save_for_backward="never")


def test_compile_under_no_grad_keeps_nothing():
    """Inference under torch.no_grad: the compiled ops keep no tensors for a backward, and
    still give eager's outputs."""
    fn, inputs = _all_cases([CASES[5], CASES[6]], "triton", torch.float32)
    with torch.no_grad():
        torch._dynamo.reset()
        got = _flat(torch.compile(fn, backend="aot_eager", fullgraph=True)(**inputs))
        ref = _flat(fn(**inputs))
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


# ----------------------------------------------------------------------------- opcheck

def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", ["la_key_states_cu", "dr_gated_states", "mlstm_exp_states_cu"])
def test_opcheck_plain_ops(case):
    """Schema, fake tensors, autograd registration and AOT dispatch of the plain_* ops."""
    f64 = torch.float64
    if case.startswith("la"):
        gate = "key" if "key" in case else "const"
        d = _leaves(_inputs(f64, gate, states="states" in case, cu="cu" in case))
        _opcheck(co.plain_linear_attention_op,
                 (d["q"], d["k"], d["v"], d["g"], d.get("initial_state"), d.get("cu_seqlens"),
                  0.5, "states" in case, True, "torch"))
    elif case.startswith("dr"):
        d = _leaves(_inputs(f64, "scalar", states=True, delta=True))
        _opcheck(co.plain_delta_rule_op,
                 (d["q"], d["k"], d["v"], d["beta"], d["g"], d["initial_state"], None, 0.25,
                  True, "reference"))
    else:
        gate = "exp" if "exp" in case else "sigmoid"
        d = _leaves(_inputs(f64, states="states" in case, cu="cu" in case, mlstm=gate))
        st = d.get("initial_state")
        C0, n0, m0 = st if gate == "exp" else (st, None, None)
        _opcheck(co.plain_mlstm_op,
                 (d["q"], d["k"], d["v"], d["i"], d["f"], C0, n0, m0, d.get("cu_seqlens"), gate,
                  0.25, "states" in case, "torch"))


def _packed(x):
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


@pytest.mark.parametrize("case", ["mexp_states_cu"])
def test_opcheck_gated_chunk(case):
    """linattn::gated_chunk in the interpreter: every gate kind, mLSTM's key log-weight and
    stabiliser with their (C, n, m) state, packed sequences (unbacked chunk counts)."""
    _gated_opcheck(case, "cpu", torch.float32)


def _to(d, device):
    return {n: (x.to(device) if isinstance(x, torch.Tensor) else
                tuple(t.to(device) for t in x) if isinstance(x, tuple) else x)
            for n, x in d.items()}


def _gated_opcheck(case, device, dtype):
    cu = "cu" in case
    mexp, msig = case.startswith("mexp"), case.startswith("msig")
    d = _inputs(dtype, {"key": "key", "const": "const"}.get(case.split("_")[0], "none"),
                states="states" in case, cu=cu,
                mlstm="exp" if mexp else ("sigmoid" if msig else None))
    d = _to(d, device)
    TT = d["q"].shape[0] * T
    q, k, v = (_packed(d[n]).requires_grad_() for n in "qkv")
    g = kw = h0 = n0 = m0 = None
    gate = GATE_KINDS["none"]
    if mexp or msig:
        gate, g = GATE_KINDS["scalar"], F.logsigmoid(_packed(d["f"]).float()).requires_grad_()
        kw = (_packed(d["i"]).float() if mexp else F.logsigmoid(_packed(d["i"]).float()))
        kw.requires_grad_()
    elif d.get("g") is not None:
        gate = GATE_KINDS["key" if d["g"].dim() == 4 else "scalar"]
        g = (d["g"] if d["g"].dim() == 1 else _packed(d["g"])).float()
        g.requires_grad_("frozen" not in case)
    if "states" in case:
        st = d["initial_state"]
        h0, n0, m0 = (t.requires_grad_() for t in st) if mexp else (st.requires_grad_(), None, None)
    cu_t = d.get("cu_seqlens")
    Bq = 1 if cu else B
    assert TT == Bq * T
    _opcheck(co.gated_chunk_op, (q, k, v, g, kw, h0, n0, m0, cu_t, Bq, gate, mexp or msig, mexp,
                                 "noncausal" in case, 0.25, "states" in case, True, True))


def test_opcheck_delta_chunk(gated=True, cu=True):
    _delta_opcheck(gated, cu, "cpu", torch.float32)


def _delta_opcheck(gated, cu, device, dtype):
    d = _to(_inputs(dtype, "scalar" if gated else "none", states=True, cu=cu, delta=True), device)
    q, k, v, beta = (_packed(d[n]).requires_grad_() for n in ("q", "k", "v", "beta"))
    g = _packed(d["g"]).float().requires_grad_() if gated else None
    h0 = d["initial_state"].requires_grad_()
    _opcheck(co.delta_chunk_op, (q, k, v, beta, g, h0, d.get("cu_seqlens"),
                                 1 if cu else B, 0.25, True, True))


# ----------------------------------------------------------------------------- decode

DECODE = {
    "linear_attention": lambda d, **kw: linattn.linear_attention_decode(
        d["q"], d["k"], d["v"], d["g"], **kw),
    "delta_rule": lambda d, **kw: linattn.delta_rule_decode(
        d["q"], d["k"], d["v"], d["beta"], d["g"], **kw),
    "mlstm": lambda d, **kw: linattn.mlstm_decode(d["q"], d["k"], d["v"], d["i"], d["f"], **kw),
}


DECODE_CASES = [("linear_attention", "key"), ("linear_attention", "const"),
                ("delta_rule", "scalar"), ("mlstm", "exp"), ("mlstm", "sigmoid")]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_decode(backend):
    """Every decode function (gate kinds, mLSTMexp's (C, n, m)) compiled with fullgraph, from
    zeros, from a state and in place (the state mutated through the compiled graph), equals
    eager. (The interpreter runs a subset: the fused step kernel takes every gate through one
    launcher.)"""
    cases = []
    todo = DECODE_CASES if backend == "torch" else [DECODE_CASES[0], DECODE_CASES[3]]
    for n, (op, gate) in enumerate(todo):
        d = _inputs(torch.float32, gate, states=True, delta=op == "delta_rule",
                    mlstm=gate if op == "mlstm" else None, seed=n)
        state = _flat(d.pop("initial_state"))
        d = {name: (x[:, :2] if x is not None and x.dim() > 1 and name != "g" or
                    (name == "g" and x is not None and x.dim() > 1) else x)
             for name, x in d.items()}
        cases.append((op, d, dict(input_gate=gate) if op == "mlstm" else {}, state))

    def fn(states, inplace):
        res = []
        for (op, d, kw, _), st in zip(cases, states):
            arg = None if not st else (tuple(st) if len(st) == 3 else st[0])
            o, new = DECODE[op](d, state=arg, inplace=inplace, backend=backend, **kw)
            res.append((o, _flat(new)))
        return res

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for from_state, inplace in ((False, False), (True, False), (True, True)):
        got_states = [[t.clone() for t in c[3]] if from_state else [] for c in cases]
        ref_states = [[t.clone() for t in c[3]] if from_state else [] for c in cases]
        got, ref = compiled(got_states, inplace), fn(ref_states, inplace)
        for (o1, s1), (o2, s2), given in zip(got, ref, got_states):
            torch.testing.assert_close(o1, o2, rtol=0, atol=0)
            for a, b in zip(s1, s2):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            if inplace:  # the given tensors hold the new state, and are what is returned
                assert all(a is b for a, b in zip(s1, given))
                for a, b in zip(given, s2):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_decode_ops():
    d = _inputs(torch.float32, "scalar", states=True, delta=True)
    d = {n: (x[:, :2].contiguous() if n in ("q", "k", "v", "beta", "g") else x)
         for n, x in d.items()}
    S = d["initial_state"].contiguous()
    _opcheck(co.delta_rule_decode_op, (d["q"], d["k"], d["v"], d["beta"], d["g"], S, 0.25, "torch"))
    _opcheck(co.delta_rule_decode_inplace_op,
             (d["q"], d["k"], d["v"], d["beta"], d["g"], S.clone(), 0.25, "triton"))
    m = _inputs(torch.float32, states=True, mlstm="exp")
    m = {n: (x[:, :2].contiguous() if n in ("q", "k", "v", "i", "f") else x) for n, x in m.items()}
    C, n_, m_ = (t.contiguous() for t in m["initial_state"])
    _opcheck(co.mlstm_decode_inplace_op,
             (m["q"], m["k"], m["v"], m["i"], m["f"], C, n_, m_, "exp", 0.25, "torch"))
    _opcheck(co.linear_attention_decode_op,
             (m["q"], m["k"], m["v"], None, None, 0.25, "triton"))


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("op,gate,states,cu", CASES + TRITON_EXTRA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compile_inductor_equals_eager(op, gate, states, cu, dtype):
    """Inductor (fullgraph) on CUDA: the op's custom ops inside a graph with the gates'
    preparation fused around them; outputs and gradients equal eager's up to the rounding of
    that fused code (the same kernels run)."""
    inputs, kw = _case(op, gate, states, cu, dtype)
    inputs = {n: (x.cuda() if isinstance(x, torch.Tensor) else
                  tuple(t.cuda() for t in x) if isinstance(x, tuple) else x)
              for n, x in inputs.items()}
    kw = {n: x.cuda() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}  # a frozen g
    fn = OPS[op]("auto", states, **kw)
    torch._dynamo.reset()
    got_o, got_g = _outputs_and_grads(torch.compile(fn, fullgraph=True), inputs)
    ref_o, ref_g = _outputs_and_grads(fn, inputs)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(got_o + got_g, ref_o + ref_g):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["key_states_cu", "const_frozen", "mexp_states_cu", "msig",
                                  "none_noncausal"])
def test_gpu_opcheck_gated_chunk(case):
    """The fake shapes of the saved tensors against the GPU's tiling (_config differs from the
    interpreter's), in float32 and bfloat16 (the stored states take the input dtype)."""
    _gated_opcheck(case, "cuda", torch.float32)
    _gated_opcheck(case, "cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("gated,cu", [(True, True), (False, False)])
def test_gpu_opcheck_delta_chunk(gated, cu):
    _delta_opcheck(gated, cu, "cuda", torch.float32)
    _delta_opcheck(gated, cu, "cuda", torch.bfloat16)
