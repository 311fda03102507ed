"""The ops as torch custom ops (torch.library.custom_op), which is how torch.compile sees them.

Why custom ops. Left to itself, torch.compile (dynamo) traces into a Python function: it
would trace the chunked PyTorch path token loop by token loop, stop at every Triton launch,
at `cu_seqlens.tolist()` and at the layout cache, and fall back to eager at each such graph
break. `torch.compile(model, fullgraph=True)` needs every op to be one opaque node instead,
with three things registered beside it:
  * a fake (meta) implementation, which gives the output shapes and dtypes from the input
    shapes alone, so the compiler can plan memory and trace the rest of the model without
    running a kernel (data-dependent sizes, as the chunk count of packed sequences, become
    unbacked symbolic sizes);
  * an autograd formula (register_autograd) whose backward calls a second custom op, so
    AOTAutograd can trace the backward graph too;
  * a schema that says which arguments are mutated (the decode ops' in-place states), so
    functionalization stays correct.

Where they are used. The public functions (linattn.ops.api, linattn.ops.decode) validate
their arguments as before and then, only while torch.compile traces
(`torch.compiler.is_compiling()`), call the ops below; in eager mode they call the backends
directly (the autograd.Functions of the Triton path, plain autograd of the PyTorch paths).
Both run the same forward and backward code.

The ops (namespace "linattn"):
    gated_chunk, gated_chunk_backward     the Triton gated family (linear attention with any
                                          gate, mLSTM): gated_api.chunk_forward/_backward.
                                          The forward returns o, the final state and what the
                                          backward reads (chunk states, gate cumsums, ...;
                                          gated_api.saved_specs), so there is no second
                                          forward; the backward op takes them back.
    delta_chunk, delta_chunk_backward     the Triton delta rule (delta_api), likewise
                                          (delta_api.saved_specs).
    plain_linear_attention, plain_delta_rule, plain_mlstm, and their *_backward
                                          the "torch" (chunked PyTorch) and "reference"
                                          backends: the forward runs without a graph; the
                                          backward op runs the function again under autograd
                                          and takes torch.autograd.grad (these are the CPU
                                          paths; one extra forward there buys an opaque op).
    conv_delta_rule, conv_delta_rule_backward
                                          the delta layers' short conv and delta rule as one
                                          node (linattn.ops.conv_delta, defined there)
    linear_attention_decode, delta_rule_decode, mlstm_decode, and their in-place variants
    (a trailing underscore; they declare the state as mutated): no autograd (decoding is
    inference only; the public functions refuse inputs that require grad).

Host syncs: none for B sequences of T tokens. With cu_seqlens the Triton ops read the offsets
on the host to build their chunk layout (one sync in the forward op and one in the backward
op; eager syncs once, in the forward), so a packed call cannot be captured in a CUDA graph
(mode="reduce-overhead"); the saved tensors' chunk counts are then unbacked sizes.

The ops take the Triton path's packed tensors ([TT, H, D]) or the public layout ([B, T, H, D])
exactly as the functions that call them prepare them; no op returns None (an absent tensor
is left out of the returned list, or an empty tensor stands for a gradient not asked for).
`torch.library.opcheck` tests each one (tests/ops/test_custom_ops.py).
"""
from typing import Optional

import torch
from torch import Tensor

from . import reference, torch_chunked

custom_op = torch.library.custom_op


# ----------------------------------------------------------------------------- helpers

def _needs_grad(*tensors) -> bool:
    """Will autograd record this call (so the forward must keep what the backward reads)?"""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                           for t in tensors)


def _unaliased(outs, inputs) -> list:
    """outs made contiguous (the fake implementations promise contiguous outputs), with every
    tensor that shares memory with an input or an earlier output cloned: a custom op's
    outputs may alias neither (e.g. a state returned unchanged for T == 0)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs
            if isinstance(t, Tensor) and t.numel()}
    res = []
    for t in outs:
        t = t.contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        res.append(t)
    return res


def _absent_or(grad, x: Optional[Tensor]):
    """grad, or an empty tensor standing for "no gradient" (ops return no None)."""
    return grad if grad is not None else x.new_empty(0)


def _grads_back(grads, present_needed):
    """Undoes _absent_or: the gradients of the inputs, None where not asked for."""
    it = iter(grads)
    out = []
    for present, needed in present_needed:
        g = next(it) if present else None
        out.append(g if needed and g is not None and g.numel() else None)
    return out


def _fake_o_and_state(q, v, cu_seqlens, output_final_state) -> list:
    """The plain ops' fake outputs: [o [B, T, H, V]] + [final [N, H, K, V]] when asked."""
    B, T, H, K = q.shape
    outs = [v.new_empty(B, T, H, v.shape[-1])]
    if output_final_state:
        outs.append(q.new_empty(_rows(q, cu_seqlens), H, K, v.shape[-1], dtype=_compute_dtype(q)))
    return outs


