"""What every token mixer shares: the constructor's common arguments and the forward convention.

Forward convention (all mixers, attention included)::

    y, new_state = mixer(x, state=None, cu_seqlens=None, return_state=False)

    x           [B, T, d_model] float tensor.
    state       None (start from zeros / an empty cache), or the state a previous call returned
                with return_state=True: the mixer continues the sequence from there. Its layout
                is the mixer's own (see each class's docstring); treat it as opaque.
    cu_seqlens  int32/int64 [N+1] offsets of N sequences packed along T (B must be 1); each
                sequence runs independently, and states (given and returned) hold N rows.
    return_state  when True, new_state is the state after the last token (per sequence with
                cu_seqlens); otherwise new_state is None and no state is materialised.
    y           [B, T, d_model] in x's dtype.

Token-by-token decoding is the same call with T = 1 (or any T) and the previous state.

Sequence parallelism (LASP-2, linattn.parallel): after ``mixer.set_sequence_parallel(sp)``
with a SequenceParallelContext, x is this rank's contiguous slice [B, T_r, d_model] of a
sequence cut along time over sp's process group, and y is the same slice of the output.
Linear mixers then run sp's op (one all-gather of fixed-size states forward and backward),
short convs read the last tokens of the ranks before (sp.prev_tokens), softmax attention
all-gathers K and V (sp.causal_attention). A call under sequence parallelism takes no state,
no cu_seqlens and return_state=False (ValueError otherwise): it is for training and
long-context prefill. ``set_sequence_parallel(None)`` returns to the single-process path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.api import BACKENDS, SAVE_FOR_BACKWARD
from .short_conv import ShortConv


class Mixer(nn.Module):
    """Base class of the token mixers: validates and stores the shared constructor arguments.

    Args:
        d_model: model width; must be divisible by n_heads.
        n_heads: number of heads.
        backend: op backend passed through to linattn's ops ("auto" | "triton" | "torch" |
            "reference").
        layer_idx, n_layers: this layer's position in the stack (0-based) and the stack's
            depth; mixers whose defaults depend on depth (Lightning's decay rates) use them.
        save_for_backward: the Triton backward's memory-for-time trade of the mixer's op
            (linattn.linear_attention's argument): "states" keeps the forward's chunk states,
            "recompute" recomputes them in the backward (a lower peak in a deep model, ~10-20%
            more op time); the delta-rule mixers then also run their short conv and op as one
            node that keeps the conv's input, not q, k, v (linattn.ops.conv_delta), and the
            mixers with a projected output gate recompute the gate from x in the output
            norm's backward instead of keeping it (gated_output). Softmax attention and the
            sequence-parallel path's op ignore it.
    """

    # Parameters (names inside the mixer) whose constructor init is part of the mixer's
    # design (a forget gate's bias), kept by a model-wide re-initialisation (LMConfig init "gpt2").
    init_kept: tuple[str, ...] = ()
    # Why CUDA graphs (torch.compile mode="reduce-overhead") cannot capture this mixer, or None
    # when they can. A capture replays fixed shapes and pointers; a mixer whose op call depends
    # on the data's values (packed sequences whose lengths the router decides) says why here.
    cuda_graphs_refused: str | None = None

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto",
                 layer_idx: int = 0, n_layers: int = 1, save_for_backward: str = "states"):
        super().__init__()
        for name, val in (("d_model", d_model), ("n_heads", n_heads), ("n_layers", n_layers)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not (0 <= layer_idx < n_layers):
            raise ValueError(f"layer_idx must be in [0, n_layers={n_layers}), got {layer_idx}")
        if save_for_backward not in SAVE_FOR_BACKWARD:
            raise ValueError(f"save_for_backward must be one of {SAVE_FOR_BACKWARD}, got "
                             f"{save_for_backward!r}")
        self.d_model, self.n_heads, self.backend = d_model, n_heads, backend
        self.save_for_backward = save_for_backward
        self.head_dim = d_model // n_heads
        self.layer_idx, self.n_layers = layer_idx, n_layers
        self.sequence_parallel = None  # a linattn.parallel.SequenceParallelContext, or None

    def check_sequence_parallel(self, sp) -> None:
        """Raises TypeError unless sp is a SequenceParallelContext or None; mixers that cannot
        run sequence-parallel override it to raise ValueError."""
        from ..parallel import SequenceParallelContext

        if sp is not None and not isinstance(sp, SequenceParallelContext):
            raise TypeError("set_sequence_parallel takes a linattn.parallel.SequenceParallelContext "
                            f"or None, got {type(sp).__name__}")

    def set_sequence_parallel(self, sp) -> None:
        """Run this mixer sequence-parallel over sp's group (None: the single-process path);
        see the module docstring."""
        self.check_sequence_parallel(sp)
        self.sequence_parallel = sp

    def gated_output(self, o: torch.Tensor, xin, gate_proj: nn.Module,
                     gate: torch.Tensor | None = None) -> torch.Tensor:
        """The mixer's output self.out_norm(o, gate_proj(x), self.o_proj) (a GatedOutputNorm
        and the out-projection), x = xin() (projection_input); gate, when given, is
        gate_proj(x) already computed (fused_projections) and is used in place of calling
        gate_proj. With save_for_backward="recompute" the norm and out-projection keep x,
        whose storage the other projections keep anyway, instead of the gate, and recompute
        the gate in their backward (a given gate is then not used)."""
        if self.save_for_backward == "recompute":
            return self.out_norm(o, gate_proj, self.o_proj, x=xin())
        return self.out_norm(o, gate_proj(xin()) if gate is None else gate, self.o_proj)

    def input_projections(self, xin, *projections, gate_proj: nn.Module | None = None):
        """The input projections of x = xin(): the outputs of projections (modules, or tuples
        of modules whose outputs come side by side as one tensor), then gate_proj's (the
        output gate's projection) or None where gated_output projects the gate itself. One
        GEMM (fused_projections) when they are plain nn.Linear, gate_proj included unless
        save_for_backward="recompute" (gated_output then recomputes the gate from x); else
        one call each (a tuple's outputs concatenated), the gate left to gated_output."""
        with_gate = gate_proj is not None and self.save_for_backward != "recompute"
        outs = fused_projections(xin, *projections, *([gate_proj] if with_gate else []))
        if outs is None:
            outs = [torch.cat([m(xin()) for m in p], dim=-1) if isinstance(p, tuple) else p(xin())
                    for p in projections]
            return (*outs, None)
        return (*outs[:len(projections)], outs[-1] if with_gate else None)

    def set_qkv_conv(self, conv_size: int, widths: tuple[int, int, int]) -> None:
        """self.conv: with conv_size > 0 a short causal conv (ShortConv, silu) over the q, k
        and v projections' outputs side by side (widths: their widths), which
        qkv_projections runs; None with conv_size 0 (no parameters, the state without a
        "conv" entry). ValueError unless conv_size is an int >= 0."""
        if isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 0:
            raise ValueError(f"conv_size must be an int >= 0 (0: no short conv), got {conv_size!r}")
        self.qkv_widths = tuple(widths)
        self.conv = ShortConv(sum(widths), conv_size, activation="silu") if conv_size else None

    def qkv_projections(self, xin, qkv: tuple, *projections, gate_proj: nn.Module | None = None,
                        state=None, cu_seqlens=None, return_state: bool = False):
        """input_projections(xin, *qkv, *projections, gate_proj=gate_proj), q, k, v (qkv's
        three modules' outputs) then through self.conv when set_qkv_conv gave one:
        q, k, v = silu(shortconv(x W_q, x W_k, x W_v)), one causal depthwise conv over the
        three side by side (one GEMM output view, the conv's input), continuing
        state["conv"] (under sequence parallelism: the last tokens of the ranks before).

        Returns (q, k, v, *projections' outputs, the gate or None, S0, conv_cache): S0 the
        recurrent op's initial state (state itself without a conv, state["S"] with one),
        conv_cache the conv's new cache (None without a conv or return_state); the mixer
        returns state_with_conv(its op's final state, conv_cache)."""
        if self.conv is None:
            return (*self.input_projections(xin, *qkv, *projections, gate_proj=gate_proj), state, None)
        qkv_in, *outs = self.input_projections(xin, qkv, *projections, gate_proj=gate_proj)
        S0, conv0 = self.split_conv_state(state)
        qkv_out, conv_cache = self.run_conv(qkv_in, conv0, cu_seqlens, return_state)
        return (*qkv_out.split(list(self.qkv_widths), dim=-1), *outs, S0, conv_cache)

    def gate_to_keep(self, gate):
        """The output gate (a view of input_projections' one output, or None) as gated_output
        should keep it for the backward in a mixer with set_qkv_conv: its own copy without a
        conv, where the view would keep the whole GEMM output (q, k, v, which the op keeps
        its own copies of) alive; the view itself with a conv, which keeps that storage anyway."""
        return gate.contiguous() if gate is not None and self.conv is None else gate

    @staticmethod
    def split_conv_state(state):
        """(the op's state, the conv's cache) of a mixer state {"S", "conv"} or None."""
        return (None, None) if state is None else (state["S"], state["conv"])

    def run_conv(self, x, cache, cu_seqlens, return_state: bool):
        """self.conv(x, cache) -> (its output, its new cache or None): under sequence
        parallelism the cache is the last tokens of the ranks before."""
        if self.sequence_parallel is not None:
            cache = self.sequence_parallel.prev_tokens(x, self.conv.kernel_size - 1)
        return self.conv(x, cache, cu_seqlens, return_cache=return_state)

    @staticmethod
    def state_with_conv(S, conv_cache):
        """The state a mixer with qkv_projections returns: its op's S, or with a conv's cache
        the dict {"S": S, "conv": [B or N, conv_size-1, sum(qkv widths)] the conv's last
        inputs}."""
        return S if conv_cache is None else {"S": S, "conv": conv_cache}

    def parallel_op(self, name: str):
        """The SequenceParallelContext's op `name` ("linear_attention" or "delta_rule") with
        the signature of linattn's op of that name; cu_seqlens must be None (check_input)."""
        op = getattr(self.sequence_parallel, name)

        def run(*args, cu_seqlens=None, save_for_backward=None, **kw):
            return op(*args, **kw)

        return run

    def check_input(self, x: torch.Tensor, cu_seqlens, state=None, return_state: bool = False) -> None:
        """x must be [B, T, d_model] floating; cu_seqlens (validated by the ops) needs B == 1;
        under sequence parallelism there is no state, cu_seqlens or return_state."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor [B, T, d_model], got {type(x).__name__}"
                            + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, T, d_model={self.d_model}], got {tuple(x.shape)}")
        if cu_seqlens is not None and x.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B={x.shape[0]}")
        parallel = self.sequence_parallel is not None
        if parallel and (state is not None or cu_seqlens is not None or return_state):
            raise ValueError("under sequence parallelism a mixer takes state=None, cu_seqlens=None "
                             "and return_state=False (call set_sequence_parallel(None) to decode)")

    def heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """[B, T, H * dim] -> [B, T, H, dim]."""
        return x.unflatten(-1, (self.n_heads, dim))


class _SharedCopy(torch.autograd.Function):
    """One projection's input: a view of the autocast copy of x that all of a mixer's
    projections share (autograd keeps the copy once, where autocast would cast and keep x
    once per projection); the gradient goes back to x's dtype on its own, as autocast's own
    cast's does, so the projections' gradients are summed in x's dtype as before."""

    @staticmethod
    def forward(ctx, x, copy):
        ctx.dtype = x.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def projection_input(x: torch.Tensor):
    """A function giving x to each of a mixer's input projections: under autocast, while
    autograd records, each call returns its own view of one copy of x in autocast's dtype, so
    the projections keep one copy of x for their backward instead of one each (the values
    and gradients are autocast's own); otherwise x itself."""
    device_type = x.device.type
    if not (torch.is_autocast_enabled(device_type) and torch.is_grad_enabled()):
        return lambda: x
    dt = torch.get_autocast_dtype(device_type)
    if x.dtype == dt or x.dtype == torch.float64:
        return lambda: x
    copy = x.detach().to(dt)
    return lambda: _SharedCopy.apply(x, copy)


FUSED_ROW_ALIGN = 16  # fused_projections' output width: a multiple of this many elements


def plain_linear(module) -> bool:
    """Whether module is an nn.Linear (not a subclass) without forward hooks of its own, whose
    math the fused nodes may run from its weight and bias."""
    return type(module) is nn.Linear and not module._forward_pre_hooks and not module._forward_hooks


def fused_projections(xin, *linears) -> tuple[torch.Tensor, ...] | None:
    """Each of linears applied to x = xin(), as one F.linear with their weights (and biases,
    zero where a linear has none) concatenated along the output dim: one GEMM forward, one
    dgrad and one wgrad in place of one each, and x read once. An entry of linears may be a
    tuple of linears, whose outputs come side by side as one view (a short conv's input).
    Returns their outputs, views [..., out_features] of the one output (rows strided by its
    padded width, below), or None when any of linears is not plain_linear (a wrapped or
    hooked projection: the caller then calls each). The output's width is padded with zero
    columns to a multiple of FUSED_ROW_ALIGN, so each row of it starts 16-byte aligned for
    the kernels that read the views in place (the short conv's vector loads)."""
    groups = [g if isinstance(g, tuple) else (g,) for g in linears]
    flat = [m for g in groups for m in g]
    if not all(plain_linear(m) for m in flat):
        return None
    widths = [sum(m.out_features for m in g) for g in groups]
    pad = -sum(widths) % FUSED_ROW_ALIGN
    first = flat[0].weight
    weight = torch.cat([m.weight for m in flat] + [first.new_zeros(pad, first.shape[1])])
    bias = None
    if any(m.bias is not None for m in flat):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                          for m in flat] + [first.new_zeros(pad)])
    y = F.linear(xin(), weight, bias)                      # [..., sum(widths) + pad]
    return y.split(widths + [pad], dim=-1)[:len(groups)]


def gate_dtype(x: torch.Tensor) -> torch.dtype:
    """Gates and decays are computed in float32 (float64 for float64 activations)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def make_dims(head_dim: int, expand: float, name: str) -> int:
    """Per-head width int(head_dim * expand), which must be at least 1."""
    d = int(head_dim * expand)
    if d < 1:
        raise ValueError(f"{name}={expand} gives a per-head width of {d} (head_dim={head_dim}); "
                         "it must be >= 1")
    return d
