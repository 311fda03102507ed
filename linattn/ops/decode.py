"""Explicit decode functions: take a state, run a few tokens, return (or update) the new state.

These are the inference entry points for serving a model token by token (T == 1 typical,
any small T allowed). They compute the same recurrences as the ops in linattn.ops.api, with
the same shapes and gate kinds, but:
  * the state is an argument and the new one is always returned: ``(o, new_state)``;
  * ``inplace=True`` overwrites the given state tensor(s) with the new state (and returns
    them), so a serving loop needs no allocation per token;
  * there is no autograd: with grad mode on, an input that requires grad is a ValueError
    (train with linattn.linear_attention / delta_rule / mlstm instead).

Backends:
    "auto"       Triton on CUDA tensors, "torch" elsewhere
    "triton"     the fused recurrent step kernel (linattn.ops.triton.recurrent); CUDA, or
                 CPU tensors under TRITON_INTERPRET=1
    "torch"      the step loop of linattn.ops.reference, run on the inputs' device in float32
    "reference"  the same step loop (named for symmetry with the ops)

Under torch.compile each function is a custom op (linattn.ops.custom_ops; the in-place
variants declare the state as mutated), so a compiled decoding loop has no graph break.

States are float32 (float64 for float64 inputs): C [B, H, K, V], and for mLSTMexp the tuple
(C [B, H, K, V], n [B, H, K], m [B, H]). ``state=None`` starts from zeros.
"""
from __future__ import annotations

import os

import torch

from . import custom_ops, reference
from .validate import (BACKENDS, INPUT_GATES, _check_log_decay, _check_qkv, _check_scale,
                       _check_state, _check_step_gate, _triton_available)

__all__ = ["linear_attention_decode", "delta_rule_decode", "mlstm_decode"]


# ----------------------------------------------------------------------------- validation

def _check_no_grad(op: str, **tensors):
    """Decoding is inference only: refuse inputs that would need a backward."""
    if not torch.is_grad_enabled():
        return
    for name, x in tensors.items():
        for t in (x if isinstance(x, (tuple, list)) else (x,)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but decode functions have no backward: call the "
                    f"training op {op} (with initial_state / output_final_state) instead, or "
                    "decode under torch.no_grad() / torch.inference_mode()")


def _check_decode_state(state, q, v, inplace, mlstm_exp: bool = False):
    """Validates `state` (and `inplace`) for q [B, T, H, K], v [B, T, H, V]; returns the
    state as a tuple of tensors ((), (C,) or (C, n, m))."""
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if state is None:
        if inplace:
            raise ValueError("inplace=True updates the given state, but state is None: pass a "
                             "float32 state to update (zeros to start a sequence)")
        return ()
    if mlstm_exp:
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise TypeError("state for input_gate='exp' must be the tuple (C, n, m) of shapes "
                            f"[B, H, K, V] = {(B, H, K, V)}, [B, H, K] = {(B, H, K)}, "
                            f"[B, H] = {(B, H)}, got {type(state).__name__}")
        parts = (("state[0] (C)", (B, H, K, V), "[B, H, K, V]"),
                 ("state[1] (n)", (B, H, K), "[B, H, K]"),
                 ("state[2] (m)", (B, H), "[B, H]"))
        tensors = tuple(state)
    else:
        parts = (("state", (B, H, K, V), "[B, H, K, V]"),)
        tensors = (state,)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    for (name, shape, what), s in zip(parts, tensors):
        _check_state(name, s, q, shape, what)
        if inplace and s.dtype != acc:
            raise TypeError(f"inplace=True needs {name} in {acc} (the compute dtype for "
                            f"{q.dtype} inputs), got {s.dtype}")
        if inplace and not s.is_contiguous():
            raise ValueError(f"inplace=True needs a contiguous {name} {what}, got strides "
                             f"{tuple(s.stride())}")
    return tensors


