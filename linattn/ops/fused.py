"""The layers' pieces around the mixing ops, each one function with a fused Triton path and a
plain PyTorch path that computes the same function:

    short_conv      causal depthwise conv (+ SiLU), cache of the last W-1 inputs, cu_seqlens,
                    optionally L2-normalising groups of its first channels (q and k's heads)
    rms_norm        RMSNorm over the last dim
    gated_rms_norm  per-head rmsnorm(o) * weight * act(gate), flattened over heads
    gated_rms_norm_linear  gated_rms_norm then a linear projection, one autograd node that
                    keeps o and gate, not the norm's output (recomputed in the backward)
    gated_rms_norm_linear_projected  the same with the gate a projection of x, computed in
                    the node, which keeps x instead of the gate (recomputed in the backward)
    l2_normalize    x / max(||x||, eps) over the last dim (F.normalize)
    swiglu          silu(gate) * up from SwiGLU's fused [..., 2F] projection

backend: "auto" takes Triton for CUDA tensors of float32, bfloat16 or float16 when triton
imports, and PyTorch otherwise (CPU, float64): a pure function of the inputs' device and
dtype; for rms_norm and l2_normalize also of whether autograd records the call: their Triton
backward is slower than PyTorch's (benchmarks/time_fused.py on the H200, 16384 tokens at
d_model 768, fwd+bwd ms: rms_norm 0.69 against 0.52, l2_normalize 0.72 against 0.43; their
forward is 3.4x / 1.5x faster), so "auto" takes Triton for them only without a gradient. "torch" always takes PyTorch; "triton" always takes Triton (CPU tensors only under
TRITON_INTERPRET=1, as the tests run it). The Triton paths are torch custom ops
(linattn.ops.triton.short_conv, .norms, .swiglu), so torch.compile(fullgraph=True) traces
through both paths. gated_rms_norm_linear is one custom op on both paths
(linattn::gated_norm_linear), gated_rms_norm_linear_projected another
(linattn::projected_gate_norm_linear): their backwards recompute what their forwards did not
keep.

Numerics: the PyTorch paths round where PyTorch's modules do (the conv's taps in x's dtype,
the norm in float32 rounded to x's dtype before the gate); the Triton paths compute in float32
and round once, which is at least as accurate.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F

FUSED_BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CONV_ACTIVATIONS = ("silu", None)
GATE_ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}
_GATE_CODES = {None: 0, "silu": 1, "sigmoid": 2}
_GATE_NAMES = {code: name for name, code in _GATE_CODES.items()}
_HAS_TRITON = importlib.util.find_spec("triton") is not None
CONV_NORM_EPS = 1e-6    # the conv's fused L2 norm: s / max(||s||, eps), as the layers' l2norm


def takes_triton(x: torch.Tensor, backend: str = "auto") -> bool:
    """Whether `backend` runs the Triton path for an input like x (see the module docstring)."""
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"backend must be one of {FUSED_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and x.dtype in TRITON_DTYPES and _HAS_TRITON
    if not _HAS_TRITON:
        raise ValueError("backend='triton' needs the triton package, which is not importable")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         f"triton is imported); the input is on {x.device}")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16, got {x.dtype}")
    return True


def _check_tensor(name, x, dims: int | None, shape: str):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor {shape}, got "
                        + (str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__))
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {shape}, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- short conv

def short_conv(x: torch.Tensor, weight: torch.Tensor, cache: torch.Tensor | None = None,
               cu_seqlens: torch.Tensor | None = None, activation: str | None = "silu",
               return_cache: bool = False, backend: str = "auto", norm_channels: int = 0,
               norm_group: int = 0):
    """Causal depthwise conv over time: y_t = act(sum_j weight[:, j] * x_{t-(W-1-j)}), where
    inputs before the start of t's sequence come from the cache (or are 0); with norm_channels
    > 0, each group of norm_group channels among the first norm_channels (a multiple of it) is
    then L2-normalised, y / max(||y||, CONV_NORM_EPS), the other channels left as they are.

    x [B, T, C] float; weight [C, W] (tap W-1 is the current token); cache [B, W-1, C]
    ([N, W-1, C] with cu_seqlens) or None; cu_seqlens int32/int64 [N+1] offsets of N
    sequences packed along T (B == 1) or None; activation "silu" or None.
    Returns (y [B, T, C] in x's dtype, new cache [B or N, W-1, C] in x's dtype: each
    sequence's last W-1 inputs, the old cache's tail for a sequence shorter than W-1;
    None unless return_cache). Gradients flow to x, weight and cache. The Triton path fuses
    the norm into the conv for norm_group a power of two in [16, 256], and otherwise applies
    l2_normalize to the conv's output.
    """
    check_conv_inputs(x, weight, cache, cu_seqlens, activation, norm_channels, norm_group)
    W = weight.shape[1]
    if takes_triton(x, backend):
        from .triton.short_conv import NORM_GROUPS, short_conv_fwd
        cache_in = cache.to(x.dtype) if cache is not None else None
        fuse = norm_channels if norm_group in NORM_GROUPS else 0
        y = short_conv_fwd(x, weight, cache_in, cu_seqlens, activation == "silu", fuse,
                           norm_group if fuse else 0)
        if norm_channels and not fuse:
            # a group size the kernel does not tile: the norm after the conv
            y = _normalize_groups(y, norm_channels, norm_group, backend)
    else:
        y = _conv_torch(x, weight, cache, cu_seqlens)
        if activation == "silu":
            y = F.silu(y)
        if norm_channels:
            y = _normalize_groups(y, norm_channels, norm_group, "torch")
    new_cache = _conv_new_cache(x, cache, cu_seqlens, W) if return_cache else None
    return y, new_cache


def check_conv_inputs(x, weight, cache, cu_seqlens, activation, norm_channels, norm_group):
    """short_conv's argument checks (shapes, dtypes, cu_seqlens' form, the norm's groups)."""
    _check_tensor("x", x, 3, "[B, T, C]")
    _check_tensor("weight", weight, 2, "[C, W]")
    B, T, C = x.shape
    W = weight.shape[1]
    if weight.shape[0] != C or W < 1:
        raise ValueError(f"weight must be [C={C}, W >= 1], got {tuple(weight.shape)}")
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens must be an int32/int64 [N+1] tensor of offsets, got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B={B}")
    n_rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if cache is not None:
        _check_tensor("cache", cache, 3, f"[{'N' if cu_seqlens is not None else 'B'}, W-1, C]")
        if tuple(cache.shape) != (n_rows, W - 1, C):
            raise ValueError(f"conv cache must be [{'N' if cu_seqlens is not None else 'B'}, "
                             f"W-1, C] = {(n_rows, W - 1, C)}, got {tuple(cache.shape)}")
    check_conv_norm(norm_channels, norm_group, C)


