"""SwiGLU's activation in Triton: y = silu(gate) * up from one [R, 2F] tensor (gate the first F
columns, up the last F, as SwiGLU's fused gate_up projection returns them), and its backward
into one [R, 2F] gradient, so neither the split nor the concatenation of the gradient is a
copy. float32 math, rounded once.

The ops are torch custom ops (linattn::swiglu_fwd / swiglu_bwd); linattn.ops.fused.swiglu is
the entry point.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..alloc import empty

BLOCK_R = 16
BLOCK_F = 128


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _gate_up_tile(gu, R, F, s0, BR: tl.constexpr, BF: tl.constexpr):
    """This program's [BR, BF] tile (grid cdiv(R, BR) x cdiv(F, BF)) of gu [R, 2F], rows of
    stride s0: (rows r [BR] int64, columns f [BF], mask m, the gate and up halves in float32)."""
    tl.static_assert(BR >= 1)
    tl.static_assert(BF >= 16)
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    f = tl.program_id(1) * BF + tl.arange(0, BF)
    m = (r < R)[:, None] & (f < F)[None, :]
    g = tl.load(gu + r[:, None] * s0 + f[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu + r[:, None] * s0 + F + f[None, :], mask=m, other=0.0).to(tl.float32)
    return r, f, m, g, u


@triton.jit
def swiglu_fwd_kernel(gu, y, R, F, s0, BR: tl.constexpr, BF: tl.constexpr):
    """y = silu(gate) * up on one [BR, BF] tile into contiguous y [R, F]."""
    r, f, m, g, u = _gate_up_tile(gu, R, F, s0, BR, BF)
    tl.store(y + r[:, None] * F + f[None, :], (g * tl.sigmoid(g) * u).to(y.dtype.element_ty),
             mask=m)


@triton.jit
def swiglu_bwd_kernel(dy, gu, dgu, R, F, s0, BR: tl.constexpr, BF: tl.constexpr):
    """dgate = dy * up * silu'(gate), dup = dy * silu(gate) into contiguous dgu [R, 2F]."""
    r, f, m, g, u = _gate_up_tile(gu, R, F, s0, BR, BF)
    d = tl.load(dy + r[:, None] * F + f[None, :], mask=m, other=0.0).to(tl.float32)
    # silu and its derivative
    sg = tl.sigmoid(g)
    out = dgu + r[:, None] * (2 * F) + f[None, :]
    tl.store(out, (d * u * sg * (1.0 + g * (1.0 - sg))).to(dgu.dtype.element_ty), mask=m)
    tl.store(out + F, (d * g * sg).to(dgu.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- launchers

def _grid(R, F):
    return (triton.cdiv(R, BLOCK_R), triton.cdiv(F, BLOCK_F))


def _launch_fwd(gu):
    gu = gu if gu.stride(-1) == 1 else gu.contiguous()
    R, F = gu.shape[0], gu.shape[1] // 2
    y = empty(R, F, dtype=gu.dtype, device=gu.device)
    if R and F:
        swiglu_fwd_kernel[_grid(R, F)](gu, y, R, F, gu.stride(0), BR=BLOCK_R, BF=BLOCK_F)
    return y


def _launch_bwd(dy, gu):
    gu = gu if gu.stride(-1) == 1 else gu.contiguous()
    R, F = gu.shape[0], gu.shape[1] // 2
    dgu = empty(R, 2 * F, dtype=gu.dtype, device=gu.device)
    if R and F:
        swiglu_bwd_kernel[_grid(R, F)](dy.contiguous(), gu, dgu, R, F, gu.stride(0),
                                       BR=BLOCK_R, BF=BLOCK_F)
    return dgu


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("linattn::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    """y [R, F] = silu(gate_up[:, :F]) * gate_up[:, F:] in gate_up's dtype; gate_up [R, 2F]."""
    return _launch_fwd(gate_up)


@swiglu_fwd.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.custom_op("linattn::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d gate_up [R, 2F] in gate_up's dtype from dy [R, F]."""
    return _launch_bwd(dy, gate_up)


@swiglu_bwd.register_fake
def _(dy, gate_up):
    return gate_up.new_empty(gate_up.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return swiglu_bwd(dy, gate_up)


swiglu_fwd.register_autograd(_backward, setup_context=_setup)
