"""Argument checks shared by the public ops (linattn.ops.api) and the decode functions
(linattn.ops.decode): a ValueError or TypeError naming the argument and the expected shape or
dtype, before any kernel runs.

Shape, dtype and device checks always run. Checks that need the values (log-decays <= 0,
cu_seqlens order) run on CPU tensors, and on GPU tensors only when LINATTN_CHECK=1, so the
hot path has no host sync; they are skipped while torch.compile traces.
"""
from __future__ import annotations

import os
from numbers import Real

import torch

MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = ("auto", "triton", "torch", "reference")
INPUT_GATES = ("exp", "sigmoid")


def _value_checks_enabled(x: torch.Tensor) -> bool:
    """Value checks (a host read of x) run on CPU tensors, or with LINATTN_CHECK=1; never
    while torch.compile traces, where x holds no values."""
    if torch.compiler.is_compiling():
        return False
    return x.device.type == "cpu" or os.environ.get("LINATTN_CHECK", "0") == "1"


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, T, H, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-d [B, T, H, D] (batch, time, heads, head dim), "
                             f"got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    K, V = q.shape[-1], v.shape[-1]
    if not (1 <= K <= MAX_HEAD_DIM) or not (1 <= V <= MAX_HEAD_DIM):
        raise ValueError(f"head dims must be in [1, {MAX_HEAD_DIM}], got K={K} (q, k) and V={V} (v)")
    _check_devices(q, k=k, v=v)


def _check_devices(ref: torch.Tensor, **tensors):
    for name, x in tensors.items():
        for t in (x if isinstance(x, (tuple, list)) else (x,)):
            if isinstance(t, torch.Tensor) and t.device != ref.device:
                raise ValueError(f"{name} is on {t.device} but q is on {ref.device}: "
                                 "all inputs must be on one device")


def _check_float(name, x, q, expected_shape: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected_shape}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32 or q's dtype), got {x.dtype}")
    if x.dtype == torch.float64 and q.dtype != torch.float64:
        raise TypeError(f"{name} is float64 but q is {q.dtype}: use float32 or q's dtype")


def _check_step_gate(name, x, q):
    """A per-step gate tensor of shape [B, T, H] (beta, i, f, a scalar g)."""
    B, T, H = q.shape[:3]
    _check_float(name, x, q, "[B, T, H]")
    if tuple(x.shape) != (B, T, H):
        raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)}, got {tuple(x.shape)}")
    _check_devices(q, **{name: x})


def _check_log_decay(g, q, allowed=("none", "const", "scalar", "key")) -> str:
    """Validates a log-decay gate and returns its kind."""
    if g is None:
        return "none"
    B, T, H, K = q.shape
    shapes = {"const": (H,), "scalar": (B, T, H), "key": (B, T, H, K)}
    names = {"const": "[H]", "scalar": "[B, T, H]", "key": "[B, T, H, K]"}

    def expect():  # built only for an error: torch.compile traces the rest
        return " or ".join(f"{names[kd]} = {shapes[kd]}" for kd in allowed if kd != "none")

    if not isinstance(g, torch.Tensor) or g.dtype not in FLOAT_DTYPES:
        _check_float("g", g, q, expect())
    _check_float("g", g, q, "")
    kind = None
    for kd in allowed:
        if kd != "none" and tuple(g.shape) == shapes[kd]:
            kind = kd
            break
    if kind is None:
        raise ValueError(f"g must be {expect()} (a log-decay), got shape {tuple(g.shape)}")
    _check_devices(q, g=g)
    if _value_checks_enabled(g) and g.numel() and bool((g.detach() > 0).any()):
        raise ValueError(f"g holds log-decays and must be <= 0, got max {g.detach().max().item():.4g}")
    return kind


def _check_cu_seqlens(cu_seqlens, q) -> int:
    """Returns the number of packed sequences (B when cu_seqlens is None)."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32/int64 tensor [N+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-d [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B={B}")
    _check_devices(q, cu_seqlens=cu_seqlens)
    if _value_checks_enabled(cu_seqlens):
        c = cu_seqlens.tolist()
        if c[0] != 0:
            raise ValueError(f"cu_seqlens[0] must be 0, got {c[0]}")
        if any(b < a for a, b in zip(c[:-1], c[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {c}")
        if c[-1] != T:
            raise ValueError(f"cu_seqlens[-1] must equal T={T}, got {c[-1]}")
    return cu_seqlens.numel() - 1


def _check_state(name, s, q, shape, what):
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a tensor {what} = {shape}, got {type(s).__name__}")
    if s.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32), got {s.dtype}")
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{name} must be {what} = {tuple(shape)}, got {tuple(s.shape)}")
    _check_devices(q, **{name: s})


def _check_scale(scale, K) -> float:
    if scale is None:
        return K ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    return float(scale)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