def check_conv_norm(norm_channels, norm_group, C):
    """Raises unless norm_channels is 0 or a multiple of norm_group >= 1 within C channels."""
    if not isinstance(norm_channels, int) or not isinstance(norm_group, int):
        raise TypeError("norm_channels and norm_group must be ints, got "
                        f"{type(norm_channels).__name__} and {type(norm_group).__name__}")
    if norm_channels < 0 or (norm_channels and (norm_group < 1 or norm_channels % norm_group
                                                 or norm_channels > C)):
        raise ValueError("norm_channels must be 0 or a multiple of norm_group >= 1 and at most "
                         f"C={C}, got norm_channels={norm_channels}, norm_group={norm_group}")


def _normalize_groups(y, norm_channels, norm_group, backend):
    """y with each group of norm_group channels among its first norm_channels L2-normalised:
    l2_normalize on the Triton path, float32 math rounded to y's dtype (float64 for float64)
    on the PyTorch one."""
    head = y[..., :norm_channels].unflatten(-1, (norm_channels // norm_group, norm_group))
    if takes_triton(y, backend):
        head = l2_normalize(head, CONV_NORM_EPS, backend)
    else:
        dt = torch.float64 if y.dtype == torch.float64 else torch.float32
        head = F.normalize(head.to(dt), dim=-1, eps=CONV_NORM_EPS).to(y.dtype)
    return torch.cat([head.flatten(-2), y[..., norm_channels:]], dim=-1)


def _conv_torch(x, weight, cache, cu_seqlens):
    """The conv's pre-activation in x's dtype, tap by tap over one padded buffer."""
    B, T, C = x.shape
    W = weight.shape[1]
    w = weight.to(x.dtype)
    if cu_seqlens is None:
        if cache is None:
            cache = x.new_zeros(B, W - 1, C)
        xx = torch.cat([cache.to(x.dtype), x], dim=1)                  # [B, W-1+T, C]
        return sum(xx[:, j: j + T] * w[:, j] for j in range(W))        # tap j: x_{t-(W-1-j)}
    buf, idx = _varlen_rows(x, cache, cu_seqlens, W)
    return torch.einsum("wtc,cw->tc", buf[idx], w)[None]               # [1, T, C]


def _varlen_rows(x, cache, cu_seqlens, W):
    """(buf [T + N(W-1) + 1, C]: x's rows, the cache's rows, a zero row; idx [W, T]: the row of
    buf that tap j of token t reads)."""
    T, C = x.shape[1], x.shape[2]
    dev = x.device
    cu = cu_seqlens.to(device=dev, dtype=torch.long)
    N = cu.numel() - 1
    t = torch.arange(T, device=dev)
    seq = torch.searchsorted(cu[1:].contiguous(), t, right=True)         # [T] sequence of each token
    pos = t - cu[:-1][seq]                                               # [T] position in it
    shifts = torch.arange(W - 1, -1, -1, device=dev)                     # tap j: shift W-1-j
    p = pos[None] - shifts[:, None]                                      # [W, T]
    return _buffer(x, cache, N, W), _buffer_index(p, t[None] - shifts[:, None], seq[None],
                                                  cache is not None, T, N, W)


def _buffer(x, cache, N, W):
    parts = [x[0]]
    if cache is not None:
        parts.append(cache.to(x.dtype).reshape(N * (W - 1), x.shape[2]))
    parts.append(x.new_zeros(1, x.shape[2]))
    return torch.cat(parts, 0)


def _buffer_index(p, abs_row, seq, has_cache, T, N, W):
    """Row of _buffer holding position p of sequence seq (p < 0: the cache, or the zero row)."""
    if has_cache:
        from_cache = T + seq * (W - 1) + (W - 1 + p).clamp(min=0)
    else:
        from_cache = torch.full_like(p, T)                               # the zero row
    return torch.where(p >= 0, abs_row, from_cache)


def _conv_new_cache(x, cache, cu_seqlens, W):
    """Each sequence's last W-1 inputs [B or N, W-1, C] in x's dtype (differentiable)."""
    B, T, C = x.shape
    if cu_seqlens is None:
        prev = cache.to(x.dtype) if cache is not None else x.new_zeros(B, W - 1, C)
        return torch.cat([prev, x], dim=1)[:, T:]
    dev = x.device
    cu = cu_seqlens.to(device=dev, dtype=torch.long)
    N = cu.numel() - 1
    r = torch.arange(W - 1, device=dev)
    lengths = cu[1:] - cu[:-1]
    p_last = lengths[:, None] - (W - 1) + r[None]                        # [N, W-1]
    n_ids = torch.arange(N, device=dev)[:, None].expand_as(p_last)
    idx = _buffer_index(p_last, cu[:-1, None] + p_last, n_ids, cache is not None, T, N, W)
    return _buffer(x, cache, N, W)[idx]                                  # [N, W-1, C]


# ----------------------------------------------------------------------------- norms

def _forward_only_triton(backend: str, *tensors) -> str:
    """backend for a piece whose Triton backward loses to PyTorch's (see the module
    docstring): "auto" becomes "torch" when autograd records the call."""
    if backend == "auto" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors):
        return "torch"
    return backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             backend: str = "auto") -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight over the last dim. x [..., D] float; weight [D]
    or None. Returns x's shape and dtype (float32 math; float64 for float64 x)."""
    _check_tensor("x", x, None, "[..., D]")
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must be [D={x.shape[-1]}], got {tuple(weight.shape)}")
    if takes_triton(x, _forward_only_triton(backend, x, weight)):
        from .triton.norms import row_norm_fwd
        D = x.shape[-1]
        return row_norm_fwd(x.reshape(-1, 1, D), weight, None, float(eps), False, 0).view(x.shape)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(dt)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dt)
    return y.to(x.dtype)


