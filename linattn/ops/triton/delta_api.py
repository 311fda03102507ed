"""Entry point of the delta-rule Triton kernels (DeltaNet, Gated DeltaNet) and its autograd.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t)

Forward: delta_fwd.prep (b, T per chunk) -> delta_fwd.scan (chunk states, U') ->
delta_fwd.output (O: the gated family's output kernel with values U'). With
save_for_backward="states" the forward keeps what the backward reads of prep and scan (b, T,
U' and the chunk states); with "recompute" only its inputs, and the backward
(delta_bwd.backward) recomputes them: one launch of prep and of scan more per backward (about
a fifth of the fwd+bwd time; PERF_NOTES "Delta rule: launch choices") against holding about
1.5x the size of q, k, v (bf16, D 128) from forward to backward. A single op's peak is the
same either way (the backward allocates the same buffers). The backward then runs the
reverse scan for dS and two chunk-parallel gradient kernels, releasing every intermediate
after its last kernel. No atomics: bitwise deterministic.

B sequences of T tokens are handled as the packed case (cu_seqlens = [0, T, 2T, ...]) of
[1, B*T, H, D]; one code path serves both.

Callers that run the op several times on one (k, beta, g) (linattn.parallel.lasp: a rank's
transition pass, states-only pass and forward) compute prep once (`prepare`) and pass it to
`delta_rule(..., prep=)` and `chunk_states` (the states-only forward: the scan, no output
kernel); `output` and `delta_rule(..., states=)` run the output kernel alone on chunk states
the caller has (lasp forms them as linear combinations of two scans' states).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from . import common, delta_bwd, delta_fwd
from .delta_config import DeltaConfig, config_for

def chunk_layout(B: int, T: int, cu_seqlens, device) -> common.ChunkLayout:
    """The gated family's layout (common.make_layout, cached per shape) of B equal sequences
    of T tokens, or of packed cu_seqlens [N+1], with chunk = tile = BT: a chunk of the delta
    rule is a tile (tile_seq, tile_idx), and its states take the same slots.

    Equal lengths need no device-to-host sync; cu_seqlens is read once on the host (N + 1
    integers)."""
    return common.make_layout(common.lengths_of(cu_seqlens, B, T), delta_fwd.BT, delta_fwd.BT,
                              device)


def _packed(x):
    """[B, T, H, D] or [B, T, H] -> contiguous [B*T, H, D] / [B*T, H] (a view when possible)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def device_config(device: torch.device) -> DeltaConfig:
    """The launch choices for tensors on device (delta_config.config_for its capability)."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return config_for(cap)


class Prep(NamedTuple):
    """prep's results (b and T per chunk) for inputs (k, beta, g), with the layout and launch
    choices they were computed on: `prepare` makes one, delta_rule(prep=) and final_state read
    it (never write it)."""
    layout: common.ChunkLayout
    cfg: DeltaConfig
    gc: torch.Tensor | None   # [TT, H] in delta_fwd.gate_dtype, None without a gate
    tinv: torch.Tensor        # [TT, H, BT] float32


def prepare(k, beta, g=None, *, cu_seqlens=None, config: DeltaConfig | None = None) -> Prep:
    """delta_fwd.prep for k [B, T, H, K], beta, g [B, T, H] (g may be None), cu_seqlens as
    delta_rule's, config: the launch choices (None: the device's). float32 / 16-bit only
    (delta_rule hands float64 to the PyTorch path, which has no prep to share)."""
    if k.dtype == torch.float64:
        raise ValueError("prepare: float64 inputs run on the PyTorch path (no Triton prep)")
    B, T = k.shape[:2]
    layout = chunk_layout(B, T, cu_seqlens, k.device)
    cfg = config if config is not None else device_config(k.device)
    gc, tinv = delta_fwd.prep(_packed(k), _packed(beta), _packed(g) if g is not None else None,
                              layout, cfg)
    return Prep(layout, cfg, gc, tinv)


def _check_prep(prep: Prep, TT: int, H: int, gated: bool):
    if prep.tinv.shape[:2] != (TT, H) or (prep.gc is not None) != gated:
        raise ValueError(f"prep was computed for other inputs: tinv {tuple(prep.tinv.shape)} "
                         f"(gated {prep.gc is not None}) for {TT} tokens, {H} heads "
                         f"(gated {gated})")


class ChunkStates(NamedTuple):
    """The forward scan's results for one value tensor (delta_fwd.scan): the output kernel and
    the backward read h and vnew."""
    h: torch.Tensor      # [NC + N, H, K, V] in delta_fwd.state_dtype: each chunk's start state
    vnew: torch.Tensor   # [TT, H, V] in delta_fwd.vnew_dtype: U'
    final: torch.Tensor  # [N, H, K, V] float32: the state after each sequence


def chunk_states(k, v, beta, *, prep: Prep, initial_state=None) -> ChunkStates:
    """The states-only forward of the delta rule on k [B, T, H, K], v [B, T, H, V],
    beta [B, T, H] (and the gate prep was computed with) from initial_state (None: zeros):
    the state scan on prep's results, no output kernel. No autograd."""
    B, T, H, _ = k.shape
    _check_prep(prep, B * T, H, prep.gc is not None)
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    return ChunkStates(*delta_fwd.scan(_packed(k), _packed(v), _packed(beta), prep.gc,
                                       prep.tinv, h0, prep.layout, True, prep.cfg))


