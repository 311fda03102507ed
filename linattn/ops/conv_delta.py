"""The delta-rule layers' short conv and delta rule as one autograd node that keeps the conv's
input instead of its output (the layers' save_for_backward="recompute"):

    y = short_conv(x, weight, cache)              [B, T, 2HK + HV] (SiLU, q and k's L2 norm)
    q, k, v = split(y)                            [B, T, H, K], [B, T, H, K], [B, T, H, V]
    o, S = delta_rule(q, k, v, beta, g, ...)

Run as two nodes, autograd keeps x for the conv's backward and the op's contiguous copies of
q, k, v for the op's backward: 2 (2HK + HV) bytes per token each in bf16. The one node keeps
x (and the weight, cache, beta, g, initial state); its backward runs the conv's forward again
(with the fused norm) for q, k, v, then the op's backward (which recomputes the op's chunk
states, as save_for_backward="recompute" does), then the conv's backward. The conv's Triton
backward reads x, not y, so the extra work is one conv forward per backward.

The node is a torch custom op (linattn::conv_delta_rule, with linattn::conv_delta_rule_backward
as its autograd formula) in eager mode and under torch.compile alike; inside, the conv runs
on its Triton or PyTorch path and the op on its Triton, chunked PyTorch or reference backend,
as short_conv and delta_rule pick them. The conv's new cache (a gather of x and the old
cache) is computed outside the node, by plain differentiable ops.

Calls that autograd does not record, and the Triton conv with a norm group its kernel does
not tile (the norm then runs after the conv, unfused), take the two-node path: same values.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import api, fused, reference
from .custom_ops import (_absent_or, _compute_dtype, _grads_back, _needs_grad, _rows,
                         _unaliased, delta_chunk_backward_op, plain_delta_rule_backward_op)


def _split(y: Tensor, H: int, K: int, V: int):
    """q, k [B, T, H, K] and v [B, T, H, V]: views of y [B, T, 2HK + HV]."""
    q, k, v = y.split([H * K, H * K, H * V], dim=-1)
    return q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V))


def short_conv_delta_rule(x: Tensor, conv_weight: Tensor, beta: Tensor, g: Tensor | None = None,
                          *, heads: int, key_dim: int, value_dim: int,
                          conv_cache: Tensor | None = None, activation: str | None = "silu",
                          norm_channels: int = 0, norm_group: int = 0, scale=None,
                          initial_state: Tensor | None = None, output_final_state: bool = False,
                          return_cache: bool = False, cu_seqlens: Tensor | None = None,
                          conv_backend: str = "auto", backend: str = "auto"):
    """delta_rule(q, k, v, beta, g, ..., save_for_backward="recompute") on q, k, v = the split
    of short_conv(x, conv_weight, conv_cache, ...), as one autograd node that keeps x, not
    q, k, v (module docstring).

    Args:
        x: [B, T, 2HK + HV] the conv's input (H = heads, K = key_dim, V = value_dim).
        conv_weight, conv_cache, activation, norm_channels, norm_group, cu_seqlens: as
            linattn.ops.fused.short_conv's weight, cache, ...; conv_backend its backend.
        beta, g, scale, initial_state, output_final_state, backend: as linattn.delta_rule's.
        return_cache: also return the conv's new cache.

    Returns:
        (o [B, T, H, V] in x's dtype, final state [N, H, K, V] or None, new conv cache
        [B or N, W-1, C] or None).
    """
    H, K, V = heads, key_dim, value_dim
    fused.check_conv_inputs(x, conv_weight, conv_cache, cu_seqlens, activation, norm_channels,
                            norm_group)
    if x.shape[-1] != H * (2 * K + V):
        raise ValueError(f"x must be [B, T, 2HK + HV = {H * (2 * K + V)}], got {tuple(x.shape)}")
    conv_triton = fused.takes_triton(x, conv_backend)
    if conv_triton and norm_channels:
        from .triton.short_conv import NORM_GROUPS
        tiled = norm_group in NORM_GROUPS
    else:
        tiled = True
    if not tiled or not _needs_grad(x, conv_weight, conv_cache, beta, g, initial_state):
        y, new_cache = fused.short_conv(x, conv_weight, conv_cache, cu_seqlens, activation,
                                        return_cache, conv_backend, norm_channels, norm_group)
        o, final = api.delta_rule(*_split(y, H, K, V), beta, g, scale=scale,
                                  initial_state=initial_state,
                                  output_final_state=output_final_state,
                                  cu_seqlens=cu_seqlens, backend=backend,
                                  save_for_backward="recompute")
        return o, final, new_cache
    # the conv's output has x's shape and dtype: its views stand for q, k, v in the checks
    q, k, v = _split(x, H, K, V)
    scale = api.check_delta_rule(q, k, v, beta, g, scale, initial_state, cu_seqlens,
                                 "recompute")
    impl = api._backend_module(backend, q)
    if impl is reference:
        op_backend = "reference"
    elif impl.__name__ == "linattn.ops.triton" and x.dtype != torch.float64:
        op_backend = "triton"
    else:  # the chunked PyTorch path (the Triton entry point's for float64 too)
        op_backend = "torch"
    h0 = initial_state
    if h0 is not None and op_backend == "triton":
        h0 = h0.float()                                   # the kernels' state dtype
    cache_in = conv_cache.to(x.dtype) if conv_cache is not None else None
    outs = conv_delta_rule_op(x, conv_weight, cache_in, beta, g, h0, cu_seqlens, H, K, V,
                              activation == "silu", norm_channels, norm_group, float(scale),
                              bool(output_final_state), conv_triton, op_backend)
    new_cache = (fused._conv_new_cache(x, conv_cache, cu_seqlens, conv_weight.shape[1])
                 if return_cache else None)
    return outs[0], (outs[1] if output_final_state else None), new_cache


def _conv(x, weight, cache, cu_seqlens, silu, norm_channels, norm_group, conv_triton):
    """The conv's output y [B, T, C] (no autograd)."""
    return fused.short_conv(x, weight, cache, cu_seqlens, "silu" if silu else None, False,
                            "triton" if conv_triton else "torch", norm_channels, norm_group)[0]


