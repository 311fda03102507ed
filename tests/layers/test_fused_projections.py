"""The mixers (softmax attention's q, k, v too) run their input projections of x (and the output gate's with
save_for_backward="states") as one GEMM (Mixer.input_projections,
linattn.layers.base.fused_projections) and split its output into views. Each layer gives
what its separate projections give, values and every gradient in float64 within the GEMMs'
summation order; a hooked or wrapped projection takes the separate calls, its hooks firing as
before."""
import pytest
import torch
from torch import nn

import helpers
from mixer_cases import D_MODEL, build, case_id
from linattn.layers.base import FUSED_ROW_ALIGN, fused_projections
from linattn.layers.norms import GatedOutputNorm
from linattn.layers.short_conv import ShortConv

# the mixers that fold, and variants whose projections' consumers differ (a conv on q, k, v:
# Mixer.qkv_projections; linear attention's feature maps)
CASES = [("deltanet", {}), ("gated_deltanet", {}), ("mlstm", {}), ("mlstm_sig", {}),
         ("gla", {}), ("gla", {"conv_size": 4}), ("lightning", {}), ("linear", {}),
         ("linear", {"feature_map": "hedgehog"}), ("linear", {"feature_map": "norm"}),
         ("hgrn2", {}), ("hgrn2", {"lower_bound": 0.5}),
         *[(name, {"conv_size": 4}) for name in ("linear", "lightning", "mlstm", "mlstm_sig")],
         ("attention", {}), ("attention", {"n_kv_heads": 2, "qkv_bias": True}),
         ("attention", {"rope": False})]
IDS = [case_id(c) for c in CASES]
# in the interpreter, of the conv variants: GLA's (linear_attention's kernels on the conv's
# views, as Lightning's and linear attention's v) and mLSTMsig's (the mlstm kernels on them)
# (softmax attention has no Triton path)
TRITON_CASES = [c for c in CASES if c[0] != "attention"
                and ("conv_size" not in c[1] or c[0] in ("gla", "mlstm_sig"))]
MODES = ["states", "recompute"]
RTOL = 1e-12
# each mixer's folded projections (GLA's low-rank gate: its first linear), and the output
# gate's projection, folded with save_for_backward="states" only
FOLDED = {"deltanet": ["qkv_proj", "b_proj", "z_proj"],
          "gated_deltanet": ["qkv_proj", "b_proj", "a_proj", "z_proj"],
          "mlstm": ["q_proj", "k_proj", "v_proj", "i_proj", "f_proj", "z_proj"],
          "mlstm_sig": ["q_proj", "k_proj", "v_proj", "i_proj", "f_proj", "z_proj"],
          "gla": ["q_proj", "k_proj", "v_proj", "gk_proj.0", "r_proj"],
          "lightning": ["q_proj", "k_proj", "v_proj", "u_proj"],
          "linear": ["q_proj", "k_proj", "v_proj"],
          "hgrn2": ["q_proj", "f_proj", "i_proj"],
          "attention": ["q_proj", "k_proj", "v_proj"]}
GATE_PROJ = {"deltanet": "z_proj", "gated_deltanet": "z_proj", "mlstm": "z_proj",
             "mlstm_sig": "z_proj", "gla": "r_proj", "lightning": "u_proj"}


def _layer(case, save_for_backward, backend="torch"):
    m = build(case, backend=backend, save_for_backward=save_for_backward)
    for sub in m.modules():
        if isinstance(sub, (ShortConv, GatedOutputNorm)):
            sub.backend = backend
    return m


def _run(m, packed, dtype=torch.float64, autocast=False):
    """(y, the gradients of x and every parameter) of a seeded input: [2, 24, d], or two
    sequences of 9 and 15 tokens packed with cu_seqlens."""
    gen = torch.Generator().manual_seed(1)
    shape = (1, 24, D_MODEL) if packed else (2, 24, D_MODEL)
    cu = torch.tensor([0, 9, 24]) if packed else None
    x = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(x * 1.0, cu_seqlens=cu)[0]             # not a leaf, as in a model
    dy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    grads = torch.autograd.grad(y, [x, *m.parameters()], dy, allow_unused=True)
    return y.detach(), grads


def _separate(m, packed, **kw):
    """_run with the fold off (helpers.separate_projections' hook, removed after)."""
    before = {n: dict(s._forward_pre_hooks) for n, s in m.named_modules()}
    helpers.separate_projections(m)
    try:
        return _run(m, packed, **kw)
    finally:
        for n, s in m.named_modules():
            for key in set(s._forward_pre_hooks) - set(before[n]):
                del s._forward_pre_hooks[key]


def _assert_close(got, want, names, rtol, atol=0.0):
    for n, a, b in zip(names, (got[0], *got[1]), (want[0], *want[1])):
        assert (a is None) == (b is None), n
        if a is not None:
            scale = b.abs().max().item()
            err = (a.float() - b.float()).abs().max().item()
            assert err <= rtol * scale + atol, f"{n}: {err:.3g} vs scale {scale:.3g}"


def _folded(m):
    """Whether m's input projections gave views of one output (the fold ran) on a call."""
    seen = []
    method = type(m).input_projections

    def spy(*args, **kw):
        outs = method(m, *args, **kw)
        seen.append([t for t in outs if t is not None])
        return outs

    m.input_projections = spy
    try:
        m(torch.randn(1, 3, D_MODEL, dtype=m.o_proj.weight.dtype))
    finally:
        del m.input_projections
    # views of one storage (a fallback's lone output, q, k, v concatenated, is no view)
    return len({t.untyped_storage().data_ptr() for t in seen[0]}) == 1 \
        and all(t._base is not None for t in seen[0])