def output(q, k, states: ChunkStates, *, prep: Prep, scale, out_dtype=None):
    """o [B, T, H, V] (out_dtype, default q's) from chunk states of the op on q, k
    [B, T, H, K] (and prep's beta and gate): the output kernel alone. No autograd."""
    B, T, H, K = q.shape
    _check_prep(prep, B * T, H, prep.gc is not None)
    V = states.vnew.shape[-1]
    o = delta_fwd.output(_packed(q), _packed(k), states.vnew, prep.gc, states.h, prep.layout,
                         float(scale), out_dtype or q.dtype, prep.cfg)
    return o.view(B, T, H, V)


def _forward(q, k, v, beta, g, scale, initial_state, layout, output_final_state, keep, cfg,
             prep: Prep | None = None, states: ChunkStates | None = None):
    """Packed forward: q, k [TT, H, K], v [TT, H, V], beta, g [TT, H] -> (o [TT, H, V], final,
    the backward's (gc, tinv, h, vnew) when keep, else None), with the launch choices cfg;
    prep's (gc, tinv) when given, else computed here; states' (h, vnew, final) when given
    (the scan's results from initial_state), else scanned here."""
    gc, tinv = (prep.gc, prep.tinv) if prep is not None else delta_fwd.prep(k, beta, g, layout, cfg)
    if states is not None:
        h, vnew, final = states.h, states.vnew, (states.final if output_final_state else None)
    else:
        h, vnew, final = delta_fwd.scan(k, v, beta, gc, tinv, initial_state, layout,
                                        output_final_state, cfg)
    if not keep:
        tinv = None                                       # the forward's last reader was scan
    o = delta_fwd.output(q, k, vnew, gc, h, layout, scale, v.dtype, cfg)
    return o, final, ((gc, tinv, h, vnew) if keep else None)


def saved_specs(TT, H, K, V, slots, dtype, gated, keep, cfg):
    """{name: (shape, dtype)} of what the forward keeps for the backward when keep (else
    nothing), in the order (gc, tinv, h, vnew) less gc without a gate: what a fake
    (shape-only) forward must return. slots = NC + N, the state slots (chunks and sequences);
    sizes may be symbolic; dtype is q's; cfg: the launch choices (stored dtypes)."""
    if not keep:
        return {}
    specs = {"gc": ((TT, H), delta_fwd.gate_dtype(dtype))} if gated else {}
    specs.update(tinv=((TT, H, delta_fwd.BT), torch.float32),
                 h=((slots, H, K, V), delta_fwd.state_dtype(dtype, cfg)),
                 vnew=((TT, H, V), delta_fwd.vnew_dtype(dtype, cfg)))
    return specs


class DeltaRuleFunction(torch.autograd.Function):
    """Autograd of the packed delta rule; see delta_rule for the tensors' shapes. (Under
    torch.compile the same _forward and delta_bwd.backward run as the custom ops of
    linattn.ops.custom_ops.)"""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, output_final_state, layout,
                save_intermediates, cfg, prep=None, states=None):
        keep = save_intermediates and any(ctx.needs_input_grad)
        o, final, ctx.intermediates = _forward(q, k, v, beta, g, scale, initial_state, layout,
                                               output_final_state, keep, cfg, prep, states)
        ctx.save_for_backward(q, k, v, beta, g, initial_state)
        ctx.scale, ctx.layout, ctx.cfg = scale, layout, cfg
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, beta, g, initial_state = ctx.saved_tensors
        layout = ctx.layout
        # The float32 intermediates (kept by the forward, or None: recomputed) are handed over
        # in a list that delta_bwd.backward empties, so that no reference stays here (nor on
        # this frame's call stack) and each is freed after its last kernel.
        box, ctx.intermediates = [ctx.intermediates], None
        dq, dk, dv, dbeta, dg, dh0 = delta_bwd.backward(
            q, k, v, beta, g, do.contiguous(),
            dfinal.contiguous() if dfinal is not None else None, initial_state, layout,
            ctx.scale, need_dh0=initial_state is not None and ctx.needs_input_grad[5],
            kept=box, cfg=ctx.cfg)
        return dq, dk, dv, dbeta, dg, dh0, None, None, None, None, None, None, None