def gated_rms_norm(o: torch.Tensor, weight: torch.Tensor | None, gate: torch.Tensor | None,
                   activation: str | None, eps: float, backend: str = "auto") -> torch.Tensor:
    """Per-head output norm then gate: rmsnorm(o) * weight * act(gate), flattened over heads.

    o [B, T, H, V] float; weight [V] (shared by the heads) or None; gate [B, T, H * V] or None
    (needed when activation is "silu" or "sigmoid", ignored when activation is None).
    Returns [B, T, H * V] in o's dtype.
    """
    _check_gated_norm(o, weight, gate, activation)
    B, T, H, V = o.shape
    if takes_triton(o, backend):
        from .triton.norms import row_norm_fwd
        g = gate.view(B * T, H, V) if activation is not None else None
        y = row_norm_fwd(o.reshape(B * T, H, V), weight, g, float(eps), False,
                         _GATE_CODES[activation])
        return y.view(B, T, H * V)
    y = rms_norm(o, weight, eps, backend="torch").flatten(-2)
    return y if activation is None else y * GATE_ACTIVATIONS[activation](gate)


def _check_gated_norm(o, weight, gate, activation):
    _check_tensor("o", o, 4, "[B, T, H, V]")
    B, T, H, V = o.shape
    if activation is not None and activation not in GATE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(GATE_ACTIVATIONS)} or None, got {activation!r}")
    if activation is not None:
        if gate is None:
            raise ValueError("this output norm is gated: pass the gate projection [B, T, H * V]")
        _check_tensor("gate", gate, 3, "[B, T, H * V]")
        if tuple(gate.shape) != (B, T, H * V):
            raise ValueError(f"gate must be [B, T, H * V] = {(B, T, H * V)}, got {tuple(gate.shape)}")
    if weight is not None and tuple(weight.shape) != (V,):
        raise ValueError(f"weight must be [V={V}], got {tuple(weight.shape)}")


