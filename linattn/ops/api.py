"""The public ops: validation at the boundary, then dispatch to a backend.

Every op takes q, k, v as [B, T, H, K] / [B, T, H, K] / [B, T, H, V] (batch, time, heads,
head dim) in one of float32, bfloat16, float16 or float64, and returns ``(o, final_state)``:
o is [B, T, H, V] in v's dtype; final_state is None unless ``output_final_state=True``, and
is float32 ([B, H, K, V], or [N, H, K, V] with cu_seqlens), float64 for float64 inputs.

Backends (all compute the same function, see docs/design.md section 2):
    "auto"       Triton on CUDA tensors, chunked PyTorch elsewhere
    "triton"     Triton kernels (on CPU tensors only under TRITON_INTERPRET=1)
    "torch"      chunkwise-parallel PyTorch (linattn.ops.torch_chunked)
    "reference"  the naive step-by-step loop (linattn.ops.reference): the oracle, slow

Short calls (T <= STEP_KERNEL_MAX_T) with no gradient to compute run on the fused recurrent
step kernel when the backend is Triton, as decoding does (linattn.ops.decode).

Shape, dtype and device checks always run. Checks that need the values (log-decays <= 0,
cu_seqlens order) run on CPU tensors, and on GPU tensors only when LINATTN_CHECK=1, so the
hot path has no host sync; they are skipped while torch.compile traces (the values are not
known then; the eager call of the same code checks them).

torch.compile: every op is one torch custom op in the compiled graph (linattn.ops.custom_ops),
so `torch.compile(model, fullgraph=True)` traces a model through them, its backward included,
with cu_seqlens, states and absent gates. The validation above runs at trace time, before the
op.
"""
from __future__ import annotations

import os

import torch

from . import custom_ops, decode, reference, torch_chunked
from .validate import (BACKENDS, FLOAT_DTYPES, INPUT_GATES, MAX_HEAD_DIM,  # noqa: F401
                       _check_cu_seqlens, _check_devices, _check_float, _check_log_decay,
                       _check_qkv, _check_scale, _check_state, _check_step_gate,
                       _triton_available, _value_checks_enabled)

# Calls of at most this many tokens with no gradient to compute take the fused recurrent step
# kernel (linattn.ops.decode) on the Triton backend: one launch that reads the state once.
STEP_KERNEL_MAX_T = 16
# What the Triton backward starts from: "states" keeps what the forward computed per chunk (the
# chunk states; for the delta rule also T and U'), "recompute" recomputes it in the backward.
SAVE_FOR_BACKWARD = ("states", "recompute")


def _check_save_for_backward(save_for_backward) -> None:
    if save_for_backward not in SAVE_FOR_BACKWARD:
        raise ValueError(f"save_for_backward must be one of {SAVE_FOR_BACKWARD}, "
                         f"got {save_for_backward!r}")


def _save_kw(impl, save_for_backward) -> dict:
    """The keyword the Triton entry points take (the PyTorch paths differentiate through
    autograd and keep what autograd keeps)."""
    return ({"save_for_backward": save_for_backward}
            if getattr(impl, "__name__", "") == "linattn.ops.triton" else {})


def _backend_module(backend: str, q: torch.Tensor):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return reference
    if backend == "torch":
        return torch_chunked
    if backend == "auto":
        if q.is_cuda and _triton_available():
            from . import triton as triton_ops
            return triton_ops
        return torch_chunked
    # backend == "triton"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         f"triton is imported, to run the kernels on the CPU); q is on {q.device}")
    if not _triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not importable")
    from . import triton as triton_ops
    return triton_ops


def _takes_step_kernel(impl, q, cu_seqlens, *tensors) -> bool:
    """Short, gradient-free calls on the Triton backend: the decode step kernel serves them."""
    if getattr(impl, "__name__", "") != "linattn.ops.triton" or cu_seqlens is not None:
        return False
    if q.shape[1] > STEP_KERNEL_MAX_T:
        return False
    if not torch.is_grad_enabled():
        return True
    flat = [t for x in tensors for t in (x if isinstance(x, (tuple, list)) else (x,))]
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)


def _plain_under_compile(impl, q) -> bool:
    """While torch.compile traces, the PyTorch backends (and float64 inputs, which the Triton
    entry points hand to the chunked PyTorch path) run as the plain_* custom ops; the Triton
    entry points call their own custom ops (gated_api.run_chunks, delta_api.run_delta)."""
    if not torch.compiler.is_compiling():
        return False
    return impl in (reference, torch_chunked) or q.dtype == torch.float64


def _plain_name(impl) -> str:
    return "reference" if impl is reference else "torch"


# ----------------------------------------------------------------------------- public ops