def _names(m):
    return ["y", "x"] + [n for n, _ in m.named_parameters()]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fold_equals_separate_projections_float64(case, mode, packed):
    m = _layer(case, mode)
    assert _folded(m)
    _assert_close(_run(m, packed), _separate(m, packed), _names(m), RTOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", TRITON_CASES, ids=[case_id(c) for c in TRITON_CASES])
def test_fold_equals_separate_projections_triton_interpreter(case, mode):
    """The Triton conv, op and output norm take the fold's strided views (float32)."""
    m = _layer(case, mode, backend="triton").float()
    _assert_close(_run(m, True, dtype=torch.float32), _separate(m, True, dtype=torch.float32),
                  _names(m), 1e-4, 1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fold_close_to_separate_projections_bf16_autocast(case, mode):
    m = _layer(case, mode).float()
    got = _run(m, False, dtype=torch.float32, autocast=True)
    want = _separate(m, False, dtype=torch.float32, autocast=True)
    assert got[0].dtype == want[0].dtype
    _assert_close(got, want, _names(m), 3e-2, 1e-3)


# a projection of q, k, v when they go through a conv (the fold's tuple form)
CONV_HOOKED = [("gla", "q_proj"), ("linear", "k_proj"), ("lightning", "v_proj"),
               ("mlstm", "k_proj"), ("mlstm_sig", "q_proj")]


@pytest.mark.parametrize("proj", [pytest.param((name, {}, p), id=f"{name}-{p}")
                                  for name, projs in FOLDED.items() for p in projs]
                         + [pytest.param(("gla", {}, "gk_proj"), id="gla-gk_proj")]
                         + [pytest.param((name, {"conv_size": 4}, p), id=f"{name}-conv_size=4-{p}")
                            for name, p in CONV_HOOKED])
def test_a_hooked_projection_takes_the_separate_calls(proj):
    """A forward hook on any folded projection (a distillation hook), or on GLA's low-rank
    gate as a whole, turns the fold off and sees its projection's output once."""
    name, opts, path = proj
    m = _layer((name, opts), "states")
    seen = []
    handle = m.get_submodule(path).register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        assert not _folded(m)
        seen.clear()
        m(torch.randn(1, 5, D_MODEL, dtype=torch.float64))
        assert len(seen) == 1 and seen[0].shape[:2] == (1, 5)
    finally:
        handle.remove()
    assert _folded(m)


@pytest.mark.parametrize("name", sorted(GATE_PROJ))
def test_recompute_leaves_the_gate_out_of_the_fold(name):
    """With save_for_backward="recompute" gated_output recomputes the gate from x: a hook on
    the gate's projection leaves the fold on."""
    r = _layer((name, {}), "recompute")
    r.get_submodule(GATE_PROJ[name]).register_forward_pre_hook(lambda mod, args: None)
    assert _folded(r)


@pytest.mark.parametrize("name, opts, targets", [
    ("deltanet", {}, ["qkv_proj", "b_proj", "z_proj"]),
    ("mlstm", {}, ["q_proj", "v_proj", "z_proj"]),
    ("mlstm", {"conv_size": 4}, ["k_proj", "z_proj"]),
    ("gla", {}, ["k_proj", "gk_proj.0"]),
    ("attention", {"n_kv_heads": 2}, ["q_proj", "v_proj"])])
def test_peft_lora_projections_take_the_separate_calls(name, opts, targets):
    peft = pytest.importorskip("peft")
    m = _layer((name, opts), "states").float()
    want = _run(m, False, dtype=torch.float32)[0]
    lora = peft.get_peft_model(
        nn.ModuleDict({"mixer": m}),
        peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=True))
    mixer = lora.base_model.model["mixer"]
    assert not _folded(mixer)
    got = mixer(torch.randn(2, 24, D_MODEL, generator=torch.Generator().manual_seed(1)) * 1.0)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # LoRA's B starts at zero


def test_fused_projections_matches_each_linear():
    torch.manual_seed(0)
    lins = [nn.Linear(8, 5, bias=False), nn.Linear(8, 2), nn.Linear(8, 3, bias=False)]
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    lins = [lin.double() for lin in lins]
    outs = fused_projections(lambda: x, *lins)
    for lin, out in zip(lins, outs):
        torch.testing.assert_close(out, lin(x), rtol=1e-12, atol=1e-14)
        assert out.shape == (2, 4, lin.out_features)
        assert out.stride(-2) % FUSED_ROW_ALIGN == 0          # rows 16-byte aligned (10 -> 16)
    assert fused_projections(lambda: x, lins[0], lins[2])[0].shape == (2, 4, 5)
    side, last = fused_projections(lambda: x, (lins[0], lins[1]), lins[2])    # a tuple: one view
    torch.testing.assert_close(side, torch.cat([lins[0](x), lins[1](x)], -1), rtol=1e-12, atol=1e-14)
    assert side.shape == (2, 4, 7) and last.shape == (2, 4, 3)

    class Wrapped(nn.Linear):
        pass

    assert fused_projections(lambda: x, lins[0], Wrapped(8, 2).double()) is None
