"""The one shared testing helper module: random inputs and the oracle tolerance rule.

Tolerance rule: docs/design.md section 5, implemented once in linattn.testing (which
`linattn selftest` uses too); check_against_oracle asserts it.

Typical use::

    inputs = dict(q=q, k=k, v=v, g=g)          # float64 leaves
    check_against_oracle(fast_fn, oracle_fn, inputs, dtype=torch.float32,
                         grad_names=["q", "k", "v", "g"], output_final_state=True)

where fast_fn / oracle_fn take the inputs as keyword arguments and return (o, state).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from linattn.testing import (ABS_SLACK, ACTIVATIONS, F64_REL_TOL, GRAD_FACTOR,  # noqa: F401
                             OUT_FACTOR, check_value, compare_to_oracle, max_error, run_op)
from linattn.testing import flatten as _flatten  # noqa: F401

_err = max_error


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, gen, scale=1.0, noncontig=False, device="cpu"):
    """float64 normal tensor; noncontig=True returns a transposed (non-contiguous) view."""
    if noncontig and len(shape) >= 3:
        s = list(shape)
        s[1], s[2] = s[2], s[1]
        x = torch.randn(*s, generator=gen, dtype=torch.float64) * scale
        return x.transpose(1, 2).to(device)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)


def rand_log_decay(shape, gen, low=-1.0, high=-0.0, device="cpu"):
    """Log-decays uniform in [low, high] (both <= 0), float64."""
    u = torch.rand(*shape, generator=gen, dtype=torch.float64)
    return (low + (high - low) * u).to(device)


def rand_gate(kind: str, B, T, H, K, gen, low=-1.0, high=-0.0, device="cpu"):
    """Gate of a named kind: 'none' | 'const' [H] | 'scalar' [B,T,H] | 'key' [B,T,H,K]."""
    if kind == "none":
        return None
    shape = {"const": (H,), "scalar": (B, T, H), "key": (B, T, H, K)}[kind]
    return rand_log_decay(shape, gen, low, high, device)


def unit_keys(k: torch.Tensor) -> torch.Tensor:
    """L2-normalised keys, as the delta rule's callers pass them."""
    return F.normalize(k, dim=-1)


def _assert_within(label, fast, ref, bases, factor, dtype):
    c = check_value(label, fast, ref, bases, factor, dtype)
    assert c.ok, c.message


def check_against_oracle(fast_fn: Callable, oracle_fn: Callable, inputs: dict, *,
                         dtype: torch.dtype, grad_names=(), seed: int = 1234,
                         device: str = "cpu", noncontig_grads: bool = False, rel_grads=None,
                         activations: Iterable[str] = ACTIVATIONS, **kwargs):
    """Asserts the docs/design.md section 5 tolerance rule for outputs, states and gradients
    (linattn.testing.compare_to_oracle, which documents the arguments).
    Returns the fast path's (outs, grads)."""
    fast, fast_g, checks = compare_to_oracle(
        fast_fn, oracle_fn, inputs, dtype=dtype, grad_names=grad_names, seed=seed,
        device=device, noncontig_grads=noncontig_grads, rel_grads=rel_grads,
        activations=activations, **kwargs)
    for c in checks:
        assert c.ok, c.message
    return fast, fast_g


def cu_seqlens_from_lengths(lengths, device="cpu") -> torch.Tensor:
    c = [0]
    for n in lengths:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=device)


def assert_allclose_f64(x, y, label="value", rel=F64_REL_TOL):
    mag = max(1.0, y.abs().max().item() if y.numel() else 0.0)
    e = _err(x, y)
    assert e <= rel * mag, f"{label}: error {e:.3e} > {rel:g} x {mag:.3g}"


def la_inputs(kind, *, H, K, V, B=1, T=0, seed=0, lengths=None, state=True, low=-1.0, high=0.0,
              qv_scale=1.0, noncontig=False):
    """float64 inputs of linear_attention with gate `kind`, [B, T, ...] or the packed
    `lengths` (then B = 1, T = their sum), and the names to differentiate."""
    gen = seeded(seed)
    cu = None
    if lengths is not None:
        B, T = 1, sum(lengths)
        cu = cu_seqlens_from_lengths(lengths)
    N = len(lengths) if lengths is not None else B
    inputs = dict(q=randn(B, T, H, K, gen=gen, scale=qv_scale, noncontig=noncontig),
                  k=randn(B, T, H, K, gen=gen, noncontig=noncontig),
                  v=randn(B, T, H, V, gen=gen, scale=qv_scale, noncontig=noncontig),
                  g=rand_gate(kind, B, T, H, K, gen, low, high))
    if state:
        inputs["initial_state"] = randn(N, H, K, V, gen=gen)
    if cu is not None:
        inputs["cu_seqlens"] = cu
    names = ["q", "k", "v"] + (["g"] if kind != "none" else []) + (["initial_state"] if state else [])
    return inputs, names


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref||, in float64."""
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def assert_no_worse_than_eager(got: dict, eager: dict, oracle: dict, factor: float, label: str):
    """The tolerance rule (docs/design.md section 5) for a compiled model under bf16 autocast:
    each tensor of `got` (compiled) within `factor` x the eager model's own error against the
    float64 oracle, in relative norm, plus 1e-6. A tensor of a few elements (a bias, a decay
    per head) carries a noisy error of its own, so its allowance is at least the eager error
    of all the tensors together: bf16's noise level in this model."""
    names = list(oracle)
    assert list(got) == names == list(eager), (label, sorted(got), sorted(eager), sorted(oracle))
    flat = lambda d: torch.cat([d[n].double().flatten() for n in names])  # noqa: E731
    overall = rel_error(flat(eager), flat(oracle))
    for n in names:
        err, base = rel_error(got[n], oracle[n]), rel_error(eager[n], oracle[n])
        assert err <= factor * max(base, overall) + 1e-6, (
            f"{label} {n}: {err:.3g} against eager bf16's {base:.3g} (all tensors: {overall:.3g})")


def linattn_triton_kernels() -> set[str]:
    """Names of the @triton.jit functions in linattn.ops.triton: a GPU launch of one of our
    kernels shows in the CUDA profiler under its function's name."""
    import importlib
    import pkgutil

    import triton
    import linattn.ops.triton as package
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            while not isinstance(value, triton.runtime.JITFunction) and hasattr(value, "fn"):
                value = value.fn  # autotune / heuristics wrappers
            if isinstance(value, triton.runtime.JITFunction):
                names.add(value.fn.__name__)
    return names


def cuda_kernels_launched(fn: Callable) -> set[str]:
    """Names of the CUDA kernels that fn() launches (torch.profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.name for event in prof.events()}


def separate_projections(model):
    """A no-op forward pre-hook on the first input projection (qkv_proj or q_proj) of every
    mixer that folds its input projections into one GEMM (Mixer.input_projections), which
    turns the fold off: its projections run as separate GEMMs in both save_for_backward
    modes (the output gate's projection is folded in "states" and not in "recompute", so with
    the fold the two modes sum x's gradient in different orders)."""
    from linattn.layers import (HGRN2, DeltaNet, GatedLinearAttention, LightningAttention,
                                LinearAttention, MLSTM)

    folding = (DeltaNet, MLSTM, GatedLinearAttention, LightningAttention, LinearAttention, HGRN2)
    for sub in model.modules():
        if isinstance(sub, folding):
            first = sub.qkv_proj if isinstance(sub, DeltaNet) else sub.q_proj
            first.register_forward_pre_hook(lambda mod, args: None)
    return model