@torch.library.custom_op("linattn::conv_delta_rule", mutates_args=())
def conv_delta_rule_op(x: Tensor, weight: Tensor, cache: Optional[Tensor], beta: Tensor,
                       g: Optional[Tensor], h0: Optional[Tensor], cu_seqlens: Optional[Tensor],
                       heads: int, key_dim: int, value_dim: int, silu: bool, norm_channels: int,
                       norm_group: int, scale: float, want_final: bool, conv_triton: bool,
                       backend: str) -> list[Tensor]:
    """[o [B, T, H, V]] + [final [N, H, K, V]] when want_final, of the delta rule (backend
    "triton", "torch" or "reference") on the split of the conv of x (its Triton path when
    conv_triton); cache in x's dtype."""
    with torch.no_grad():
        y = _conv(x, weight, cache, cu_seqlens, silu, norm_channels, norm_group, conv_triton)
        q, k, v = _split(y, heads, key_dim, value_dim)
        if backend == "triton":
            from .triton import delta_api
            o, final = delta_api.delta_rule(q, k, v, beta, g, scale=scale, initial_state=h0,
                                            output_final_state=want_final,
                                            cu_seqlens=cu_seqlens,
                                            save_for_backward="recompute")
        else:
            from .custom_ops import _plain
            o, final = _plain(backend).delta_rule(q, k, v, beta, g, scale=scale,
                                                  initial_state=h0,
                                                  output_final_state=want_final,
                                                  cu_seqlens=cu_seqlens)
    return _unaliased([o] + ([final] if want_final else []), (x, weight, cache, beta, g, h0))


@conv_delta_rule_op.register_fake
def _(x, weight, cache, beta, g, h0, cu_seqlens, heads, key_dim, value_dim, silu, norm_channels,
      norm_group, scale, want_final, conv_triton, backend):
    B, T, _ = x.shape
    outs = [x.new_empty(B, T, heads, value_dim)]
    if want_final:
        N = B if cu_seqlens is None else _rows(x, cu_seqlens)
        outs.append(x.new_empty(N, heads, key_dim, value_dim, dtype=_compute_dtype(x)))
    return outs