def _recompute_grads(fn, inputs, needs, cotangents):
    """Gradients of fn(*inputs) (a flat list of output tensors) for the inputs with needs[j],
    given the outputs' cotangents (None: no gradient from that output); returns one tensor
    per present input (empty where not asked for). The backward of the graph-free forward of
    the plain backends: fn runs again under torch.func.vjp (autograd's own recording is off
    inside a custom op's implementation)."""
    idx = [j for j, (x, n) in enumerate(zip(inputs, needs))
           if x is not None and n and x.is_floating_point()]
    grads = {}
    if idx:
        def wrt(*primals):
            xs = list(inputs)
            for j, p in zip(idx, primals):
                xs[j] = p
            return tuple(fn(*xs))

        outs, vjp_fn = torch.func.vjp(wrt, *[inputs[j] for j in idx])
        cot = tuple(torch.zeros_like(o) if c is None else c.to(o.dtype)
                    for o, c in zip(outs, cotangents))
        grads = dict(zip(idx, vjp_fn(cot)))
    return _unaliased([grads[j] if j in grads else x.new_empty(0)
                       for j, x in enumerate(inputs) if x is not None],
                      [*inputs, *cotangents])


def _fake_grads(inputs, needs):
    """Shapes of _recompute_grads' result."""
    return [x.new_empty(x.shape) if n and x.is_floating_point() else x.new_empty(0)
            for x, n in zip(inputs, needs) if x is not None]


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _rows(q: Tensor, cu_seqlens: Optional[Tensor]):
    """N, the number of state rows: B, or the number of packed sequences."""
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _plain(backend: str):
    return reference if backend == "reference" else torch_chunked


def _flat_state(st) -> list:
    if st is None:
        return []
    return list(st) if isinstance(st, (tuple, list)) else [st]


# ----------------------------------------------------------------------------- plain backends:
# linear_attention

@custom_op("linattn::plain_linear_attention", mutates_args=())
def plain_linear_attention_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor],
                              initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                              scale: float, output_final_state: bool, causal: bool,
                              backend: str) -> list[Tensor]:
    """[o [B, T, H, V]] + [final [N, H, K, V]] when output_final_state; backend "torch" or
    "reference" (linattn.ops.api.linear_attention for the rest)."""
    with torch.no_grad():
        o, st = _plain(backend).linear_attention(
            q, k, v, g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, causal=causal)
    return _unaliased([o, *_flat_state(st)], (q, k, v, g, initial_state))


@plain_linear_attention_op.register_fake
def _(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state, causal, backend):
    return _fake_o_and_state(q, v, cu_seqlens, output_final_state)


@custom_op("linattn::plain_linear_attention_backward", mutates_args=())
def plain_linear_attention_backward_op(
        q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], initial_state: Optional[Tensor],
        cu_seqlens: Optional[Tensor], cotangents: list[Optional[Tensor]], scale: float,
        output_final_state: bool, causal: bool, backend: str, needs: list[bool]) -> list[Tensor]:
    """Gradients of q, k, v, g, initial_state (the present ones; empty where not in needs)
    from the cotangents of [o, final]."""
    def fn(q, k, v, g, h0):
        o, st = _plain(backend).linear_attention(
            q, k, v, g, scale=scale, initial_state=h0, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, causal=causal)
        return [o, *_flat_state(st)]
    return _recompute_grads(fn, [q, k, v, g, initial_state], needs, cotangents)


@plain_linear_attention_backward_op.register_fake
def _(q, k, v, g, initial_state, cu_seqlens, cotangents, scale, output_final_state, causal,
      backend, needs):
    return _fake_grads([q, k, v, g, initial_state], needs)


def _plain_la_setup(ctx, inputs, output):
    q, k, v, g, h0, cu, scale, ofs, causal, backend = inputs
    ctx.save_for_backward(q, k, v, g, h0, cu)
    ctx.args = (scale, ofs, causal, backend)


def _plain_la_backward(ctx, grads):
    q, k, v, g, h0, cu = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    res = plain_linear_attention_backward_op(q, k, v, g, h0, cu, list(grads), *ctx.args, needs)
    present = [x is not None for x in (q, k, v, g, h0)]
    return (*_grads_back(res, zip(present, needs)), None, None, None, None, None)


plain_linear_attention_op.register_autograd(_plain_la_backward, setup_context=_plain_la_setup)


# ----------------------------------------------------------------------------- delta_rule