def run_delta(q, k, v, beta, g, h0, cu_seqlens, B, *, scale, want_final,
              save_for_backward="states", config: DeltaConfig | None = None,
              prep: Prep | None = None, states: ChunkStates | None = None):
    """DeltaRuleFunction on packed inputs q, k [TT, H, K], v [TT, H, V], beta, g [TT, H]
    (B: the batch, so that T = TT / B without cu_seqlens) -> (o [TT, H, V], final or None).
    save_for_backward: "states" | "recompute" (module docstring); config: the launch choices
    (None: the device's, device_config); prep: `prepare`'s results for these k, beta, g (its
    layout and launch choices replace cu_seqlens' and config); states: the scan's results
    from h0 (`chunk_states`, or a combination of them), with prep: the forward runs the output
    kernel alone. Under torch.compile the same
    forward and backward run as the custom ops linattn::delta_chunk(_backward), which build the
    layout inside (linattn.ops.custom_ops), take the device's config and run prep themselves."""
    save = save_for_backward == "states"
    if torch.compiler.is_compiling():
        from ..custom_ops import delta_chunk
        return delta_chunk(q, k, v, beta, g, h0, cu_seqlens, B, scale=scale,
                           want_final=want_final, save_intermediates=save)
    if states is not None and prep is None:
        raise ValueError("states needs the prep they were scanned with")
    if prep is not None:
        _check_prep(prep, q.shape[0], q.shape[1], g is not None)
        layout, cfg = prep.layout, prep.cfg
    else:
        layout = chunk_layout(B, q.shape[0] // max(B, 1), cu_seqlens, q.device)
        cfg = config if config is not None else device_config(q.device)
    return DeltaRuleFunction.apply(q, k, v, beta, g, h0, scale, want_final, layout, save, cfg,
                                   prep, states)


def delta_rule(q, k, v, beta, g=None, *, scale, initial_state=None, output_final_state=False,
               cu_seqlens=None, save_for_backward="states", config: DeltaConfig | None = None,
               prep: Prep | None = None, states: ChunkStates | None = None):
    """DeltaNet (g None) and Gated DeltaNet (g [B, T, H]) on Triton, forward and backward.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; one dtype (float32, bfloat16, float16; float64
            goes to linattn.ops.torch_chunked).
        beta: [B, T, H], g: None or [B, T, H] log-decays (float32 or q's dtype).
        scale: float multiplying q.
        initial_state: None or [N, H, K, V] (N = B, or the number of packed sequences).
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: None or int32/int64 [N+1] offsets of sequences packed along T (B == 1).
        save_for_backward: "states" keeps b, T, U' and the chunk states for the backward,
            "recompute" recomputes them there (module docstring).
        config: the kernels' launch choices (delta_config.DeltaConfig; None: the device's).
        prep: `prepare(k, beta, g, cu_seqlens=...)` of these inputs, to skip the forward's
            prep kernel (not for float64 inputs).
        states: with prep, the scan's results on these inputs from initial_state
            (`chunk_states`, or a linear combination of chunk states): the forward runs the
            output kernel alone (final_state: states.final).

    Returns:
        o: [B, T, H, V] in v's dtype; final_state: [N, H, K, V] float32, or None.
    """
    if q.dtype == torch.float64:  # the kernels compute in float32: float64 takes the torch path
        if prep is not None or states is not None:
            raise ValueError("prep, states: float64 inputs run on the PyTorch path (no Triton prep)")
        from .. import torch_chunked
        return torch_chunked.delta_rule(q, k, v, beta, g, scale=scale,
                                        initial_state=initial_state,
                                        output_final_state=output_final_state,
                                        cu_seqlens=cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    o, final = run_delta(_packed(q), _packed(k), _packed(v), _packed(beta),
                         _packed(g) if g is not None else None, h0, cu_seqlens, B,
                         scale=float(scale), want_final=bool(output_final_state),
                         save_for_backward=save_for_backward, config=config, prep=prep,
                         states=states)
    return o.view(B, T, H, V), final
