"""Row norms in Triton, forward and backward in one kernel each: RMSNorm with an optional
weight and an optional activated gate (the per-head gated output norm), and L2 normalisation.

    rms:  y = x * rsqrt(mean(x^2) + eps) * w * act(gate)
    l2:   y = x / max(||x||, eps) * w * act(gate)          (F.normalize when w, gate are None)

x is a [M, H, D] view with any strides on its first two dims and unit stride on the last
(the q or k slice of a conv output goes in without a copy); the norm runs over D. gate has
x's shape (any such strides); w is [D]; y is contiguous [M, H, D] in x's dtype, computed in
float32 and rounded once. Backward recomputes the row statistic from x (one pass over D) and
returns dx, dw and dgate. Both kernels are persistent: MAX_PROGRAMS programs (at most) each
walk row blocks of BR rows in a fixed order, the loop pipelined (the next block's loads in
flight while this one computes); a backward program accumulates g * x_hat over its blocks in
a float32 [BR, BD] tile and sums it over the rows once, into its dw partial, which the
launcher sums (no atomics: results are bitwise reproducible).

The ops are torch custom ops (linattn::row_norm_fwd / row_norm_bwd); linattn.ops.fused holds
the entry points.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..alloc import empty

ACTIVATIONS = {None: 0, "silu": 1, "sigmoid": 2}
MAX_PROGRAMS = 1056  # programs of the persistent row loop: 8 per SM of an H100 / H200, a
                     # whole number of waves at 1, 2, 4 or 8 programs per SM (fixed: results
                     # do not depend on the GPU)
TILE_ELEMS = 4096    # rows per block x padded D
NUM_WARPS = 8        # 16 elements of a tile per thread
LOOP_STAGES = 2      # the row-block loop loads the next block while it computes this one


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _offsets(r, H, s0, s1, d):
    """Element offsets [BR, BD] (int64) of rows r of a [M, H, D] view with strides (s0, s1, 1);
    the row's (m, h) in int32 (the launcher keeps M * H below 2^31)."""
    r32 = r.to(tl.int32)
    return ((r32 // H).to(tl.int64) * s0 + (r32 % H).to(tl.int64) * s1)[:, None] + d[None, :]


@triton.jit
def _cols(w, D, BD: tl.constexpr, BR: tl.constexpr, HAS_W: tl.constexpr):
    """The columns d [BD], their mask and the weight over them (float32; 1 without one)."""
    tl.static_assert(BD >= 16)
    tl.static_assert(BR >= 1)
    d = tl.arange(0, BD)
    md = d < D
    if HAS_W:
        wv = tl.load(w + d, mask=md, other=0.0).to(tl.float32)
    else:
        wv = tl.full([BD], 1.0, tl.float32)
    return d, md, wv


@triton.jit
def _inv_norm(x, D, eps, L2: tl.constexpr):
    """Per-row float32 [BR]: 1 / max(||x||, eps) (L2) or rsqrt(mean(x^2) + eps)."""
    ss = tl.sum(x * x, axis=1)
    if L2:
        return 1.0 / tl.maximum(tl.sqrt(ss), eps)
    return tl.rsqrt(ss / D + eps)


@triton.jit
def row_norm_fwd_kernel(x, w, gate, y, R, H, D, xs0, xs1, gs0, gs1, eps, BR: tl.constexpr,
                        BD: tl.constexpr, L2: tl.constexpr, HAS_W: tl.constexpr,
                        ACT: tl.constexpr, STAGES: tl.constexpr):
    """Row blocks pid, pid + G, ... of BR rows (grid G)."""
    d, md, wv = _cols(w, D, BD, BR, HAS_W)
    G = tl.num_programs(0)
    for blk in tl.range(tl.program_id(0), tl.cdiv(R, BR), G, num_stages=STAGES):
        r = blk * BR + tl.arange(0, BR).to(tl.int64)
        m = (r < R)[:, None] & md[None, :]
        # the rows, their norm
        xv = tl.load(x + _offsets(r, H, xs0, xs1, d), mask=m, other=0.0).to(tl.float32)
        out = xv * _inv_norm(xv, D, eps, L2)[:, None]
        if HAS_W:
            out = out * wv[None, :]
        # the gate's activation
        if ACT != 0:
            gv = tl.load(gate + _offsets(r, H, gs0, gs1, d), mask=m, other=0.0).to(tl.float32)
            if ACT == 1:
                out = out * gv * tl.sigmoid(gv)
            else:
                out = out * tl.sigmoid(gv)
        tl.store(y + r[:, None] * D + d[None, :], out.to(y.dtype.element_ty), mask=m)


@triton.jit
def row_norm_bwd_kernel(dy, x, w, gate, dx, dwp, dgate, R, H, D, xs0, xs1, gs0, gs1, eps,
                        BR: tl.constexpr, BD: tl.constexpr, L2: tl.constexpr,
                        HAS_W: tl.constexpr, ACT: tl.constexpr, STAGES: tl.constexpr):
    """dx, dgate (contiguous [R, D]) of row blocks pid, pid + G, ...; their dw into dwp[pid]
    (summed over the rows once, after the loop)."""
    d, md, wv = _cols(w, D, BD, BR, HAS_W)
    dw_acc = tl.zeros([BR, BD], dtype=tl.float32)
    G = tl.num_programs(0)
    for blk in tl.range(tl.program_id(0), tl.cdiv(R, BR), G, num_stages=STAGES):
        r = blk * BR + tl.arange(0, BR).to(tl.int64)
        mr = r < R
        m = mr[:, None] & md[None, :]
        xv = tl.load(x + _offsets(r, H, xs0, xs1, d), mask=m, other=0.0).to(tl.float32)
        g = tl.load(dy + r[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        # recompute the normalised rows
        inv = _inv_norm(xv, D, eps, L2)
        xh = xv * inv[:, None]
        yn = xh
        if HAS_W:
            yn = xh * wv[None, :]
        # through the gate: dgate, and the cotangent of the norm's output
        if ACT != 0:
            gv = tl.load(gate + _offsets(r, H, gs0, gs1, d), mask=m, other=0.0).to(tl.float32)
            sg = tl.sigmoid(gv)
            if ACT == 1:
                a = gv * sg
                da = sg * (1.0 + gv * (1.0 - sg))
            else:
                a = sg
                da = sg * (1.0 - sg)
            tl.store(dgate + r[:, None] * D + d[None, :], (g * yn * da).to(dgate.dtype.element_ty),
                     mask=m)
            g = g * a
        # through the weight
        if HAS_W:
            dw_acc += g * xh
            g = g * wv[None, :]
        # through the norm: dx = inv (g - xh <g, xh> / D) (rms), inv (g - xh <g, xh>) (l2)
        proj = tl.sum(g * xh, axis=1)
        if L2:
            # below eps the denominator is the constant eps: no projection
            proj = tl.where(tl.sum(xv * xv, axis=1) > eps * eps, proj, 0.0)
        else:
            proj = proj / D
        dxv = inv[:, None] * (g - xh * proj[:, None])
        tl.store(dx + r[:, None] * D + d[None, :], dxv.to(dx.dtype.element_ty), mask=m)
    if HAS_W:
        tl.store(dwp + tl.program_id(0).to(tl.int64) * D + d, tl.sum(dw_acc, axis=0), mask=md)


# ----------------------------------------------------------------------------- launchers

def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _tiles(R, D, max_programs):
    """(rows per block, padded D, programs) of R rows of D."""
    if R + TILE_ELEMS >= 2 ** 31:
        raise ValueError(f"row norms take fewer than 2^31 - {TILE_ELEMS} rows (M * H), got {R}")
    BD = max(16, triton.next_power_of_2(D))
    BR = max(1, min(64, TILE_ELEMS // BD))
    return BR, BD, max(1, min(max_programs, triton.cdiv(R, BR)))


def _launch_fwd(x, weight, gate, eps, l2, act, max_programs=MAX_PROGRAMS):
    M, H, D = x.shape
    x = _unit_last(x)
    gate = _unit_last(gate) if gate is not None else None
    y = empty(M, H, D, dtype=x.dtype, device=x.device)
    R = M * H
    if R and D:
        BR, BD, G = _tiles(R, D, max_programs)
        g = gate if gate is not None else x
        row_norm_fwd_kernel[(G,)](
            x, weight if weight is not None else x, g, y, R, H, D, x.stride(0), x.stride(1),
            g.stride(0), g.stride(1), eps, BR=BR, BD=BD, L2=l2, HAS_W=weight is not None,
            ACT=act, STAGES=LOOP_STAGES, num_warps=NUM_WARPS)
    return y


def _launch_bwd(dy, x, weight, gate, eps, l2, act, max_programs=MAX_PROGRAMS):
    M, H, D = x.shape
    x = _unit_last(x)
    gate = _unit_last(gate) if gate is not None else None
    dy = dy.contiguous()
    R = M * H
    BR, BD, G = _tiles(R, D, max_programs)
    dx = empty(M, H, D, dtype=x.dtype, device=x.device)
    dgate = empty(M, H, D, dtype=gate.dtype, device=x.device) if gate is not None else x.new_empty(0)
    dwp = empty(G, D, dtype=torch.float32, device=x.device) if weight is not None else None
    if R and D:
        g = gate if gate is not None else x
        row_norm_bwd_kernel[(G,)](
            dy, x, weight if weight is not None else x, g, dx, dwp if dwp is not None else x,
            dgate if gate is not None else x, R, H, D, x.stride(0), x.stride(1), g.stride(0),
            g.stride(1), eps, BR=BR, BD=BD, L2=l2, HAS_W=weight is not None, ACT=act,
            STAGES=LOOP_STAGES, num_warps=NUM_WARPS)
    elif dwp is not None:
        dwp.zero_()
    dw = dwp.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    return dx, dw, dgate


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("linattn::row_norm_fwd", mutates_args=())
def row_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                 eps: float, l2: bool, act: int) -> torch.Tensor:
    """y [M, H, D] in x's dtype. x, gate [M, H, D] (unit last stride); weight [D] or None;
    act 0 (no gate), 1 (silu), 2 (sigmoid); l2 picks L2 normalisation over RMSNorm."""
    return _launch_fwd(x, weight, gate, eps, l2, act)


@row_norm_fwd.register_fake
def _(x, weight, gate, eps, l2, act):
    return x.new_empty(x.shape)


@torch.library.custom_op("linattn::row_norm_bwd", mutates_args=())
def row_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                 gate: Optional[torch.Tensor], eps: float, l2: bool,
                 act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, H, D] in x's dtype, dweight like weight, dgate [M, H, D] in gate's dtype);
    empty tensors stand for an absent weight or gate."""
    return _launch_bwd(dy, x, weight, gate, eps, l2, act)


@row_norm_bwd.register_fake
def _(dy, x, weight, gate, eps, l2, act):
    return (x.new_empty(x.shape), torch.empty_like(weight) if weight is not None else x.new_empty(0),
            gate.new_empty(gate.shape) if gate is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, gate, eps, l2, act = inputs
    ctx.save_for_backward(x, weight, gate)
    ctx.eps, ctx.l2, ctx.act = eps, l2, act


def _backward(ctx, dy):
    x, weight, gate = ctx.saved_tensors
    dx, dw, dgate = row_norm_bwd(dy, x, weight, gate, ctx.eps, ctx.l2, ctx.act)
    return (dx, dw if weight is not None else None, dgate if gate is not None else None,
            None, None, None)


row_norm_fwd.register_autograd(_backward, setup_context=_setup)
