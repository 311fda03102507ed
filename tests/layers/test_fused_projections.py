"""DeltaNet and Gated DeltaNet run their input projections (qkv, b, a, and z with
save_for_backward="states") as one GEMM (linattn.layers.base.fused_projections) and split its
output into views. The layer gives what the separate projections give, values and every
gradient in float64 within the GEMMs' summation order; a hooked or wrapped projection takes
the separate calls, its hooks firing as before."""
import pytest
import torch
from torch import nn

from mixer_cases import D_MODEL, build
from linattn.layers.base import FUSED_ROW_ALIGN, fused_projections, projection_input
from linattn.layers.norms import GatedOutputNorm
from linattn.layers.short_conv import ShortConv

NAMES = ["deltanet", "gated_deltanet"]
MODES = ["states", "recompute"]
RTOL = 1e-12


def _layer(name, save_for_backward, backend="torch"):
    m = build((name, {}), backend=backend, save_for_backward=save_for_backward)
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
    """_run with the fold off: a no-op forward pre-hook on qkv_proj."""
    handle = m.qkv_proj.register_forward_pre_hook(lambda mod, args: None)
    try:
        return _run(m, packed, **kw)
    finally:
        handle.remove()


def _assert_close(got, want, names, rtol, atol=0.0):
    for n, a, b in zip(names, (got[0], *got[1]), (want[0], *want[1])):
        assert (a is None) == (b is None), n
        if a is not None:
            scale = b.abs().max().item()
            err = (a.float() - b.float()).abs().max().item()
            assert err <= rtol * scale + atol, f"{n}: {err:.3g} vs scale {scale:.3g}"


def _folded(m):
    """Whether m.project gives views of one output (the fold ran)."""
    x = torch.randn(1, 3, D_MODEL, dtype=m.o_proj.weight.dtype)
    qkv, b, _, _ = m.project(projection_input(x))
    return qkv.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_fold_equals_separate_projections_float64(name, mode, packed):
    m = _layer(name, mode)
    assert _folded(m)
    _assert_close(_run(m, packed), _separate(m, packed),
                  ["y", "x"] + [n for n, _ in m.named_parameters()], RTOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_fold_equals_separate_projections_triton_interpreter(name, mode):
    """The Triton conv, op and output norm take the fold's strided views (float32)."""
    m = _layer(name, mode, backend="triton").float()
    _assert_close(_run(m, True, dtype=torch.float32), _separate(m, True, dtype=torch.float32),
                  ["y", "x"] + [n for n, _ in m.named_parameters()], 1e-4, 1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_fold_close_to_separate_projections_bf16_autocast(name, mode):
    m = _layer(name, mode).float()
    got = _run(m, False, dtype=torch.float32, autocast=True)
    want = _separate(m, False, dtype=torch.float32, autocast=True)
    assert got[0].dtype == want[0].dtype
    _assert_close(got, want, ["y", "x"] + [n for n, _ in m.named_parameters()], 3e-2, 1e-3)


@pytest.mark.parametrize("proj", ["qkv_proj", "b_proj", "a_proj", "z_proj"])
def test_a_hooked_projection_takes_the_separate_calls(proj):
    """A forward hook on any folded projection (a distillation hook) turns the fold off and
    sees its projection's output; with save_for_backward="recompute" z is not folded."""
    m = _layer("gated_deltanet", "states")
    seen = []
    handle = getattr(m, proj).register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        assert not _folded(m)
        seen.clear()
        m(torch.randn(1, 5, D_MODEL, dtype=torch.float64))
        assert len(seen) == 1 and seen[0].shape[:2] == (1, 5)
    finally:
        handle.remove()
    assert _folded(m)
    r = _layer("gated_deltanet", "recompute")
    r.z_proj.register_forward_pre_hook(lambda mod, args: None)
    assert _folded(r)


def test_peft_lora_projections_take_the_separate_calls():
    peft = pytest.importorskip("peft")
    m = _layer("deltanet", "states").float()
    want = _run(m, False, dtype=torch.float32)[0]
    lora = peft.get_peft_model(
        nn.ModuleDict({"mixer": m}),
        peft.LoraConfig(r=2, target_modules=["qkv_proj", "b_proj", "z_proj"], init_lora_weights=True))
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

    class Wrapped(nn.Linear):
        pass

    assert fused_projections(lambda: x, lins[0], Wrapped(8, 2).double()) is None