@custom_op("linattn::plain_delta_rule", mutates_args=())
def plain_delta_rule_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor],
                        initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                        scale: float, output_final_state: bool, backend: str) -> list[Tensor]:
    """[o [B, T, H, V]] + [final [N, H, K, V]] when output_final_state (linattn.delta_rule)."""
    with torch.no_grad():
        o, st = _plain(backend).delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return _unaliased([o, *_flat_state(st)], (q, k, v, beta, g, initial_state))


@plain_delta_rule_op.register_fake
def _(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, backend):
    return _fake_o_and_state(q, v, cu_seqlens, output_final_state)


@custom_op("linattn::plain_delta_rule_backward", mutates_args=())
def plain_delta_rule_backward_op(
        q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor],
        initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
        cotangents: list[Optional[Tensor]], scale: float, output_final_state: bool,
        backend: str, needs: list[bool]) -> list[Tensor]:
    """Gradients of q, k, v, beta, g, initial_state (present ones) from [o, final]'s."""
    def fn(q, k, v, beta, g, h0):
        o, st = _plain(backend).delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=h0,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return [o, *_flat_state(st)]
    return _recompute_grads(fn, [q, k, v, beta, g, initial_state], needs, cotangents)


@plain_delta_rule_backward_op.register_fake
def _(q, k, v, beta, g, initial_state, cu_seqlens, cotangents, scale, output_final_state,
      backend, needs):
    return _fake_grads([q, k, v, beta, g, initial_state], needs)


def _plain_dr_setup(ctx, inputs, output):
    q, k, v, beta, g, h0, cu, scale, ofs, backend = inputs
    ctx.save_for_backward(q, k, v, beta, g, h0, cu)
    ctx.args = (scale, ofs, backend)


def _plain_dr_backward(ctx, grads):
    q, k, v, beta, g, h0, cu = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    res = plain_delta_rule_backward_op(q, k, v, beta, g, h0, cu, list(grads), *ctx.args, needs)
    present = [x is not None for x in (q, k, v, beta, g, h0)]
    return (*_grads_back(res, zip(present, needs)), None, None, None, None)


plain_delta_rule_op.register_autograd(_plain_dr_backward, setup_context=_plain_dr_setup)


# ----------------------------------------------------------------------------- mlstm

def _mlstm_state(input_gate, C0, n0, m0):
    if C0 is None:
        return None
    return (C0, n0, m0) if input_gate == "exp" else C0


@custom_op("linattn::plain_mlstm", mutates_args=())
def plain_mlstm_op(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor,
                   C0: Optional[Tensor], n0: Optional[Tensor], m0: Optional[Tensor],
                   cu_seqlens: Optional[Tensor], input_gate: str, scale: float,
                   output_final_state: bool, backend: str) -> list[Tensor]:
    """[o [B, T, H, V]] + the final state when output_final_state: [C] ("sigmoid") or
    [C [N, H, K, V], n [N, H, K], m [N, H]] ("exp"); the initial state likewise as C0 (n0,
    m0), all None for zeros (linattn.mlstm)."""
    with torch.no_grad():
        o, st = _plain(backend).mlstm(
            q, k, v, i, f, input_gate=input_gate, scale=scale,
            initial_state=_mlstm_state(input_gate, C0, n0, m0),
            output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return _unaliased([o, *_flat_state(st)], (q, k, v, i, f, C0, n0, m0))


@plain_mlstm_op.register_fake
def _(q, k, v, i, f, C0, n0, m0, cu_seqlens, input_gate, scale, output_final_state, backend):
    B, T, H, K = q.shape
    V = v.shape[-1]
    outs = [v.new_empty(B, T, H, V)]
    if output_final_state:
        N, dt = _rows(q, cu_seqlens), _compute_dtype(q)
        outs.append(q.new_empty(N, H, K, V, dtype=dt))
        if input_gate == "exp":
            outs += [q.new_empty(N, H, K, dtype=dt), q.new_empty(N, H, dtype=dt)]
    return outs


@custom_op("linattn::plain_mlstm_backward", mutates_args=())
def plain_mlstm_backward_op(
        q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C0: Optional[Tensor],
        n0: Optional[Tensor], m0: Optional[Tensor], cu_seqlens: Optional[Tensor],
        cotangents: list[Optional[Tensor]], input_gate: str, scale: float,
        output_final_state: bool, backend: str, needs: list[bool]) -> list[Tensor]:
    """Gradients of q, k, v, i, f, C0, n0, m0 (present ones) from the outputs' cotangents."""
    def fn(q, k, v, i, f, C0, n0, m0):
        o, st = _plain(backend).mlstm(
            q, k, v, i, f, input_gate=input_gate, scale=scale,
            initial_state=_mlstm_state(input_gate, C0, n0, m0),
            output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return [o, *_flat_state(st)]
    return _recompute_grads(fn, [q, k, v, i, f, C0, n0, m0], needs, cotangents)


@plain_mlstm_backward_op.register_fake
def _(q, k, v, i, f, C0, n0, m0, cu_seqlens, cotangents, input_gate, scale, output_final_state,
      backend, needs):
    return _fake_grads([q, k, v, i, f, C0, n0, m0], needs)


def _plain_ml_setup(ctx, inputs, output):
    q, k, v, i, f, C0, n0, m0, cu, input_gate, scale, ofs, backend = inputs
    ctx.save_for_backward(q, k, v, i, f, C0, n0, m0, cu)
    ctx.args = (input_gate, scale, ofs, backend)


def _plain_ml_backward(ctx, grads):
    q, k, v, i, f, C0, n0, m0, cu = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:8])
    res = plain_mlstm_backward_op(q, k, v, i, f, C0, n0, m0, cu, list(grads), *ctx.args, needs)
    present = [x is not None for x in (q, k, v, i, f, C0, n0, m0)]
    return (*_grads_back(res, zip(present, needs)), None, None, None, None, None)