def gated_rms_norm_linear(o: torch.Tensor, weight: torch.Tensor | None,
                          gate: torch.Tensor | None, activation: str | None, eps: float,
                          proj_weight: torch.Tensor, proj_bias: torch.Tensor | None = None,
                          backend: str = "auto") -> torch.Tensor:
    """F.linear(gated_rms_norm(o, weight, gate, activation, eps), proj_weight, proj_bias):
    the output norm and the out-projection as one autograd node, which keeps for the
    backward what the norm keeps (o, gate) and the projection's weight, not the norm's output
    [B, T, H * V]: the backward recomputes it (one norm forward) for proj_weight's gradient.

    o, weight, gate, activation, eps as gated_rms_norm; proj_weight [N, H * V]; proj_bias [N]
    or None. Under autocast the projection runs in autocast's dtype, as F.linear would; else
    proj_weight must have o's dtype. Returns [B, T, N].
    """
    _check_gated_norm(o, weight, gate, activation)
    dt = _check_projection(o, proj_weight, proj_bias)
    pw = proj_weight.to(dt)
    pb = proj_bias.to(dt) if proj_bias is not None else None
    gate = gate if activation is not None else None
    triton = takes_triton(o, backend)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (o, weight, gate, pw, pb))):
        y = gated_rms_norm(o, weight, gate, activation, eps, "triton" if triton else "torch")
        return F.linear(y.to(dt), pw, pb)
    return _gated_norm_linear_op(o, weight, gate, pw, pb, float(eps), _GATE_CODES[activation],
                                 triton)


