"""The one shared testing helper module: random inputs and the oracle tolerance rule.

Tolerance rule (docs/design.md section 5): let base be the error of rounding alone, i.e. the
float64 oracle run on inputs rounded to the test dtype, its outputs rounded to that dtype,
measured against the oracle on the unrounded inputs. A fast path's error against the float64
oracle must be at most 3x base for outputs and states and 5x base for gradients, plus 1e-6.
float64 paths must agree to ~1e-10 (relative to the reference's magnitude).

Two refinements, both measured rather than tuned:
- base is the larger of that rounding error and the error of the oracle itself run in the
  test dtype (its loop computes in float32 for float32/bfloat16/float16 inputs), as
  flash-attention's tests do: a float32 path cannot beat the rounding of float32 sums, which
  input rounding alone does not show (seen: a gradient of a [H] gate summed over every token).
- the 1e-6 slack is scaled by the reference's magnitude, max(1, max |ref|).
A float32 path accumulates rounding that base (input and output rounding alone) does not
have: about 16 float32 ulps of slack at magnitude 1 is what 1e-6 means, and a state summed
over hundreds of tokens (magnitude 10-100) needs the same 16 ulps at its own scale, not an
absolute 1e-6 that would demand more digits than float32 holds.

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

OUT_FACTOR = 3.0
GRAD_FACTOR = 5.0
ABS_SLACK = 1e-6
F64_REL_TOL = 1e-10

# Inputs cast to the test dtype; everything else (gates, beta, states) runs in float32
# (float64 when the test dtype is float64), as users pass gates.
ACTIVATIONS = ("q", "k", "v")


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


def _flatten(x) -> list:
    if x is None:
        return []
    if isinstance(x, (tuple, list)):
        return [t for t in x if t is not None]
    return [x]


def _detach_cast(inputs: dict, dtype: torch.dtype, grad_names: Iterable[str],
                 activations: Iterable[str] = ACTIVATIONS) -> dict:
    """Leaf copies of the inputs: activations in dtype, other floats in float32/float64."""
    side = torch.float64 if dtype == torch.float64 else torch.float32
    out = {}
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            t = x.detach().to(dtype if name in activations else side)
            out[name] = t.requires_grad_(name in grad_names)
        elif isinstance(x, tuple) and all(isinstance(t, torch.Tensor) for t in x):
            out[name] = tuple(t.detach().to(side).requires_grad_(name in grad_names) for t in x)
        else:
            out[name] = x
    return out


def _upcast(inputs: dict, grad_names) -> dict:
    """float64 leaves holding exactly the (possibly rounded) values of inputs."""
    out = {}
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out[name] = x.detach().to(torch.float64).requires_grad_(name in grad_names)
        elif isinstance(x, tuple) and all(isinstance(t, torch.Tensor) for t in x):
            out[name] = tuple(t.detach().to(torch.float64).requires_grad_(name in grad_names)
                              for t in x)
        else:
            out[name] = x
    return out


def run_op(fn: Callable, inputs: dict, grad_names, cotangents, **kwargs):
    """Runs fn(**inputs, **kwargs) -> (o, state) and backpropagates the given cotangents.

    Returns ([o, *state tensors], {name: [grads]}). cotangents: [do, *dstate] in float64;
    each is cast to the matching output's dtype (and device)."""
    o, st = fn(**inputs, **kwargs)
    outs = [o] + _flatten(st)
    if grad_names:
        pairs = [(y, c.to(y.dtype).to(y.device)) for y, c in zip(outs, cotangents)
                 if y.requires_grad]
        leaves = []
        for name in grad_names:
            leaves.extend(_flatten(inputs[name]))
        grads = torch.autograd.grad([p[0] for p in pairs], leaves, [p[1] for p in pairs],
                                    allow_unused=True)
        it = iter(grads)
        gd = {name: [next(it) for _ in _flatten(inputs[name])] for name in grad_names}
    else:
        gd = {}
    return [y.detach() for y in outs], gd


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item() if ref.numel() else 0.0


def _assert_within(label, fast, ref, bases, factor, dtype):
    assert fast is not None, f"{label}: no gradient from the fast path"
    assert fast.shape == ref.shape, f"{label}: shape {tuple(fast.shape)} != {tuple(ref.shape)}"
    f = fast.detach().double().cpu()
    assert not torch.isnan(f).any(), f"{label}: NaN (unwritten or overflowed element)"
    e = _err(f, ref)
    if dtype == torch.float64:
        mag = max(1.0, ref.detach().abs().max().item() if ref.numel() else 0.0)
        assert e <= F64_REL_TOL * mag, f"{label}: float64 error {e:.3e} > {F64_REL_TOL:g} x {mag:.3g}"
    else:
        b = max(_err(x, ref) for x in bases)
        mag = max(1.0, ref.detach().abs().max().item() if ref.numel() else 0.0)
        bound = factor * b + ABS_SLACK * mag
        assert e <= bound, (f"{label}: error {e:.3e} > {factor:g} x base {b:.3e} "
                            f"+ {ABS_SLACK:g} x magnitude {mag:.3g}")