plain_mlstm_op.register_autograd(_plain_ml_backward, setup_context=_plain_ml_setup)


# ----------------------------------------------------------------------------- plain: callers

def plain_linear_attention(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens,
                           causal, backend):
    """linattn.linear_attention's (o, final_state) on the "torch"/"reference" custom op."""
    outs = plain_linear_attention_op(q, k, v, g, initial_state, cu_seqlens, float(scale),
                                     bool(output_final_state), bool(causal), backend)
    return outs[0], (outs[1] if output_final_state else None)


def plain_delta_rule(q, k, v, beta, g, *, scale, initial_state, output_final_state, cu_seqlens,
                     backend):
    """linattn.delta_rule's (o, final_state) on the "torch"/"reference" custom op."""
    outs = plain_delta_rule_op(q, k, v, beta, g, initial_state, cu_seqlens, float(scale),
                               bool(output_final_state), backend)
    return outs[0], (outs[1] if output_final_state else None)


def plain_mlstm(q, k, v, i, f, *, input_gate, scale, initial_state, output_final_state,
                cu_seqlens, backend):
    """linattn.mlstm's (o, final_state) on the "torch"/"reference" custom op."""
    C0, n0, m0 = (None, None, None) if initial_state is None else (
        tuple(initial_state) if input_gate == "exp" else (initial_state, None, None))
    outs = plain_mlstm_op(q, k, v, i, f, C0, n0, m0, cu_seqlens, input_gate, float(scale),
                          bool(output_final_state), backend)
    if not output_final_state:
        return outs[0], None
    return outs[0], (tuple(outs[1:4]) if input_gate == "exp" else outs[1])


# ----------------------------------------------------------------------------- Triton: gated

def _gated_setup_of(q, v, B, gate, has_kw, mexp, noncausal):
    from .triton import gated_api
    return gated_api, gated_api._config(gate, q.shape[-1], v.shape[-1], q.dtype, has_kw=has_kw,
                                        mexp=mexp, noncausal=noncausal)