def _check_projection(o, proj_weight, proj_bias) -> torch.dtype:
    """Checks the out-projection's shapes against o [B, T, H, V]; returns the dtype it runs
    in: autocast's under autocast, else o's (which proj_weight must have)."""
    H, V = o.shape[2], o.shape[3]
    _check_tensor("proj_weight", proj_weight, 2, f"[N, H * V = {H * V}]")
    if proj_weight.shape[1] != H * V:
        raise ValueError(f"proj_weight must be [N, H * V = {H * V}], got {tuple(proj_weight.shape)}")
    if proj_bias is not None and tuple(proj_bias.shape) != (proj_weight.shape[0],):
        raise ValueError(f"proj_bias must be [N={proj_weight.shape[0]}], got {tuple(proj_bias.shape)}")
    device_type = o.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if proj_weight.dtype != o.dtype:
        raise TypeError(f"proj_weight ({proj_weight.dtype}) must have o's dtype ({o.dtype}) "
                        "outside autocast")
    return o.dtype


def _norm_rows(o, weight, gate, eps, act, triton):
    """The gated norm's output [B, T, H * V] in o's dtype (act a _GATE_CODES value)."""
    B, T, H, V = o.shape
    if triton:
        from .triton.norms import _launch_fwd
        g = gate.reshape(B * T, H, V) if gate is not None else None
        return _launch_fwd(o.reshape(B * T, H, V), weight, g, eps, False, act).view(B, T, H * V)
    activation = _GATE_NAMES[act]
    return gated_rms_norm(o, weight, gate, activation, eps, backend="torch")


@torch.library.custom_op("linattn::gated_norm_linear", mutates_args=())
def _gated_norm_linear_op(o: torch.Tensor, weight: Optional[torch.Tensor],
                          gate: Optional[torch.Tensor], proj_weight: torch.Tensor,
                          proj_bias: Optional[torch.Tensor], eps: float, act: int,
                          triton: bool) -> torch.Tensor:
    """gated_rms_norm_linear's forward: [B, T, N] in proj_weight's dtype."""
    return _norm_linear(o, weight, gate, proj_weight, proj_bias, eps, act, triton)


def _norm_linear(o, weight, gate, proj_weight, proj_bias, eps, act, triton):
    """F.linear(the gated norm's output, proj_weight, proj_bias) outside autocast."""
    with torch.autocast(o.device.type, enabled=False):
        y = _norm_rows(o, weight, gate, eps, act, triton)
        return F.linear(y.to(proj_weight.dtype), proj_weight, proj_bias)


@_gated_norm_linear_op.register_fake
def _(o, weight, gate, proj_weight, proj_bias, eps, act, triton):
    return o.new_empty(*o.shape[:2], proj_weight.shape[0], dtype=proj_weight.dtype)


@torch.library.custom_op("linattn::gated_norm_linear_backward", mutates_args=())
def _gated_norm_linear_backward_op(dy: torch.Tensor, o: torch.Tensor,
                                   weight: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                                   proj_weight: torch.Tensor, eps: float, act: int, triton: bool,
                                   has_bias: bool) -> list[torch.Tensor]:
    """[do, dweight, dgate, dproj_weight, dproj_bias], each like its input; an empty tensor
    stands for an absent weight, gate or bias."""
    return _norm_linear_grads(dy, o, weight, gate, proj_weight, eps, act, triton, has_bias)


