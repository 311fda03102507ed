"""save_for_backward="recompute" runs the delta layers' short conv and delta rule as one
autograd node that keeps the conv's input, not q, k, v (linattn.ops.conv_delta): the layer
gives what it gives in "states" mode (two nodes), values and gradients, on the PyTorch path
in float64 and on the Triton path in the interpreter, dense and packed, from an initial
state and conv cache; torch.compile traces it."""
import copy

import pytest
import torch
import torch.nn.functional as F

import helpers
from linattn.layers import MIXERS
from linattn.layers.short_conv import ShortConv
from linattn.models import CausalLM, LMConfig
from linattn.ops import conv_delta
from mixer_cases import flat_state

D_MODEL, HEADS = 32, 2      # K = 16: a group the Triton conv's fused norm tiles
LENGTHS = [5, 0, 1, 9]      # packed, with an empty and a length-1 sequence

CASES = [("deltanet", {}), ("gated_deltanet", {}), ("deltanet", {"expand_v": 2.0}),
         ("mom", {}), ("mom", {"recurrence": "deltanet", "shared_memory": False})]
IDS = ["deltanet", "gated_deltanet", "deltanet-expand_v", "mom", "mom-deltanet"]


def _pair(name, opts, backend, dtype, conv_backend="auto"):
    """(the layer in "states" mode, the same weights in "recompute" mode)."""
    torch.manual_seed(0)
    m = MIXERS[name](D_MODEL, HEADS, backend=backend, **opts).to(dtype)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    for sub in m.modules():
        if isinstance(sub, ShortConv):
            sub.backend = conv_backend
    r = copy.deepcopy(m)
    r.save_for_backward = "recompute"
    return m, r


def _nodes(roots):
    seen, stack = set(), [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield type(node).__name__
        stack.extend(fn for fn, _ in node.next_functions)


def _run(m, x, state, cu, seed=3, autocast=False):
    """(y and the final state, the gradients of x, the initial state and every parameter
    from random cotangents, whether the fused node ran)."""
    x = x.detach().requires_grad_(True)
    state = None if state is None else {k: v.detach().requires_grad_(True) for k, v in state.items()}
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y, s = m(x, state=state, cu_seqlens=cu, return_state=True)
    outs = [y] + flat_state(s)
    gen = helpers.seeded(seed)
    loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)
                .to(t.device)).sum() for t in outs)
    leaves = [x] + flat_state(state) + list(m.parameters())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    fused = any("conv_delta_rule" in n for n in _nodes(outs))
    return [t.detach() for t in outs], grads, fused


def _inputs(m, dtype, packed, device="cpu"):
    """(x, an initial state with a non-trivial conv cache, cu_seqlens or None)."""
    B, T = (1, sum(LENGTHS)) if packed else (2, 40)
    gen = helpers.seeded(1)
    x = torch.randn(B, T, D_MODEL, generator=gen, dtype=torch.float64).to(device, dtype)
    cu = helpers.cu_seqlens_from_lengths(LENGTHS, device) if packed else None
    rows = len(LENGTHS) if packed else B
    with torch.no_grad():
        prefix = torch.randn(rows, 3, D_MODEL, generator=gen, dtype=torch.float64).to(device, dtype)
        _, state = m(prefix, return_state=True)
    return x, state, cu


def _compare(m, r, dtype, packed, check, autocast=False, device="cpu"):
    x, state, cu = _inputs(m, dtype, packed, device)
    outs_s, grads_s, fused_s = _run(m, x, state, cu, autocast=autocast)
    outs_r, grads_r, fused_r = _run(r, x, state, cu, autocast=autocast)
    assert not fused_s and fused_r, "recompute mode must run the conv and the op as one node"
    names = ["x"] + [f"state[{j}]" for j in range(len(flat_state(state)))] + \
        [n for n, _ in m.named_parameters()]
    for j, (a, b) in enumerate(zip(outs_r, outs_s)):
        check(a, b, f"output[{j}]")
    for n, a, b in zip(names, grads_r, grads_s):
        assert (a is None) == (b is None), f"d{n}: gradient present in one mode only"
        if b is not None:
            check(a, b, f"d{n}")


def _f64(a, b, label):
    helpers.assert_allclose_f64(a, b, label, rel=1e-12)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_recompute_equals_states_float64_torch(case, packed):
    m, r = _pair(*case, "torch", torch.float64)
    _compare(m, r, torch.float64, packed, _f64)


def _equal(a, b, label):
    assert torch.equal(a, b), f"{label}: differs by {(a.double() - b.double()).abs().max():.3g}"


TRITON_CASES = [("gated_deltanet", {}), ("deltanet", {}), ("mom", {})]


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=["gated_deltanet", "deltanet", "mom"])
def test_recompute_equals_states_triton(case, packed):
    """The Triton conv and op in the interpreter (float32): the one node reruns the same
    kernels, so values and gradients are bitwise the two nodes' (the input projections as
    separate GEMMs in both: separate_projections)."""
    m, r = map(helpers.separate_projections, _pair(*case, "triton", torch.float32, conv_backend="triton"))
    _compare(m, r, torch.float32, packed, _equal)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                                                     pytest.mark.timeout(600)])])
@pytest.mark.parametrize("name", ["gated_deltanet", "mom"])
def test_recompute_close_to_states_under_bf16_autocast(name, device):
    """bf16 autocast as a model trains (the CPU: the PyTorch paths, whose recomputed forward
    in the backward runs without autocast; CUDA: the Triton pieces; the interpreter's
    bfloat16 arithmetic is wrong): the one node's outputs and gradients within bf16 rounding
    of the two nodes'."""
    m, r = _pair(name, {}, "auto", torch.float32)
    m, r = m.to(device), r.to(device)

    def close(a, b, label):
        scale = max(1.0, b.abs().max().item())
        err = (a.double() - b.double()).abs().max().item()
        assert err <= 2e-2 * scale, f"{label}: error {err:.3g} (scale {scale:.3g})"

    _compare(m, r, torch.float32, False, close, autocast=True, device=device)