def linear_attention(q, k, v, g=None, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, causal=True, backend="auto",
                     save_for_backward="states"):
    """Gated linear attention: S_t = exp(g_t) * S_{t-1} + k_t v_t^T,  o_t = S_t^T (scale q_t).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]. One dtype: float32, bfloat16, float16, float64.
        g: log-decay (<= 0), float32 or q's dtype; its shape picks the variant:
            None          plain linear attention
            [H]           constant per-head decay (Lightning Attention, RetNet)
            [B, T, H]     data-dependent scalar decay (simple GLA, Mamba-2 SSD, mLSTMsig)
            [B, T, H, K]  data-dependent per-key decay (GLA, HGRN-2): row k of S decays by
                          exp(g[..., k]).
        scale: multiplies q (default K ** -0.5); never enters the state.
        initial_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens), S_0; float32 advised.
        output_final_state: also return the state after the last token.
        cu_seqlens: int32/int64 [N+1] offsets of N sequences packed along T (B must be 1).
        causal: False gives bidirectional attention o_t = scale q_t^T sum_s k_s v_s^T
            (over each packed sequence); g, initial_state and a final state are then errors.
        backend: "auto" | "triton" | "torch" | "reference".
        save_for_backward: the Triton backward's trade of memory for time. "states" (default)
            keeps the forward's chunk states (K*V per head every 64-128 tokens, in the inputs'
            dtype for 16-bit inputs) from forward to backward; "recompute" frees them after the
            forward and recomputes them in the backward (one more state scan, ~10% of
            fwd+bwd time). A single op's peak memory is the same either way; in a deep model
            "recompute" lowers the peak by what every layer would hold until its backward.
            The PyTorch backends ignore it.

    Returns:
        o: [B, T, H, V] in v's dtype; final_state: [B, H, K, V] float32 (float64 for float64
        inputs) or None.

    Under torch.compile the op is one custom op (linattn.ops.custom_ops), so
    `torch.compile(model, fullgraph=True)` traces through it; the checks that read values
    (g <= 0, cu_seqlens' order) are skipped while tracing, the shape checks still run.
    """
    _check_qkv(q, k, v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _check_scale(scale, K)
    _check_save_for_backward(save_for_backward)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not causal and (g is not None or initial_state is not None or output_final_state):
        raise ValueError("causal=False (bidirectional) has no recurrence: g, initial_state and "
                         "output_final_state=True are not allowed")
    _check_log_decay(g, q)
    N = _check_cu_seqlens(cu_seqlens, q)
    if initial_state is not None:
        _check_state("initial_state", initial_state, q, (N, H, K, V), "[N, H, K, V]" if cu_seqlens is not None else "[B, H, K, V]")
    impl = _backend_module(backend, q)
    if causal and _takes_step_kernel(impl, q, cu_seqlens, q, k, v, g, initial_state):
        o, st = decode.linear_attention_decode(q, k, v, g, state=initial_state, scale=scale,
                                               backend="triton")
        return o, (st if output_final_state else None)
    if _plain_under_compile(impl, q):
        return custom_ops.plain_linear_attention(
            q, k, v, g, scale=scale, initial_state=initial_state,
            output_final_state=bool(output_final_state), cu_seqlens=cu_seqlens, causal=causal,
            backend=_plain_name(impl))
    return impl.linear_attention(q, k, v, g, scale=scale, initial_state=initial_state,
                                 output_final_state=bool(output_final_state),
                                 cu_seqlens=cu_seqlens, causal=causal,
                                 **_save_kw(impl, save_for_backward))


def check_delta_rule(q, k, v, beta, g, scale, initial_state, cu_seqlens, save_for_backward):
    """delta_rule's argument checks; returns the scale (K ** -0.5 for None)."""
    _check_qkv(q, k, v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _check_scale(scale, K)
    _check_save_for_backward(save_for_backward)
    _check_step_gate("beta", beta, q)
    _check_log_decay(g, q, allowed=("none", "scalar"))
    N = _check_cu_seqlens(cu_seqlens, q)
    if initial_state is not None:
        _check_state("initial_state", initial_state, q, (N, H, K, V), "[N, H, K, V]" if cu_seqlens is not None else "[B, H, K, V]")
    return scale


def delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None,
               output_final_state=False, cu_seqlens=None, backend="auto",
               save_for_backward="states"):
    """DeltaNet (g None) and Gated DeltaNet (g [B, T, H]):

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t)

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; one dtype (float32, bfloat16, float16, float64).
            Keys are used as given: callers L2-normalise them (keep beta ||k||^2 <= 2).
        beta: [B, T, H] in (0, 1), float32 or q's dtype.
        g: None or a scalar log-decay [B, T, H] (<= 0), float32 or q's dtype.
        scale, initial_state, output_final_state, cu_seqlens, backend: as linear_attention.
        save_for_backward: as linear_attention; "states" also keeps each chunk's T = (I + A)^-1
            and U' (about 1.5x the size of q, k, v in bf16 at D 128 in all), "recompute"
            reruns the forward's two first kernels in the backward (~20% of fwd+bwd time).

    Returns:
        o: [B, T, H, V] in v's dtype; final_state: [B, H, K, V] float32 or None.

    torch.compile: as linear_attention (a custom op; value checks skipped while tracing).
    """
    scale = check_delta_rule(q, k, v, beta, g, scale, initial_state, cu_seqlens,
                             save_for_backward)
    impl = _backend_module(backend, q)
    if _takes_step_kernel(impl, q, cu_seqlens, q, k, v, beta, g, initial_state):
        o, st = decode.delta_rule_decode(q, k, v, beta, g, state=initial_state, scale=scale,
                                         backend="triton")
        return o, (st if output_final_state else None)
    if _plain_under_compile(impl, q):
        return custom_ops.plain_delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=initial_state,
            output_final_state=bool(output_final_state), cu_seqlens=cu_seqlens,
            backend=_plain_name(impl))
    return impl.delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                           output_final_state=bool(output_final_state), cu_seqlens=cu_seqlens,
                           **_save_kw(impl, save_for_backward))