def _norm_linear_grads(dy, o, weight, gate, proj_weight, eps, act, triton, has_bias):
    """The gated norm then projection's gradients [do, dweight, dgate, dproj_weight,
    dproj_bias] from the output's dy, the norm's output recomputed (empty tensors for absent
    inputs)."""
    B, T, H, V = o.shape
    dy2 = dy.reshape(B * T, -1).to(proj_weight.dtype)
    with torch.autocast(o.device.type, enabled=False):
        if triton:
            from .triton.norms import _launch_bwd
            n = _norm_rows(o, weight, gate, eps, act, True)
            dn = (dy2 @ proj_weight).to(o.dtype).view(B * T, H, V)
            g = gate.reshape(B * T, H, V) if gate is not None else None
            do, dw, dg = _launch_bwd(dn, o.reshape(B * T, H, V), weight, g, eps, False, act)
            do, dg = do.view(o.shape), dg.view(gate.shape) if gate is not None else dg
        else:
            present = [t for t in (o, weight, gate) if t is not None]

            def norm(*xs):
                it = iter(xs)
                return _norm_rows(next(it), next(it) if weight is not None else None,
                                  next(it) if gate is not None else None, eps, act, False)

            n, vjp = torch.func.vjp(norm, *present)
            grads = iter(vjp((dy2 @ proj_weight).to(n.dtype).view(n.shape)))
            do = next(grads)
            dw = next(grads) if weight is not None else o.new_empty(0)
            dg = next(grads) if gate is not None else o.new_empty(0)
        dpw = dy2.t() @ n.reshape(B * T, H * V).to(proj_weight.dtype)
        dpb = dy2.sum(0) if has_bias else o.new_empty(0)
    return [do, dw, dg, dpw, dpb]


@_gated_norm_linear_backward_op.register_fake
def _(dy, o, weight, gate, proj_weight, eps, act, triton, has_bias):
    return [o.new_empty(o.shape),
            weight.new_empty(weight.shape) if weight is not None else o.new_empty(0),
            gate.new_empty(gate.shape) if gate is not None else o.new_empty(0),
            proj_weight.new_empty(proj_weight.shape),
            proj_weight.new_empty(proj_weight.shape[0]) if has_bias else o.new_empty(0)]


def _gated_norm_linear_setup(ctx, inputs, output):
    o, weight, gate, proj_weight, proj_bias, eps, act, triton = inputs
    ctx.save_for_backward(o, weight, gate, proj_weight)
    ctx.args = (eps, act, triton, proj_bias is not None)


def _gated_norm_linear_backward(ctx, dy):
    o, weight, gate, proj_weight = ctx.saved_tensors
    do, dw, dg, dpw, dpb = _gated_norm_linear_backward_op(dy, o, weight, gate, proj_weight,
                                                          *ctx.args)
    return (do, dw if weight is not None else None, dg if gate is not None else None, dpw,
            dpb if ctx.args[3] else None, None, None, None)


_gated_norm_linear_op.register_autograd(_gated_norm_linear_backward,
                                        setup_context=_gated_norm_linear_setup)