def _fake_sizes(TT, B, L, cu_seqlens, want_slots, want_chunk_rows):
    """(slots, chunk_rows) = (NC + N, max(NC, 1)) for NC chunks of L tokens, for a fake
    forward: plain sizes for B sequences of TT / B tokens; for packed sequences unbacked
    sizes (they depend on cu_seqlens' values), made only where an output uses them (the
    compiler binds each to one output dimension)."""
    if cu_seqlens is None:
        T = TT // max(B, 1)
        NC = B * ((T + L - 1) // L)
        return NC + B, torch.sym_max(NC, 1)
    ctx = torch.library.get_ctx()
    slots = ctx.new_dynamic_size(min=1) if want_slots else None
    rows = ctx.new_dynamic_size(min=1) if want_chunk_rows else None
    return slots, rows


@custom_op("linattn::gated_chunk", mutates_args=())
def gated_chunk_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], kw: Optional[Tensor],
                   h0: Optional[Tensor], n0: Optional[Tensor], m0: Optional[Tensor],
                   cu_seqlens: Optional[Tensor], B: int, gate: int, has_kw: bool, mexp: bool,
                   noncausal: bool, scale: float, want_final: bool, save: bool,
                   keep_states: bool) -> list[Tensor]:
    """The Triton gated family's forward (gated_api.GatedChunkFunction's tensors; B: the
    batch behind the packed TT tokens). Returns [o [TT, H, V]] + the final state (ht, and nt,
    mt for mexp) when want_final + the backward's tensors (gated_api.saved_specs) when save."""
    ga, (cfg, L, BT) = _gated_setup_of(q, v, B, gate, has_kw, mexp, noncausal)
    layout, _ = ga.layouts(cfg, L, BT, B, q.shape[0] // max(B, 1), cu_seqlens, q.device)
    o, ht, nt, mt, saved = ga.chunk_forward(q, k, v, g, kw, h0, n0, m0, layout, cfg, scale,
                                            want_final, keep_states, defined=save)
    outs = [o]
    if want_final:
        outs += [ht, nt, mt] if mexp else [ht]
    if save:
        TT, H, K = q.shape
        specs = ga.saved_specs(cfg, BT, TT, H, K, v.shape[-1], layout.N, layout.n_slots,
                               max(layout.NC, 1), q.dtype, keep_states)
        outs += [getattr(saved, name) for name in specs]
    return _unaliased(outs, (q, k, v, g, kw, h0, n0, m0))


@gated_chunk_op.register_fake
def _(q, k, v, g, kw, h0, n0, m0, cu_seqlens, B, gate, has_kw, mexp, noncausal, scale,
      want_final, save, keep_states):
    ga, (cfg, L, BT) = _gated_setup_of(q, v, B, gate, has_kw, mexp, noncausal)
    TT, H, K = q.shape
    V = v.shape[-1]
    outs = [v.new_empty(TT, H, V)]
    N = _rows(q, cu_seqlens) if cu_seqlens is not None else B
    if want_final:
        outs.append(q.new_empty(N, H, K, V, dtype=torch.float32))
        if mexp:
            outs += [q.new_empty(N, H, K, dtype=torch.float32),
                     q.new_empty(N, H, dtype=torch.float32)]
    if save:
        slots, rows = _fake_sizes(TT, B, L, cu_seqlens, keep_states, mexp)
        specs = ga.saved_specs(cfg, BT, TT, H, K, V, N, slots, rows, q.dtype, keep_states)
        outs += [q.new_empty(shape, dtype=dt) for shape, dt in specs.values()]
    return outs


@custom_op("linattn::gated_chunk_backward", mutates_args=())
def gated_chunk_backward_op(
        q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], kw: Optional[Tensor],
        h0: Optional[Tensor], n0: Optional[Tensor], m0: Optional[Tensor],
        cu_seqlens: Optional[Tensor], o: Tensor, saved: list[Tensor], do: Tensor,
        dht: Optional[Tensor], dnt: Optional[Tensor], dmt: Optional[Tensor], B: int, gate: int,
        has_kw: bool, mexp: bool, noncausal: bool, scale: float, keep_states: bool,
        need_dg: bool) -> list[Tensor]:
    """gated_api.chunk_backward: the gradients of the present ones of q, k, v, g, kw, h0,
    n0, m0 (g's empty unless need_dg or has_kw) from gated_chunk's saved tensors and o."""
    ga, (cfg, L, BT) = _gated_setup_of(q, v, B, gate, has_kw, mexp, noncausal)
    layout, dqk_layout = ga.layouts(cfg, L, BT, B, q.shape[0] // max(B, 1), cu_seqlens,
                                    q.device)
    TT, H, K = q.shape
    names = ga.saved_specs(cfg, BT, TT, H, K, v.shape[-1], layout.N, layout.n_slots,
                           max(layout.NC, 1), q.dtype, keep_states)
    kept = dict.fromkeys(ga.Saved._fields)
    kept.update(zip(names, saved))
    grads = ga.chunk_backward(q, k, v, kw, h0, n0, m0, ga.Saved(**kept), o, layout, dqk_layout,
                              cfg, scale, do, dht, dnt, dmt, need_dg,
                              g is not None and g.dim() == 1)
    inputs = (q, k, v, g, kw, h0, n0, m0)
    return _unaliased([_absent_or(d, x) for d, x in zip(grads, inputs) if x is not None],
                      (*inputs, o, *saved, do, dht, dnt, dmt))


@gated_chunk_backward_op.register_fake
def _(q, k, v, g, kw, h0, n0, m0, cu_seqlens, o, saved, do, dht, dnt, dmt, B, gate, has_kw,
      mexp, noncausal, scale, keep_states, need_dg):
    res = []
    for j, x in enumerate((q, k, v, g, kw, h0, n0, m0)):
        if x is None:
            continue
        frozen = j == 3 and not (need_dg or has_kw)
        res.append(x.new_empty(0) if frozen else x.new_empty(x.shape))
    return res


def _gated_setup(ctx, inputs, output):
    (q, k, v, g, kw, h0, n0, m0, cu, B, gate, has_kw, mexp, noncausal, scale, want_final, save,
     keep_states) = inputs
    n_final = (3 if mexp else 1) if want_final else 0
    saved = output[1 + n_final:]
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(q, k, v, g, kw, h0, n0, m0, cu, output[0], *saved)
    ctx.args = (B, gate, has_kw, mexp, noncausal, scale, keep_states)
    ctx.n_final, ctx.save = n_final, save