@torch.library.custom_op("linattn::conv_delta_rule_backward", mutates_args=())
def conv_delta_rule_backward_op(x: Tensor, weight: Tensor, cache: Optional[Tensor], beta: Tensor,
                                g: Optional[Tensor], h0: Optional[Tensor],
                                cu_seqlens: Optional[Tensor], do: Tensor,
                                dfinal: Optional[Tensor], heads: int, key_dim: int,
                                value_dim: int, silu: bool, norm_channels: int, norm_group: int,
                                scale: float, want_final: bool, conv_triton: bool, backend: str,
                                needs: list[bool]) -> list[Tensor]:
    """Gradients of the present ones of x, weight, cache, beta, g, h0 (empty where needs
    says no): the conv's forward again, the delta rule's backward, the conv's backward."""
    B, T, C = x.shape
    H, K, V = heads, key_dim, value_dim
    conv_args = (cu_seqlens, silu, norm_channels, norm_group)
    conv_in = [t for t in (x, weight, cache) if t is not None]
    if conv_triton:
        y = _conv(x, weight, cache, *conv_args, True)
    else:
        def conv(*xs):
            return _conv(xs[0], xs[1], xs[2] if cache is not None else None, *conv_args, False)

        y, conv_vjp = torch.func.vjp(conv, *conv_in)
    q, k, v = _split(y, H, K, V)
    need_qkv = any(needs[:3])
    if backend == "triton":
        from .triton.delta_api import _packed
        packed = [_packed(t) for t in (q, k, v, beta)] + [_packed(g) if g is not None else None]
        del y, q, k, v                                    # the packed copies serve from here
        grads = delta_chunk_backward_op(*packed, h0, cu_seqlens, [], _packed(do), dfinal, B,
                                        scale, bool(needs[5]))
    else:
        grads = plain_delta_rule_backward_op(q, k, v, beta, g, h0, cu_seqlens, [do, dfinal],
                                             scale, want_final, backend,
                                             [need_qkv] * 3 + list(needs[3:]))
    dq, dk, dv, *rest = grads
    dgates = _grads_back(rest, [(t is not None, True) for t in (beta, g, h0)])
    res = [t.new_empty(0) for t in conv_in]
    if need_qkv:
        dy = torch.cat([dq.reshape(B, T, H * K), dk.reshape(B, T, H * K),
                        dv.reshape(B, T, H * V)], dim=-1).to(x.dtype)
        del dq, dk, dv, grads, rest
        if conv_triton:
            from .triton.short_conv import short_conv_bwd
            dx, dw, dcache = short_conv_bwd(dy, x, weight, cache, *conv_args)
        else:
            dx, dw, *dc = conv_vjp(dy)
            dcache = dc[0] if dc else None
        res = [d if n else t.new_empty(0)
               for d, t, n in zip([dx, dw, dcache], conv_in, needs)]
    for d, t, n in zip(dgates, (beta, g, h0), needs[3:]):
        if t is not None:
            res.append(_absent_or(d.view(t.shape) if n and d is not None else None, t))
    return _unaliased(res, (x, weight, cache, beta, g, h0, do, dfinal))


@conv_delta_rule_backward_op.register_fake
def _(x, weight, cache, beta, g, h0, cu_seqlens, do, dfinal, heads, key_dim, value_dim, silu,
      norm_channels, norm_group, scale, want_final, conv_triton, backend, needs):
    return [t.new_empty(t.shape) if n else t.new_empty(0)
            for t, n in zip((x, weight, cache, beta, g, h0), needs) if t is not None]


def _setup(ctx, inputs, output):
    x, weight, cache, beta, g, h0, cu, *args = inputs
    ctx.save_for_backward(x, weight, cache, beta, g, h0, cu)
    ctx.args = args                  # heads ... backend
    ctx.want_final = args[7]


def _backward(ctx, grads):
    x, weight, cache, beta, g, h0, cu = ctx.saved_tensors
    do = grads[0] if grads[0] is not None else x.new_zeros(*x.shape[:2], ctx.args[0],
                                                           ctx.args[2])
    dfinal = grads[1] if ctx.want_final else None
    needs = list(ctx.needs_input_grad[:6])
    res = conv_delta_rule_backward_op(x, weight, cache, beta, g, h0, cu, do, dfinal, *ctx.args,
                                      needs)
    present = [t is not None for t in (x, weight, cache, beta, g, h0)]
    return (*_grads_back(res, zip(present, needs)),) + (None,) * 11


conv_delta_rule_op.register_autograd(_backward, setup_context=_setup)