def gated_rms_norm_linear_projected(o: torch.Tensor, weight: torch.Tensor | None,
                                    x: torch.Tensor, gate_weight: torch.Tensor,
                                    gate_bias: torch.Tensor | None, activation: str, eps: float,
                                    proj_weight: torch.Tensor,
                                    proj_bias: torch.Tensor | None = None,
                                    backend: str = "auto") -> torch.Tensor:
    """gated_rms_norm_linear(o, weight, F.linear(x, gate_weight, gate_bias), activation, eps,
    proj_weight, proj_bias) as one autograd node that keeps x instead of the gate: the
    backward recomputes the gate (one GEMM) for the norm's backward and returns x's gradient
    (dgate @ gate_weight, which autograd adds to x's other uses'), gate_weight's and
    gate_bias's. Keeping x costs no memory where autograd keeps its storage anyway (a mixer's
    input projections' shared copy, linattn.layers.base.projection_input).

    o, weight, eps, proj_weight, proj_bias as gated_rms_norm_linear; activation "silu" or
    "sigmoid"; x [B, T, D]; gate_weight [H * V, D]; gate_bias [H * V] or None. Under
    autocast the gate's projection runs in autocast's dtype, as F.linear would; else
    gate_weight must have x's dtype. Returns [B, T, N].
    """
    _check_gated_norm(o, weight, None, None)      # o and the norm's weight; the gate is projected
    B, T, H, V = o.shape
    if activation not in GATE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(GATE_ACTIVATIONS)} (a projected "
                         f"gate), got {activation!r}")
    _check_tensor("x", x, 3, f"[B={B}, T={T}, D]")
    if tuple(x.shape[:2]) != (B, T):
        raise ValueError(f"x must be [B={B}, T={T}, D], got {tuple(x.shape)}")
    _check_tensor("gate_weight", gate_weight, 2, f"[H * V = {H * V}, D = {x.shape[2]}]")
    if tuple(gate_weight.shape) != (H * V, x.shape[2]):
        raise ValueError(f"gate_weight must be [H * V, D] = {(H * V, x.shape[2])}, got "
                         f"{tuple(gate_weight.shape)}")
    if gate_bias is not None and tuple(gate_bias.shape) != (H * V,):
        raise ValueError(f"gate_bias must be [H * V = {H * V}], got {tuple(gate_bias.shape)}")
    dt = _check_projection(o, proj_weight, proj_bias)
    if torch.is_autocast_enabled(o.device.type):
        x, gate_weight = x.to(dt), gate_weight.to(dt)
        gate_bias = gate_bias.to(dt) if gate_bias is not None else None
    elif gate_weight.dtype != x.dtype:
        raise TypeError(f"gate_weight ({gate_weight.dtype}) must have x's dtype ({x.dtype}) "
                        "outside autocast")
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            o, weight, x, gate_weight, gate_bias, proj_weight, proj_bias))):
        return gated_rms_norm_linear(o, weight, F.linear(x, gate_weight, gate_bias), activation,
                                     eps, proj_weight, proj_bias, backend=backend)
    pw = proj_weight.to(dt)
    pb = proj_bias.to(dt) if proj_bias is not None else None
    return _projected_gate_norm_linear_op(o, weight, x, gate_weight, gate_bias, pw, pb,
                                          float(eps), _GATE_CODES[activation],
                                          takes_triton(o, backend))


@torch.library.custom_op("linattn::projected_gate_norm_linear", mutates_args=())
def _projected_gate_norm_linear_op(o: torch.Tensor, weight: Optional[torch.Tensor],
                                   x: torch.Tensor, gate_weight: torch.Tensor,
                                   gate_bias: Optional[torch.Tensor], proj_weight: torch.Tensor,
                                   proj_bias: Optional[torch.Tensor], eps: float, act: int,
                                   triton: bool) -> torch.Tensor:
    """gated_rms_norm_linear_projected's forward: [B, T, N] in proj_weight's dtype."""
    with torch.autocast(o.device.type, enabled=False):
        gate = F.linear(x, gate_weight, gate_bias)
    return _norm_linear(o, weight, gate, proj_weight, proj_bias, eps, act, triton)


@_projected_gate_norm_linear_op.register_fake
def _(o, weight, x, gate_weight, gate_bias, proj_weight, proj_bias, eps, act, triton):
    return o.new_empty(*o.shape[:2], proj_weight.shape[0], dtype=proj_weight.dtype)