def _gated_backward(ctx, grads):
    if not ctx.save:
        raise RuntimeError("linattn::gated_chunk ran with save=False (no input required grad "
                           "when it was traced), so it kept nothing for a backward")
    q, k, v, g, kw, h0, n0, m0, cu, o, *saved = ctx.saved_tensors
    do = grads[0] if grads[0] is not None else torch.zeros_like(o)
    finals = list(grads[1:1 + ctx.n_final]) + [None] * (3 - ctx.n_final)
    needs = ctx.needs_input_grad
    res = gated_chunk_backward_op(q, k, v, g, kw, h0, n0, m0, cu, o, saved, do, *finals,
                                  *ctx.args, bool(needs[3]))
    present = [x is not None for x in (q, k, v, g, kw, h0, n0, m0)]
    return (*_grads_back(res, zip(present, needs[:8])),) + (None,) * 10


gated_chunk_op.register_autograd(_gated_backward, setup_context=_gated_setup)


def gated_chunk(q, k, v, g, kw, h0, n0, m0, cu_seqlens, B, *, gate, has_kw, mexp, noncausal,
                scale, want_final, keep_states):
    """gated_api.run_chunks under torch.compile: (o, ht, nt, mt) from the custom op;
    keep_states: the forward's chunk states go to the backward (save_for_backward="states")."""
    save = _needs_grad(q, k, v, g, kw, h0, n0, m0)
    outs = gated_chunk_op(q, k, v, g, kw, h0, n0, m0, cu_seqlens, B, gate, has_kw, mexp,
                          noncausal, float(scale), bool(want_final), save, bool(keep_states))
    if not want_final:
        return outs[0], None, None, None
    if mexp:
        return outs[0], outs[1], outs[2], outs[3]
    return outs[0], outs[1], None, None


# ----------------------------------------------------------------------------- Triton: delta rule