def _resolve_backend(backend, q: torch.Tensor) -> str:
    """'triton' or 'torch' ('reference' runs the same step loop as 'torch')."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda and _triton_available() else "torch"
    if backend == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set "
                             "before triton is imported, to run the kernel on the CPU); q is "
                             f"on {q.device}")
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not importable")
        return "triton"
    return "torch"


# ----------------------------------------------------------------------------- dispatch

def _run_torch(fn, args, kwargs, state, inplace):
    """The reference step loop from `state`, then (inplace) copy the new state over it."""
    o, new = fn(*args, initial_state=state, output_final_state=True, **kwargs)
    given = () if state is None else (tuple(state) if isinstance(state, (tuple, list)) else (state,))
    new_t = tuple(new) if isinstance(new, tuple) else (new,)
    if inplace:
        for s, n in zip(given, new_t):
            s.copy_(n)
        new_t = given
    else:
        # T == 0 (or a no-op cast) hands back the input tensor itself: never alias it.
        new_t = tuple(n.clone() if any(n is s for s in given) else n for n in new_t)
    return o, (new_t if isinstance(new, tuple) else new_t[0])


def _run_triton(q, k, v, state, inplace, **kw):
    from .triton.recurrent import fused_recurrent
    return fused_recurrent(q, k, v, state=state, inplace=inplace, **kw)


# ----------------------------------------------------------------------------- public API

def linear_attention_decode(q, k, v, g=None, *, state=None, scale=None, inplace=False,
                            backend="auto"):
    """T decode steps of gated linear attention from `state`:

        S_t = exp(g_t) * S_{t-1} + k_t v_t^T,   o_t = S_t^T (scale q_t)

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; one dtype (float32, bfloat16, float16, float64).
        g: log-decay (<= 0), float32 or q's dtype: None, [H] (constant per head), [B, T, H]
            (scalar per step) or [B, T, H, K] (per key row).
        state: [B, H, K, V] float32 (float64 for float64 inputs), or None for zeros.
        scale: multiplies q (default K ** -0.5).
        inplace: overwrite `state` (contiguous, float32) with the new state and return it.
        backend: "auto" | "triton" | "torch" | "reference".

    Returns:
        o: [B, T, H, V] in v's dtype; new_state: [B, H, K, V] float32 (`state` itself when
        inplace=True; a new tensor otherwise, `state` untouched).
    """
    _check_qkv(q, k, v)
    scale = _check_scale(scale, q.shape[-1])
    kind = _check_log_decay(g, q)
    _check_decode_state(state, q, v, inplace)
    _check_no_grad("linattn.linear_attention", q=q, k=k, v=v, g=g, state=state)
    if torch.compiler.is_compiling():
        return custom_ops.decode("linear_attention", q, k, v, (g,), state, scale=scale,
                                 inplace=inplace, backend=_resolve_backend(backend, q))
    if _resolve_backend(backend, q) == "torch":
        return _run_torch(reference.linear_attention, (q, k, v, g), dict(scale=scale),
                          state, inplace)
    return _run_triton(q, k, v, state, inplace, scale=scale, g=g, gate_kind=kind)


def delta_rule_decode(q, k, v, beta, g=None, *, state=None, scale=None, inplace=False,
                      backend="auto"):
    """T decode steps of DeltaNet (g None) / Gated DeltaNet (g [B, T, H]) from `state`:

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t)

    Args:
        q, k: [B, T, H, K] (keys used as given: L2-normalise them); v: [B, T, H, V].
        beta: [B, T, H] in (0, 1); g: None or a log-decay [B, T, H] (<= 0); both float32 or
            q's dtype.
        state, scale, inplace, backend: as linear_attention_decode.

    Returns:
        o: [B, T, H, V] in v's dtype; new_state: [B, H, K, V] float32.
    """
    _check_qkv(q, k, v)
    B, T, H, K = q.shape
    scale = _check_scale(scale, K)
    _check_step_gate("beta", beta, q)
    kind = _check_log_decay(g, q, allowed=("none", "scalar"))
    _check_decode_state(state, q, v, inplace)
    _check_no_grad("linattn.delta_rule", q=q, k=k, v=v, beta=beta, g=g, state=state)
    if torch.compiler.is_compiling():
        return custom_ops.decode("delta_rule", q, k, v, (beta, g), state, scale=scale,
                                 inplace=inplace, backend=_resolve_backend(backend, q))
    if _resolve_backend(backend, q) == "torch":
        return _run_torch(reference.delta_rule, (q, k, v, beta, g), dict(scale=scale),
                          state, inplace)
    return _run_triton(q, k, v, state, inplace, scale=scale, g=g, gate_kind=kind, beta=beta)


def mlstm_decode(q, k, v, i, f, *, input_gate="exp", state=None, scale=None, inplace=False,
                 backend="auto"):
    """T decode steps of xLSTM's mLSTM from `state` (i, f pre-activations, as linattn.mlstm):

    input_gate="exp": m_t = max(logsigmoid(f_t) + m_{t-1}, i_t),
        C_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T,
        n_t likewise with k_t, o_t = C_t^T q^_t / (max(|n_t^T q^_t|, exp(-m_t)) + 1e-6);
        state: the tuple (C [B, H, K, V], n [B, H, K], m [B, H]).
    input_gate="sigmoid": C_t = sigmoid(f_t) C_{t-1} + sigmoid(i_t) k_t v_t^T,
        o_t = C_t^T q^_t; state: C [B, H, K, V].

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; i, f: [B, T, H], float32 or q's dtype.
        state, scale, inplace, backend: as linear_attention_decode (with inplace=True every
            tensor of the tuple is updated).

    Returns:
        o: [B, T, H, V] in v's dtype; new_state as above (float32).
    """
    _check_qkv(q, k, v)
    B, T, H, K = q.shape
    scale = _check_scale(scale, K)
    if input_gate not in INPUT_GATES:
        raise ValueError(f"input_gate must be one of {INPUT_GATES}, got {input_gate!r}")
    _check_step_gate("i", i, q)
    _check_step_gate("f", f, q)
    parts = _check_decode_state(state, q, v, inplace, mlstm_exp=input_gate == "exp")
    if parts and input_gate == "exp":
        state = parts  # a list becomes the tuple (C, n, m)
    _check_no_grad("linattn.mlstm", q=q, k=k, v=v, i=i, f=f, state=state)
    if torch.compiler.is_compiling():
        return custom_ops.decode("mlstm", q, k, v, (i, f), state, scale=scale, inplace=inplace,
                                 backend=_resolve_backend(backend, q), input_gate=input_gate)
    if _resolve_backend(backend, q) == "torch":
        return _run_torch(reference.mlstm, (q, k, v, i, f),
                          dict(input_gate=input_gate, scale=scale), state, inplace)
    return _run_triton(q, k, v, state, inplace, scale=scale, g=f, gate_kind="scalar", i=i,
                       mlstm=input_gate)