def mlstm(q, k, v, i, f, *, input_gate="exp", scale=None, initial_state=None,
          output_final_state=False, cu_seqlens=None, backend="auto", save_for_backward="states"):
    """xLSTM's mLSTM cell; i, f are [B, T, H] pre-activations, f enters as logsigmoid(f).

    input_gate="exp" (mLSTMexp, stabilised and normalised):
        m_t = max(logsigmoid(f_t) + m_{t-1}, i_t),  m_0 = 0
        C_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T
        n_t = (same decay) n_{t-1} + exp(i_t - m_t) k_t
        o_t = C_t^T q^_t / (max(|n_t^T q^_t|, exp(-m_t)) + 1e-6),  q^ = scale q
      state: the tuple (C [B, H, K, V], n [B, H, K], m [B, H]) ([N, ...] with cu_seqlens).
    input_gate="sigmoid" (mLSTMsig): C_t = sigmoid(f_t) C_{t-1} + sigmoid(i_t) k_t v_t^T,
      o_t = C_t^T q^_t with no normaliser; state: C [B, H, K, V].

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; i, f: [B, T, H] (float32 or q's dtype).
        scale, initial_state, output_final_state, cu_seqlens, backend, save_for_backward: as
            linear_attention.

    Returns:
        o: [B, T, H, V] in v's dtype; final_state as above (float32) or None.

    torch.compile: as linear_attention (a custom op; value checks skipped while tracing).
    """
    _check_qkv(q, k, v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _check_scale(scale, K)
    if input_gate not in INPUT_GATES:
        raise ValueError(f"input_gate must be one of {INPUT_GATES}, got {input_gate!r}")
    _check_save_for_backward(save_for_backward)
    _check_step_gate("i", i, q)
    _check_step_gate("f", f, q)
    N = _check_cu_seqlens(cu_seqlens, q)
    lead = "[N, " if cu_seqlens is not None else "[B, "
    if initial_state is not None:
        if input_gate == "exp":
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3:
                raise TypeError("initial_state for input_gate='exp' must be the tuple (C, n, m) "
                                f"of shapes {lead}H, K, V], {lead}H, K], {lead}H]")
            C0, n0, m0 = initial_state
            _check_state("initial_state[0] (C)", C0, q, (N, H, K, V), lead + "H, K, V]")
            _check_state("initial_state[1] (n)", n0, q, (N, H, K), lead + "H, K]")
            _check_state("initial_state[2] (m)", m0, q, (N, H), lead + "H]")
            initial_state = (C0, n0, m0)
        else:
            _check_state("initial_state", initial_state, q, (N, H, K, V), lead + "H, K, V]")
    impl = _backend_module(backend, q)
    if _takes_step_kernel(impl, q, cu_seqlens, q, k, v, i, f, initial_state):
        o, st = decode.mlstm_decode(q, k, v, i, f, input_gate=input_gate, state=initial_state,
                                    scale=scale, backend="triton")
        return o, (st if output_final_state else None)
    if _plain_under_compile(impl, q):
        return custom_ops.plain_mlstm(
            q, k, v, i, f, input_gate=input_gate, scale=scale, initial_state=initial_state,
            output_final_state=bool(output_final_state), cu_seqlens=cu_seqlens,
            backend=_plain_name(impl))
    return impl.mlstm(q, k, v, i, f, input_gate=input_gate, scale=scale,
                      initial_state=initial_state, output_final_state=bool(output_final_state),
                      cu_seqlens=cu_seqlens, **_save_kw(impl, save_for_backward))