@custom_op("linattn::delta_chunk", mutates_args=())
def delta_chunk_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor],
                   h0: Optional[Tensor], cu_seqlens: Optional[Tensor], B: int, scale: float,
                   want_final: bool, keep: bool) -> list[Tensor]:
    """The Triton delta rule's forward on packed q, k [TT, H, K], v [TT, H, V], beta, g
    [TT, H] (delta_api.DeltaRuleFunction). Returns [o [TT, H, V]] + [final [N, H, K, V]]
    when want_final + the backward's tensors (delta_api.saved_specs) when keep."""
    from .triton import delta_api
    layout = delta_api.chunk_layout(B, q.shape[0] // max(B, 1), cu_seqlens, q.device)
    o, final, kept = delta_api._forward(q, k, v, beta, g, scale, h0, layout, want_final, keep,
                                        delta_api.device_config(q.device))
    outs = [o] + ([final] if want_final else [])
    if keep:
        gc, tinv, h, vnew = kept
        # the scan leaves each sequence's slot after its last chunk unwritten (nothing reads
        # it); an op's outputs must not depend on what memory held before
        h.index_fill_(0, layout.final_slot, 0)
        outs += [t for t in (gc, tinv, h, vnew) if t is not None]
    return _unaliased(outs, (q, k, v, beta, g, h0))


@delta_chunk_op.register_fake
def _(q, k, v, beta, g, h0, cu_seqlens, B, scale, want_final, keep):
    from .triton import delta_api, delta_fwd
    TT, H, K = q.shape
    V = v.shape[-1]
    outs = [v.new_empty(TT, H, V)]
    if want_final:
        N = B if cu_seqlens is None else _rows(q, cu_seqlens)
        outs.append(q.new_empty(N, H, K, V, dtype=torch.float32))
    if keep:
        slots, _ = _fake_sizes(TT, B, delta_fwd.BT, cu_seqlens, True, False)
        specs = delta_api.saved_specs(TT, H, K, V, slots, q.dtype, g is not None, keep,
                                      delta_api.device_config(q.device))
        outs += [q.new_empty(shape, dtype=dt) for shape, dt in specs.values()]
    return outs


@custom_op("linattn::delta_chunk_backward", mutates_args=())
def delta_chunk_backward_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor],
                            h0: Optional[Tensor], cu_seqlens: Optional[Tensor],
                            saved: list[Tensor], do: Tensor, dfinal: Optional[Tensor], B: int,
                            scale: float, need_dh0: bool) -> list[Tensor]:
    """delta_bwd.backward: the gradients of the present ones of q, k, v, beta, g, h0 (h0's
    empty unless need_dh0), from delta_chunk's saved tensors (recomputed when empty)."""
    from .triton import delta_api, delta_bwd
    layout = delta_api.chunk_layout(B, q.shape[0] // max(B, 1), cu_seqlens, q.device)
    kept = None
    if saved:
        kept = tuple(saved) if g is not None else (None, *saved)
    grads = delta_bwd.backward(q, k, v, beta, g, do.contiguous(),
                               None if dfinal is None else dfinal.contiguous(), h0, layout,
                               scale, need_dh0=need_dh0 and h0 is not None, kept=[kept],
                               cfg=delta_api.device_config(q.device))
    inputs = (q, k, v, beta, g, h0)
    return _unaliased([_absent_or(d, x) for d, x in zip(grads, inputs) if x is not None],
                      (*inputs, *saved, do, dfinal))


@delta_chunk_backward_op.register_fake
def _(q, k, v, beta, g, h0, cu_seqlens, saved, do, dfinal, B, scale, need_dh0):
    res = [x.new_empty(x.shape) for x in (q, k, v, beta, g) if x is not None]
    if h0 is not None:
        res.append(h0.new_empty(h0.shape) if need_dh0 else h0.new_empty(0))
    return res


def _delta_setup(ctx, inputs, output):
    q, k, v, beta, g, h0, cu, B, scale, want_final, keep = inputs
    saved = output[2 if want_final else 1:]
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(q, k, v, beta, g, h0, cu, *saved)
    ctx.args = (B, scale)
    ctx.want_final = want_final


def _delta_backward(ctx, grads):
    q, k, v, beta, g, h0, cu, *saved = ctx.saved_tensors
    do = grads[0] if grads[0] is not None else torch.zeros_like(v)
    dfinal = grads[1] if ctx.want_final else None
    needs = ctx.needs_input_grad
    res = delta_chunk_backward_op(q, k, v, beta, g, h0, cu, saved, do, dfinal, *ctx.args,
                                  bool(needs[5]))
    present = [x is not None for x in (q, k, v, beta, g, h0)]
    return (*_grads_back(res, zip(present, needs[:6])),) + (None,) * 5


delta_chunk_op.register_autograd(_delta_backward, setup_context=_delta_setup)


def delta_chunk(q, k, v, beta, g, h0, cu_seqlens, B, *, scale, want_final, save_intermediates):
    """delta_api.run_delta under torch.compile: (o, final or None) from the custom op;
    save_intermediates: the forward's b, T, U' and states go to the backward
    (save_for_backward="states")."""
    keep = save_intermediates and _needs_grad(q, k, v, beta, g, h0)
    outs = delta_chunk_op(q, k, v, beta, g, h0, cu_seqlens, B, float(scale), bool(want_final),
                          bool(keep))
    return outs[0], (outs[1] if want_final else None)


# ----------------------------------------------------------------------------- decode

def _decode_impl(name, q, k, v, gates, state, inplace, scale, backend, input_gate=None):
    """linattn.ops.decode's dispatch for one of its three functions, on validated inputs;
    state a tuple of tensors (() for zeros). Returns (o, new state tuple)."""
    from . import decode
    st = None if not state else (tuple(state) if input_gate == "exp" else state[0])
    if backend == "torch":
        fn = {"linear_attention": reference.linear_attention, "delta_rule": reference.delta_rule,
              "mlstm": reference.mlstm}[name]
        kw = dict(scale=scale) if name != "mlstm" else dict(scale=scale, input_gate=input_gate)
        o, new = decode._run_torch(fn, (q, k, v, *gates), kw, st, inplace)
    elif name == "linear_attention":
        from .triton.common import gate_kind_of
        g = gates[0]
        o, new = decode._run_triton(q, k, v, st, inplace, scale=scale, g=g, gate_kind=gate_kind_of(g))
    elif name == "delta_rule":
        beta, g = gates
        o, new = decode._run_triton(q, k, v, st, inplace, scale=scale, g=g,
                                    gate_kind="none" if g is None else "scalar", beta=beta)
    else:
        i, f = gates
        o, new = decode._run_triton(q, k, v, st, inplace, scale=scale, g=f, gate_kind="scalar",
                                    i=i, mlstm=input_gate)
    return o, _flat_state(new)


def _fake_decode(q, v, input_gate=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = _compute_dtype(q)
    st = [q.new_empty(B, H, K, V, dtype=dt)]
    if input_gate == "exp":
        st += [q.new_empty(B, H, K, dtype=dt), q.new_empty(B, H, dtype=dt)]
    return v.new_empty(B, T, H, V), st


def _present(*xs):
    return tuple(x for x in xs if x is not None)


@custom_op("linattn::linear_attention_decode", mutates_args=())
def linear_attention_decode_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor],
                               state: Optional[Tensor], scale: float,
                               backend: str) -> list[Tensor]:
    """[o, new_state] of linattn.linear_attention_decode (backend "triton" or "torch")."""
    o, new = _decode_impl("linear_attention", q, k, v, (g,), _present(state), False, scale,
                          backend)
    return _unaliased([o, *new], (q, k, v, g, state))