def check_against_oracle(fast_fn: Callable, oracle_fn: Callable, inputs: dict, *,
                         dtype: torch.dtype, grad_names=(), seed: int = 1234,
                         device: str = "cpu", noncontig_grads: bool = False, rel_grads=None,
                         activations: Iterable[str] = ACTIVATIONS, **kwargs):
    """Asserts the docs/design.md section 5 tolerance rule for outputs, states and gradients.

    inputs: float64 tensors (or tuples of tensors, e.g. an mLSTM state) and plain values,
    passed as keywords to both functions with **kwargs. grad_names: inputs to differentiate.
    The cotangents of o and of each final-state tensor are random, so gradients flowing
    through the final state are checked too. rel_grads {name: r}: that input's gradient is
    held to r x max(1, its largest magnitude) instead (only for a documented known gap: the float32
    gradient of a constant [H] log-decay, which sums every token's chunk-identity term).
    activations: the inputs cast to dtype (the others run in float32, float64 for float64).
    Returns the fast path's (outs, grads)."""
    grad_names = list(grad_names)
    exact = _upcast(inputs, grad_names)
    ref_outs, _ = oracle_fn(**exact, **kwargs)
    gen = seeded(seed)
    n_out = 1 + len(_flatten(_))
    probe = [ref_outs] + _flatten(_)
    cot = []
    for y in probe:
        c = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        if noncontig_grads and c.dim() >= 3:
            c = c.transpose(-1, -2).contiguous().transpose(-1, -2)
        cot.append(c)
    ref, ref_g = run_op(oracle_fn, exact, grad_names, cot, **kwargs)

    rounded = _detach_cast(inputs, dtype, grad_names, activations)
    fast_in = {n: (t.to(device).detach().requires_grad_(t.requires_grad)
                   if isinstance(t, torch.Tensor) and t.is_floating_point() else
                   tuple(s.to(device).detach().requires_grad_(s.requires_grad) for s in t)
                   if isinstance(t, tuple) and t and isinstance(t[0], torch.Tensor) else
                   (t.to(device) if isinstance(t, torch.Tensor) else t))
               for n, t in rounded.items()}
    fast, fast_g = run_op(fast_fn, fast_in, grad_names, cot, **kwargs)
    assert len(fast) == n_out, f"fast path returned {len(fast)} outputs, oracle {n_out}"

    if dtype == torch.float64:
        base, base_g = ref, ref_g
        low, low_g = ref, ref_g
    else:
        low_in = _detach_cast(inputs, dtype, grad_names, activations)
        low, low_g = run_op(oracle_fn, low_in, grad_names, cot, **kwargs)
        base_in = _upcast(rounded, grad_names)
        base, base_g = run_op(oracle_fn, base_in, grad_names, cot, **kwargs)
        # Round the oracle's outputs to what the fast path returns (o: dtype, states: float32).
        base = [b.to(fy.dtype).double() for b, fy in zip(base, fast)]
        base_g = {n: [b.to(rounded_t.dtype).double() if b is not None else None
                      for b, rounded_t in zip(gs, _flatten(rounded[n]))]
                  for n, gs in base_g.items()}

    labels = ["o"] + [f"state[{j}]" for j in range(n_out - 1)]
    for lab, f_, r_, b_, l_ in zip(labels, fast, ref, base, low):
        _assert_within(lab, f_, r_, (b_, l_), OUT_FACTOR, dtype)
    for name in grad_names:
        for j, (f_, r_, b_, l_) in enumerate(zip(fast_g[name], ref_g[name], base_g[name],
                                                 low_g[name])):
            if r_ is None:
                r_ = torch.zeros_like(_flatten(exact[name])[j])
                b_ = l_ = r_
            if rel_grads and name in rel_grads and dtype == torch.float32:
                e, mag = _err(f_, r_), max(1.0, r_.abs().max().item())
                assert e <= rel_grads[name] * mag, (
                    f"d{name}[{j}]: error {e:.3e} > {rel_grads[name]:g} x magnitude {mag:.3g}")
                continue
            _assert_within(f"d{name}[{j}]", f_, r_, (b_, l_ if l_ is not None else r_),
                           GRAD_FACTOR, dtype)
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