@torch.library.custom_op("linattn::projected_gate_norm_linear_backward", mutates_args=())
def _projected_gate_norm_linear_backward_op(
        dy: torch.Tensor, o: torch.Tensor, weight: Optional[torch.Tensor], x: torch.Tensor,
        gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor], proj_weight: torch.Tensor,
        eps: float, act: int, triton: bool, has_proj_bias: bool) -> list[torch.Tensor]:
    """[do, dweight, dx, dgate_weight, dgate_bias, dproj_weight, dproj_bias], each like its
    input; an empty tensor stands for an absent weight or bias. The gate is recomputed from
    x, and its gradient goes back through the projection as F.linear's backward does."""
    with torch.autocast(o.device.type, enabled=False):
        gate = F.linear(x, gate_weight, gate_bias)
    do, dw, dg, dpw, dpb = _norm_linear_grads(dy, o, weight, gate, proj_weight, eps, act,
                                              triton, has_proj_bias)
    with torch.autocast(o.device.type, enabled=False):
        dg2 = dg.reshape(-1, dg.shape[-1]).to(gate_weight.dtype)
        dx = (dg2 @ gate_weight).view(x.shape)
        dgw = dg2.t() @ x.reshape(-1, x.shape[-1])
        dgb = dg2.sum(0) if gate_bias is not None else o.new_empty(0)
    return [do, dw, dx, dgw, dgb, dpw, dpb]


@_projected_gate_norm_linear_backward_op.register_fake
def _(dy, o, weight, x, gate_weight, gate_bias, proj_weight, eps, act, triton, has_proj_bias):
    return [o.new_empty(o.shape),
            weight.new_empty(weight.shape) if weight is not None else o.new_empty(0),
            x.new_empty(x.shape), gate_weight.new_empty(gate_weight.shape),
            gate_bias.new_empty(gate_bias.shape) if gate_bias is not None else o.new_empty(0),
            proj_weight.new_empty(proj_weight.shape),
            proj_weight.new_empty(proj_weight.shape[0]) if has_proj_bias else o.new_empty(0)]


def _projected_gate_setup(ctx, inputs, output):
    o, weight, x, gate_weight, gate_bias, proj_weight, proj_bias, eps, act, triton = inputs
    ctx.save_for_backward(o, weight, x, gate_weight, gate_bias, proj_weight)
    ctx.args = (eps, act, triton, proj_bias is not None)


def _projected_gate_backward(ctx, dy):
    o, weight, x, gate_weight, gate_bias, proj_weight = ctx.saved_tensors
    do, dw, dx, dgw, dgb, dpw, dpb = _projected_gate_norm_linear_backward_op(
        dy, o, weight, x, gate_weight, gate_bias, proj_weight, *ctx.args)
    return (do, dw if weight is not None else None, dx, dgw,
            dgb if gate_bias is not None else None, dpw, dpb if ctx.args[3] else None,
            None, None, None)


_projected_gate_norm_linear_op.register_autograd(_projected_gate_backward,
                                                 setup_context=_projected_gate_setup)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """x / max(||x||, eps) over the last dim (torch.nn.functional.normalize). x [..., D] float;
    returns x's shape and dtype. With x [B, T, H, D] a strided view (a slice of a conv output)
    the Triton path reads it in place."""
    _check_tensor("x", x, None, "[..., D]")
    if takes_triton(x, _forward_only_triton(backend, x)):
        from .triton.norms import row_norm_fwd
        shape = x.shape
        x3 = x.flatten(0, -3) if x.dim() >= 3 else x.reshape(-1, 1, shape[-1])
        return row_norm_fwd(x3, None, None, float(eps), True, 0).view(shape)
    return F.normalize(x, dim=-1, eps=eps)


# ----------------------------------------------------------------------------- SwiGLU

def swiglu(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2F] = [gate | up]; returns [..., F] in its dtype."""
    _check_tensor("gate_up", gate_up, None, "[..., 2F]")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (2F), got {gate_up.shape[-1]}")
    if takes_triton(gate_up, backend):
        from .triton.swiglu import swiglu_fwd
        lead, F2 = gate_up.shape[:-1], gate_up.shape[-1]
        return swiglu_fwd(gate_up.reshape(-1, F2)).view(*lead, F2 // 2)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