@linear_attention_decode_op.register_fake
def _(q, k, v, g, state, scale, backend):
    o, st = _fake_decode(q, v)
    return [o, *st]


@custom_op("linattn::linear_attention_decode_", mutates_args=("state",))
def linear_attention_decode_inplace_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor],
                                       state: Tensor, scale: float, backend: str) -> Tensor:
    """o of linattn.linear_attention_decode(inplace=True); state is overwritten."""
    return _decode_impl("linear_attention", q, k, v, (g,), (state,), True, scale, backend)[0]


@linear_attention_decode_inplace_op.register_fake
def _(q, k, v, g, state, scale, backend):
    return _fake_decode(q, v)[0]


@custom_op("linattn::delta_rule_decode", mutates_args=())
def delta_rule_decode_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor],
                         state: Optional[Tensor], scale: float, backend: str) -> list[Tensor]:
    """[o, new_state] of linattn.delta_rule_decode."""
    o, new = _decode_impl("delta_rule", q, k, v, (beta, g), _present(state), False, scale,
                          backend)
    return _unaliased([o, *new], (q, k, v, beta, g, state))


@delta_rule_decode_op.register_fake
def _(q, k, v, beta, g, state, scale, backend):
    o, st = _fake_decode(q, v)
    return [o, *st]


@custom_op("linattn::delta_rule_decode_", mutates_args=("state",))
def delta_rule_decode_inplace_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
                                 g: Optional[Tensor], state: Tensor, scale: float,
                                 backend: str) -> Tensor:
    """o of linattn.delta_rule_decode(inplace=True); state is overwritten."""
    return _decode_impl("delta_rule", q, k, v, (beta, g), (state,), True, scale, backend)[0]


@delta_rule_decode_inplace_op.register_fake
def _(q, k, v, beta, g, state, scale, backend):
    return _fake_decode(q, v)[0]


@custom_op("linattn::mlstm_decode", mutates_args=())
def mlstm_decode_op(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C: Optional[Tensor],
                    n: Optional[Tensor], m: Optional[Tensor], input_gate: str, scale: float,
                    backend: str) -> list[Tensor]:
    """[o, C] ("sigmoid") or [o, C, n, m] ("exp") of linattn.mlstm_decode; the state C (n,
    m) or Nones for zeros."""
    o, new = _decode_impl("mlstm", q, k, v, (i, f), _present(C, n, m), False, scale, backend,
                          input_gate)
    return _unaliased([o, *new], (q, k, v, i, f, C, n, m))


@mlstm_decode_op.register_fake
def _(q, k, v, i, f, C, n, m, input_gate, scale, backend):
    o, st = _fake_decode(q, v, input_gate)
    return [o, *st]


@custom_op("linattn::mlstm_decode_", mutates_args=("C", "n", "m"))
def mlstm_decode_inplace_op(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C: Tensor,
                            n: Optional[Tensor], m: Optional[Tensor], input_gate: str,
                            scale: float, backend: str) -> Tensor:
    """o of linattn.mlstm_decode(inplace=True); C (and n, m for "exp") are overwritten."""
    return _decode_impl("mlstm", q, k, v, (i, f), _present(C, n, m), True, scale, backend,
                        input_gate)[0]


@mlstm_decode_inplace_op.register_fake
def _(q, k, v, i, f, C, n, m, input_gate, scale, backend):
    return _fake_decode(q, v, input_gate)[0]


def decode(name, q, k, v, gates, state, *, scale, inplace, backend, input_gate=None):
    """linattn.ops.decode's functions under torch.compile: (o, new_state) from the custom
    ops; state None, a tensor, or mLSTMexp's (C, n, m); backend "triton" or "torch"."""
    parts = _flat_state(state)
    scale = float(scale)
    if name == "mlstm":
        C, n, m = (list(parts) + [None] * 3)[:3]
        if inplace:
            o = mlstm_decode_inplace_op(q, k, v, *gates, C, n, m, input_gate, scale, backend)
            return o, state
        outs = mlstm_decode_op(q, k, v, *gates, C, n, m, input_gate, scale, backend)
        return outs[0], (tuple(outs[1:]) if input_gate == "exp" else outs[1])
    st = parts[0] if parts else None
    if inplace:
        op = linear_attention_decode_inplace_op if name == "linear_attention" \
            else delta_rule_decode_inplace_op
        return op(q, k, v, *gates, st, scale, backend), state
    op = linear_attention_decode_op if name == "linear_attention" else delta_rule_decode_op
    outs = op(q, k, v, *gates, st, scale, backend)
    return outs[0], outs[1]