def _op_inputs(dtype, gated=True, packed=False):
    H, K, V = 2, 16, 16
    gen = helpers.seeded(5)
    B, T = (1, sum(LENGTHS)) if packed else (2, 21)
    N = len(LENGTHS) if packed else B
    C = H * (2 * K + V)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    d = dict(x=r(B, T, C), conv_weight=r(C, 4) * 0.5,
             beta=torch.sigmoid(r(B, T, H)), g=-F.softplus(r(B, T, H)) if gated else None,
             conv_cache=r(N, 3, C), initial_state=r(N, H, K, V))
    kw = dict(heads=H, key_dim=K, value_dim=V, norm_channels=2 * H * K, norm_group=K,
              output_final_state=True, return_cache=True,
              cu_seqlens=helpers.cu_seqlens_from_lengths(LENGTHS) if packed else None)
    return d, kw


def _unfused(x, conv_weight, beta, g, *, conv_cache, initial_state, conv_backend, backend,
             heads, key_dim, value_dim, norm_channels, norm_group, output_final_state,
             return_cache, cu_seqlens):
    from linattn.ops.api import delta_rule
    from linattn.ops.fused import short_conv
    y, cache = short_conv(x, conv_weight, conv_cache, cu_seqlens, "silu", return_cache,
                          conv_backend, norm_channels, norm_group)
    o, S = delta_rule(*conv_delta._split(y, heads, key_dim, value_dim), beta, g,
                      initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=cu_seqlens, backend=backend)
    return o, S, cache


@pytest.mark.parametrize("wrt", [("x",), ("beta",), ("conv_cache", "initial_state"),
                                 ("x", "conv_weight", "beta", "g")])
@pytest.mark.parametrize("gated,packed", [(True, False), (False, True)], ids=["gated", "packed"])
def test_op_gradients_of_any_subset(wrt, gated, packed):
    """short_conv_delta_rule against short_conv then delta_rule (float64, PyTorch paths):
    the outputs, and the gradients of whichever inputs require them."""
    d, kw = _op_inputs(torch.float64, gated, packed)
    kw.update(conv_backend="torch", backend="torch")
    names = [n for n in wrt if d.get(n) is not None]
    res = []
    for fn in (conv_delta.short_conv_delta_rule, _unfused):
        leaves = {n: t.detach().requires_grad_(n in names) if t is not None else None
                  for n, t in d.items()}
        outs = [t for t in fn(**leaves, **kw) if t is not None]
        gen = helpers.seeded(7)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum()
                   for t in outs)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names])
        res.append((outs, grads))
    (o1, g1), (o2, g2) = res
    for j, (a, b) in enumerate(zip(o1, o2)):
        _f64(a.detach(), b.detach(), f"output[{j}]")
    for n, a, b in zip(names, g1, g2):
        _f64(a, b, f"d{n}")


def test_op_without_gradients_and_with_an_untiled_group_takes_two_nodes():
    """No gradient to record, or a norm group the Triton conv does not tile: the conv and
    the op run as two nodes (short_conv, delta_rule), same values."""
    d, kw = _op_inputs(torch.float32)
    with torch.no_grad():
        o, S, cache = conv_delta.short_conv_delta_rule(**d, **kw, conv_backend="triton",
                                                       backend="triton")
    ref = _unfused(**d, **kw, conv_backend="triton", backend="triton")
    for a, b in zip((o, S, cache), ref):
        _equal(a, b.detach(), "no-grad output")
    kw.update(norm_group=8, norm_channels=2 * 2 * 16)
    leaves = {n: t.requires_grad_(True) if n == "x" else t for n, t in d.items()}
    outs = conv_delta.short_conv_delta_rule(**leaves, **kw, conv_backend="triton",
                                            backend="triton")
    assert not any("conv_delta_rule" in n for n in _nodes(outs[:1]))


def test_opcheck():
    """Schema, fake implementation, autograd registration of linattn::conv_delta_rule."""
    d, kw = _op_inputs(torch.float64)
    args = (d["x"].requires_grad_(True), d["conv_weight"].requires_grad_(True),
            d["conv_cache"], d["beta"].requires_grad_(True), d["g"], d["initial_state"], None,
            2, 16, 16, True, 64, 16, 0.25, True, False, "torch")
    torch.library.opcheck(conv_delta.conv_delta_rule_op, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_recompute_model_matches_eager(backend):
    """torch.compile(fullgraph=True, aot_eager) traces the delta layers in "recompute" mode
    through the one node: eager's logits and gradients."""
    torch._dynamo.reset()
    layers = ["deltanet", "gated_deltanet", "mom"]
    torch.manual_seed(0)
    model = CausalLM(LMConfig(vocab_size=23, d_model=D_MODEL, n_layers=3, n_heads=HEADS,
                              backend=backend, mlp_ratio=0, layers=layers,
                              save_for_backward="recompute"))
    if backend == "triton":
        for sub in model.modules():
            if isinstance(sub, ShortConv):
                sub.backend = "triton"
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 23, (2, 20), generator=helpers.seeded(1))
    res = []
    for fn in (compiled, model):
        model.zero_grad(set_to_none=True)
        logits = fn(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, 23), ids[:, 1:].reshape(-1)).backward()
        res.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = res
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys()
    for n in g2:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-5, msg=n)
