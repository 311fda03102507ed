"""save_for_backward="recompute" in the mixers with a projected output gate: the output norm
and out-projection take x and the gate's projection weight instead of the gate
(linattn.ops.fused.gated_rms_norm_linear_projected), keep x, and recompute the gate in their
backward. The layer gives what it gives with the gate kept, values and every gradient
bitwise in float64; a hooked or wrapped gate projection, or an ungated norm, takes the path
that keeps the gate."""
import copy

import pytest
import torch
from torch import nn

import helpers
from mixer_cases import D_MODEL, build
from linattn.layers.norms import GatedOutputNorm

# each gated mixer's gate projection
GATE_PROJ = {"lightning": "u_proj", "gla": "r_proj", "mlstm": "z_proj", "mlstm_sig": "z_proj",
             "deltanet": "z_proj", "gated_deltanet": "z_proj", "mom": "z_proj"}
# the mixers whose "recompute" changes nothing else on the PyTorch path (the delta mixers'
# conv and op become one node there, equal to the two nodes within float64 rounding:
# tests/layers/test_conv_delta.py)
PLAIN = ["lightning", "gla", "mlstm", "mlstm_sig"]
NODE = "projected_gate_norm_linear"


def _layer(name, save_for_backward):
    return build((name, {}), backend="torch", save_for_backward=save_for_backward)


def _nodes(root):
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield type(node).__name__.lower()
        stack.extend(fn for fn, _ in node.next_functions)


def _run(m):
    """(y, the gradients of x and every parameter, whether the projected-gate node ran)."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 24, D_MODEL, generator=gen, dtype=torch.float64) * 1.0).requires_grad_()
    h = x * 1.0                                  # not a leaf, as in a model
    y = m(h)[0]
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, [x, *m.parameters()], dy, allow_unused=True)
    return y.detach(), grads, any(NODE in n for n in _nodes(y.grad_fn))


def _assert_same(got, want, names):
    (y1, g1, _), (y2, g2, _) = got, want
    assert torch.equal(y1, y2), (y1 - y2).abs().max()
    for n, a, b in zip(names, g1, g2):
        assert (a is None) == (b is None), n
        if a is not None:
            assert torch.equal(a, b), f"d{n} differs by {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("name", PLAIN)
def test_recompute_equals_states_float64(name):
    """The input projections as separate GEMMs in both (helpers.separate_projections: the
    fold takes the gate's projection in "states" only, so it sums x's gradient in another
    order there)."""
    m = _layer(name, "states")
    r = copy.deepcopy(m)
    r.save_for_backward = "recompute"
    m, r = helpers.separate_projections(m), helpers.separate_projections(r)
    got, want = _run(r), _run(m)
    assert got[2] and not want[2]
    _assert_same(got, want, ["x"] + [n for n, _ in m.named_parameters()])


@pytest.mark.parametrize("name", sorted(GATE_PROJ))
def test_recompute_equals_the_kept_gate_float64(name):
    """Against the same layer in "recompute" with its gate projection hooked, which keeps
    the gate (the delta mixers' conv and op are one node in both)."""
    r = _layer(name, "recompute")
    got = _run(r)
    handle = getattr(r, GATE_PROJ[name]).register_forward_pre_hook(lambda mod, args: None)
    try:
        want = _run(r)
    finally:
        handle.remove()
    assert got[2] and not want[2]
    _assert_same(got, want, ["x"] + [n for n, _ in r.named_parameters()])


def test_out_norm_falls_back_to_keeping_the_gate():
    """A gate projection that is not a plain nn.Linear, or an ungated norm, gives
    forward(o, gate_proj(x), linear)."""
    torch.manual_seed(0)
    o = torch.randn(2, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    gate_proj = nn.Sequential(nn.Linear(12, 16)).double()
    o_proj = nn.Linear(16, 10).double()
    for norm, proj in [(GatedOutputNorm(8), gate_proj),
                       (GatedOutputNorm(8, activation=None), gate_proj[0])]:
        norm = norm.double()
        y = norm(o, proj, o_proj, x=x)
        assert not any(NODE in n for n in _nodes(y.grad_fn))
        assert torch.equal(y, norm(o, proj(x), o_proj))
