"""`linattn bench`: time the ops against softmax attention and peer libraries on one GPU.

    linattn bench                         # every op, T in {8192, 2048, 32768}, D in {128, 256}
    linattn bench --quick --no-peers      # T = 8192, D = 128, ours and SDPA only
    linattn bench --ops 'linattn.delta*,fla.chunk_gated*' --T 8192 --D 128 --out /tmp/b

Each op is timed forward and forward+backward (median of triton.testing.do_bench; the
forward runs with inputs that require grad, as in training) at a constant number of tokens
B * T = 65536, H = 16, bf16, on fresh random data, and its peak extra memory over one
forward+backward is read from torch.cuda.max_memory_allocated (minus what was allocated
before: the inputs and the cotangent). Every number stands next to its physical floor:

    time floor   = max(bytes that must move / copy bandwidth, FLOPs / bf16 matmul rate)
                   bytes, forward:          read q, k, v and the gates, write o
                   bytes, forward+backward: the forward's, plus read do, write dq, dk, dv and
                                            the gates' gradients (a floor: it does not count
                                            the backward re-reading q, k, v)
                   FLOPs: the matmuls of a chunked algorithm with chunks of L = 64 tokens,
                          per token and head (see flops_per_token); fwd+bwd = 3x fwd (the
                          backward's matmuls are twice the forward's, nothing recomputed),
                          3.5x for softmax attention (flash-attention's count)
    memory floor = the outputs and gradients that must exist: o, dq, dk, dv, dgates
Both ceilings (device-to-device copy bandwidth counting bytes read + written, and a bf16
8192^3 matmul) are measured at the start of the run.

Every op runs in its own worker process (`python -m linattn.bench --worker`), so a compiler
crash (mlstm_kernels' TFLA mLSTMexp aborts LLVM with triton 3.6) or a hang costs that op's
rows, never the run: the row records the error and the run goes on. Rows run in order of
importance (T = 8192 and D = 128 first), within --timeout per row and --budget overall.

Writes bench-<gpu>-<date>.json (every row, the GPU, the versions, the ceilings, the command
line), .png (ms vs T per op, log scale) and .md (tables for BENCHMARKS.md) into --out, and
prints a short table last. Without a CUDA GPU it says so on stderr and exits 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import functools
import gc
import importlib.util
import inspect
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

TOKENS = 65536
HEADS = 16
DEFAULT_T = (8192, 2048, 32768)          # in order of importance: the first runs first
DEFAULT_D = (128, 256)
QUICK_T, QUICK_D = (8192,), (128,)
DECODE_B = (1, 64, 256)
DECODE_D = 128
CHUNK = 64                               # L of the FLOP model
EXIT_NO_GPU = 2

# dtypes of the generated gates (itemsize in bytes): log-decays in float32 as a model's
# logsigmoid produces them; beta and mLSTM's i, f in bf16 (fla's and TFLA's convention).
QKV_BYTES = 2
DECAY_BYTES, BETA_BYTES, MLSTM_GATE_BYTES = 4, 2, 2


# ============================================================================ op table

@dataclass(frozen=True)
class Gate:
    """A gate input: its dims ("H", "BTH" or "BTHK"), bytes per element, and whether the
    op returns its gradient."""
    name: str
    dims: str
    itemsize: int
    grad: bool = True

    def numel(self, B, T, H, D) -> int:
        return {"H": H, "BTH": B * T * H, "BTHK": B * T * H * D}[self.dims]


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op. family: ours | sdpa | fla | tfla. variant: what it computes (ours
    and a peer with one variant are compared). algo: the FLOP model (gla | delta | softmax
    | decode). needs: a module that must be importable for the op to run."""
    name: str
    family: str
    variant: str
    algo: str
    gates: tuple = ()
    needs: str | None = None
    decode: bool = False


G_CONST = Gate("g", "H", DECAY_BYTES)
G_SCALAR = Gate("g", "BTH", DECAY_BYTES)
G_KEY = Gate("g", "BTHK", DECAY_BYTES)
BETA = Gate("beta", "BTH", BETA_BYTES)
MLSTM_IF = (Gate("i", "BTH", MLSTM_GATE_BYTES), Gate("f", "BTH", MLSTM_GATE_BYTES))

OPS = [
    OpSpec("linattn.linear_attention[none]", "ours", "no gate", "gla"),
    OpSpec("linattn.linear_attention[const]", "ours", "constant gate [H]", "gla", (G_CONST,)),
    # a frozen constant decay (no gate gradient), as fla's g_gamma computes it
    OpSpec("linattn.linear_attention[const-frozen]", "ours", "constant gate [H]", "gla",
           (Gate("g", "H", DECAY_BYTES, grad=False),)),
    OpSpec("linattn.linear_attention[scalar]", "ours", "scalar gate [B,T,H]", "gla", (G_SCALAR,)),
    OpSpec("linattn.linear_attention[key]", "ours", "per-key gate [B,T,H,K]", "gla", (G_KEY,)),
    OpSpec("linattn.mlstm[sig]", "ours", "mLSTMsig", "gla", MLSTM_IF),
    OpSpec("linattn.mlstm[exp]", "ours", "mLSTMexp", "gla", MLSTM_IF),
    OpSpec("linattn.delta_rule", "ours", "delta rule", "delta", (BETA,)),
    OpSpec("linattn.delta_rule[gated]", "ours", "gated delta rule", "delta", (G_SCALAR, BETA)),
    OpSpec("sdpa[default]", "sdpa", "softmax", "softmax"),
    OpSpec("sdpa[flash]", "sdpa", "softmax", "softmax"),
    OpSpec("fla.chunk_linear_attn", "fla", "no gate", "gla", (), "fla"),
    OpSpec("fla.chunk_simple_gla[g_gamma]", "fla", "constant gate [H]", "gla",
           (Gate("g", "H", DECAY_BYTES, grad=False),), "fla"),
    OpSpec("fla.chunk_simple_gla", "fla", "scalar gate [B,T,H]", "gla", (G_SCALAR,), "fla"),
    OpSpec("fla.chunk_gla", "fla", "per-key gate [B,T,H,K]", "gla", (G_KEY,), "fla"),
    OpSpec("fla.chunk_delta_rule", "fla", "delta rule", "delta", (BETA,), "fla"),
    OpSpec("fla.chunk_gated_delta_rule", "fla", "gated delta rule", "delta", (G_SCALAR, BETA), "fla"),
    OpSpec("tfla.mlstmsig", "tfla", "mLSTMsig", "gla", MLSTM_IF, "mlstm_kernels"),
    OpSpec("tfla.mlstmexp", "tfla", "mLSTMexp", "gla", MLSTM_IF, "mlstm_kernels"),
    # one decoding step (T = 1) from a float32 state [B, H, D, D]
    OpSpec("linattn.linear_attention_decode", "ours", "decode: scalar gate", "decode",
           (Gate("g", "BTH", DECAY_BYTES, grad=False),), "linattn.ops.decode", decode=True),
    OpSpec("linattn.delta_rule_decode", "ours", "decode: gated delta rule", "decode",
           (Gate("g", "BTH", DECAY_BYTES, grad=False), Gate("beta", "BTH", BETA_BYTES, grad=False)),
           "linattn.ops.decode", decode=True),
    OpSpec("fla.fused_recurrent_simple_gla", "fla", "decode: scalar gate", "decode",
           (Gate("g", "BTH", DECAY_BYTES, grad=False),), "fla", decode=True),
    OpSpec("fla.fused_recurrent_gated_delta_rule", "fla", "decode: gated delta rule", "decode",
           (Gate("g", "BTH", DECAY_BYTES, grad=False), Gate("beta", "BTH", BETA_BYTES, grad=False)),
           "fla", decode=True),
]
OPS_BY_NAME = {s.name: s for s in OPS}


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    D: int

    @property
    def label(self) -> str:
        return f"B{self.B} T{self.T} H{self.H} D{self.D}"


# ============================================================================ floors

def flops_per_token(algo: str, D: int, T: int, L: int = CHUNK) -> float:
    """Forward FLOPs per token and head (K = V = D), counting 2 per multiply-add:
    gla     per chunk of L: Q K^T and (masked) A V, 2 L^2 D each; Q S and K^T V, 2 L D^2 each
            -> 4 L D + 4 D^2 per token (the per-key and mLSTM gates add elementwise work only)
    delta   K K^T, T K, T V, Q K^T, (.) U': 2 L^2 D each; W S, Q S, K^T U': 2 L D^2 each; the
            L x L triangular inverse L^3 / 3 multiply-adds -> 10 L D + 6 D^2 + 2 L^2 / 3
    softmax causal: a query attends t keys, T / 2 on average; Q K^T and P V -> 2 T D
    decode  2 D^2 to update the state and 2 D^2 to read it -> 4 D^2 (memory-bound anyway)."""
    if algo == "gla":
        return 4 * L * D + 4 * D * D
    if algo == "delta":
        return 10 * L * D + 6 * D * D + 2 * L * L / 3
    if algo == "softmax":
        return 2 * T * D
    if algo == "decode":
        return 4 * D * D
    raise ValueError(f"unknown FLOP model {algo!r}")


BWD_FLOP_FACTOR = {"gla": 2.0, "delta": 2.0, "softmax": 2.5, "decode": 0.0}


def io_bytes(spec: OpSpec, s: Shape) -> dict:
    """Bytes that must move (fwd, fwdbwd) and bytes that must exist after a backward (mem)."""
    n = s.B * s.T * s.H * s.D                               # elements of one of q, k, v, o
    qkv = 3 * n * QKV_BYTES
    o = n * QKV_BYTES
    gates = sum(g.numel(s.B, s.T, s.H, s.D) * g.itemsize for g in spec.gates)
    dgates = sum(g.numel(s.B, s.T, s.H, s.D) * g.itemsize for g in spec.gates if g.grad)
    if spec.decode:                                          # float32 state read and written
        state = 2 * s.B * s.H * s.D * s.D * 4
        return {"fwd": qkv + gates + o + state, "fwdbwd": None, "mem": None}
    fwd = qkv + gates + o
    return {"fwd": fwd, "fwdbwd": fwd + o + qkv + dgates, "mem": o + qkv + dgates}


def floors(spec: OpSpec, s: Shape, copy_TBps: float, matmul_TFLOPs: float) -> dict:
    """The physical floors of one row (ms, and GiB for memory), with what bounds each."""
    b = io_bytes(spec, s)
    f_fwd = flops_per_token(spec.algo, s.D, s.T) * s.B * s.T * s.H
    f_fb = f_fwd * (1 + BWD_FLOP_FACTOR[spec.algo])
    out = {"bytes_fwd": b["fwd"], "flops_fwd": f_fwd}

    def floor_ms(nbytes, flops):
        t_mem = nbytes / (copy_TBps * 1e12) * 1e3
        t_flop = flops / (matmul_TFLOPs * 1e12) * 1e3
        return (t_mem, "bytes") if t_mem >= t_flop else (t_flop, "flops")

    out["floor_fwd_ms"], out["floor_fwd_bound"] = floor_ms(b["fwd"], f_fwd)
    if not spec.decode:
        out["bytes_fwdbwd"], out["flops_fwdbwd"] = b["fwdbwd"], f_fb
        out["floor_fwdbwd_ms"], out["floor_fwdbwd_bound"] = floor_ms(b["fwdbwd"], f_fb)
        out["mem_floor_gib"] = b["mem"] / 2**30
    return out


# ============================================================================ inputs and op calls (worker side)

def _torch():
    import torch
    return torch


def _randn(gen, *dims):
    torch = _torch()
    return torch.randn(*dims, device="cuda", generator=gen, dtype=torch.float32)


def _qkv(s: Shape, gen, heads_first=False, unit_keys=False):
    """q, k, v bf16 leaves, [B, T, H, D] ([B, H, T, D] with heads_first); unit_keys
    L2-normalises k (the delta rule's callers do)."""
    torch = _torch()
    dims = (s.B, s.H, s.T, s.D) if heads_first else (s.B, s.T, s.H, s.D)
    q, k, v = (_randn(gen, *dims) for _ in range(3))
    if unit_keys:
        k = torch.nn.functional.normalize(k, dim=-1)
    return [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]


def _gate(kind: str, s: Shape, gen, heads_first=False):
    """Gates like a real model's: log-decays logsigmoid(randn) (per-key: / 16), beta and
    mLSTM's i in bf16, f = randn + 3 (TFLA's forget-gate bias range)."""
    torch = _torch()
    F = torch.nn.functional
    bth = (s.B, s.H, s.T) if heads_first else (s.B, s.T, s.H)
    if kind == "const":
        x = F.logsigmoid(_randn(gen, s.H))
    elif kind == "scalar":
        x = F.logsigmoid(_randn(gen, *bth))
    elif kind == "key":
        x = F.logsigmoid(_randn(gen, s.B, s.T, s.H, s.D)) / 16
    elif kind == "beta":
        x = torch.sigmoid(_randn(gen, *bth)).to(torch.bfloat16)
    elif kind == "i":
        x = _randn(gen, *bth).to(torch.bfloat16)
    elif kind == "f":
        x = (_randn(gen, *bth) + 3).to(torch.bfloat16)
    else:
        raise ValueError(kind)
    return x.requires_grad_()


def _fla_gated_switch():
    """fla 0.6.0 refuses its gated backward on Hopper with triton < 3.7.1; the anchors
    force it on to time it (its gradients may be wrong there: timing only)."""
    import fla.ops.common.chunk_o as chunk_o
    chunk_o.TRITON_ABOVE_3_7_1 = True


def build_case(name: str, s: Shape, gen):
    """Returns (inputs, fn): the leaf tensors (those with requires_grad get gradients) and a
    callable that runs the op once and returns its output (a tensor or a tuple)."""
    torch = _torch()
    if name.startswith("linattn.linear_attention["):
        import linattn
        kind = name[len("linattn.linear_attention["):-1]
        q, k, v = _qkv(s, gen)
        g = None if kind == "none" else _gate(kind.split("-")[0], s, gen)
        if kind.endswith("-frozen"):
            g = g.detach()                                    # no gradient for the decay
        return [q, k, v] + ([g] if g is not None else []), \
            lambda: linattn.linear_attention(q, k, v, g, backend="triton")
    if name.startswith("linattn.mlstm["):
        import linattn
        gate = {"sig": "sigmoid", "exp": "exp"}[name[len("linattn.mlstm["):-1]]
        q, k, v = _qkv(s, gen)
        i, f = _gate("i", s, gen), _gate("f", s, gen)
        return [q, k, v, i, f], lambda: linattn.mlstm(q, k, v, i, f, input_gate=gate, backend="triton")
    if name in ("linattn.delta_rule", "linattn.delta_rule[gated]"):
        import linattn
        q, k, v = _qkv(s, gen, unit_keys=True)
        beta = _gate("beta", s, gen)
        g = _gate("scalar", s, gen) if name.endswith("[gated]") else None
        return [q, k, v, beta] + ([g] if g is not None else []), \
            lambda: linattn.delta_rule(q, k, v, beta, g, backend="triton")
    if name.startswith("sdpa["):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        F = torch.nn.functional
        q, k, v = _qkv(s, gen, heads_first=True)             # [B, H, T, D]
        if name == "sdpa[flash]":
            def run():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return [q, k, v], run
        return [q, k, v], lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name.startswith("fla.chunk_"):
        _fla_gated_switch()
        if name == "fla.chunk_linear_attn":
            from fla.ops.linear_attn import chunk_linear_attn
            q, k, v = _qkv(s, gen)
            return [q, k, v], lambda: chunk_linear_attn(q, k, v, normalize=False)
        if name.startswith("fla.chunk_simple_gla"):
            from fla.ops.simple_gla import chunk_simple_gla
            q, k, v = _qkv(s, gen)
            if name.endswith("[g_gamma]"):
                g = _gate("const", s, gen).detach()           # fla has no gradient for g_gamma
                return [q, k, v, g], lambda: chunk_simple_gla(q, k, v, g_gamma=g)
            g = _gate("scalar", s, gen)
            return [q, k, v, g], lambda: chunk_simple_gla(q, k, v, g=g)
        if name == "fla.chunk_gla":
            from fla.ops.gla import chunk_gla
            q, k, v = _qkv(s, gen)
            g = _gate("key", s, gen)
            return [q, k, v, g], lambda: chunk_gla(q, k, v, g=g)
        if name in ("fla.chunk_delta_rule", "fla.chunk_gated_delta_rule"):
            q, k, v = _qkv(s, gen, unit_keys=True)          # keys normalised as ours get them
            beta = _gate("beta", s, gen)
            if name == "fla.chunk_delta_rule":
                from fla.ops.delta_rule import chunk_delta_rule
                return [q, k, v, beta], lambda: chunk_delta_rule(q, k, v, beta)
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            g = _gate("scalar", s, gen)
            return [q, k, v, g, beta], lambda: chunk_gated_delta_rule(q, k, v, g, beta)
    if name.startswith("tfla."):
        from mlstm_kernels.torch import get_mlstm_kernel
        q, k, v = _qkv(s, gen, heads_first=True)             # TFLA's layout [B, H, T, D]
        i, f = _gate("i", s, gen, heads_first=True), _gate("f", s, gen, heads_first=True)
        if name == "tfla.mlstmsig":                          # normalize=False: our mLSTMsig
            kern = get_mlstm_kernel("chunkwise--triton_xl_chunk_siging")
            return [q, k, v, i, f], lambda: kern(q, k, v, i, f, chunk_size=128, normalize=False,
                                                 autocast_kernel_dtype=torch.bfloat16)
        kern = get_mlstm_kernel("chunkwise--triton_xl_chunk")
        return [q, k, v, i, f], lambda: kern(q, k, v, i, f, chunk_size=128,
                                             autocast_kernel_dtype=torch.bfloat16)
    raise ValueError(f"unknown op {name!r}; known: {', '.join(OPS_BY_NAME)}")


_STATE_NAMES = ("state", "initial_state", "h", "h0", "S", "s", "past_state")


def bind_by_name(fn, values: dict):
    """A partial of fn with the arguments named like the keys of `values` (the decode
    functions are written by another module: bind by parameter name, state under any of
    _STATE_NAMES). A required parameter with no value is a TypeError naming the signature."""
    sig = inspect.signature(fn)
    args, kwargs = [], {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        key = "state" if p.name in _STATE_NAMES else p.name
        if key not in values:
            if p.default is p.empty:
                raise TypeError(f"{getattr(fn, '__name__', fn)}{sig}: no value for {p.name!r}")
            continue
        if p.kind == p.POSITIONAL_ONLY:
            args.append(values[key])
        else:
            kwargs[p.name] = values[key]
    return functools.partial(fn, *args, **kwargs)


def build_decode_case(name: str, s: Shape, gen):
    """One decoding step (T = 1): returns (state_tensor, fn)."""
    torch = _torch()
    F = torch.nn.functional
    q, k, v = (x.detach() for x in _qkv(s, gen, unit_keys=True))
    g = F.logsigmoid(_randn(gen, s.B, 1, s.H))
    beta = torch.sigmoid(_randn(gen, s.B, 1, s.H)).to(torch.bfloat16)
    state = _randn(gen, s.B, s.H, s.D, s.D) * 0.1
    delta = "delta" in name
    values = dict(q=q, k=k, v=v, g=g, state=state, scale=s.D ** -0.5)
    if delta:
        values["beta"] = beta
    if name.startswith("linattn."):
        from linattn.ops import decode
        return state, bind_by_name(getattr(decode, name[len("linattn."):]), values)
    if name == "fla.fused_recurrent_simple_gla":
        from fla.ops.simple_gla import fused_recurrent_simple_gla
        return state, lambda: fused_recurrent_simple_gla(q, k, v, g=g, initial_state=state,
                                                         output_final_state=True)
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    return state, lambda: fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                           output_final_state=True)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _short_error(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def clear_autotune_caches() -> int:
    """Forgets every Triton autotuner's chosen configs in this process (fla's CachedAutotuner
    included: a subclass); returns how many autotuners had chosen any. Their next launch
    tunes again; the compiled kernels stay cached."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return 0
    cleared = 0
    for obj in gc.get_objects():
        if issubclass(type(obj), Autotuner) and obj.cache:   # type(): no __class__ lookups
            obj.cache.clear()
            cleared += 1
    return cleared


def measure(name: str, s: Shape, seed: int, warm: bool = False, quick: bool = False,
            retune: bool = False) -> dict:
    """Times one op at one shape in this process. warm: run fwd+bwd once (compile and
    autotune) and return. retune: first forget the configs the autotuners chose (in a
    warm-up that ran beside other ops, where the timings they compared were under load) and
    run fwd+bwd once untimed, so each autotuner tunes again with the GPU to itself. The row
    holds fwd_ms, fwdbwd_ms, peak_gib (and retuned: how many autotuners tuned again), or an
    error."""
    torch = _torch()
    from triton.testing import do_bench
    spec = OPS_BY_NAME[name]
    warmup, rep = (10, 40) if quick else (25, 100)
    row: dict = {}
    stage = "inputs"
    try:
        gen = torch.Generator(device="cuda")
        gen.manual_seed(seed)
        if spec.decode:
            state, step = build_decode_case(name, s, gen)
            stage = "step"
            step()
            if not warm:
                t = do_bench(step, warmup=warmup, rep=rep, return_mode="median")
                row["step_us"] = t * 1e3
                row["state_TBps"] = 2 * state.numel() * 4 / (t * 1e-3) / 1e12
            return row
        inputs, fn = build_case(name, s, gen)
        grad_inputs = [x for x in inputs if x.requires_grad]
        stage = "forward"
        o = _first(fn())
        do = torch.randn(o.shape, device="cuda", generator=gen, dtype=torch.float32).to(o.dtype)
        del o

        def fwdbwd():
            return torch.autograd.grad(_first(fn()), grad_inputs, do)

        if retune and not warm and (n := clear_autotune_caches()):
            stage = "forward+backward (autotuning again)"
            fn()
            fwdbwd()
            torch.cuda.synchronize()
            row["retuned"] = n
            stage = "forward"
        if warm:
            stage = "forward+backward"
            fwdbwd()
            torch.cuda.synchronize()
            return row
        row["fwd_ms"] = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
        stage = "forward+backward"
        row["fwdbwd_ms"] = do_bench(fwdbwd, warmup=warmup, rep=rep, return_mode="median")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwdbwd()
        torch.cuda.synchronize()
        row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    except Exception as e:  # one op failing must not stop the run: the row says why
        row["error"] = f"{stage}: {_short_error(e)}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return row


def serve_requests(row_of) -> int:
    """A worker's loop: one JSON request per stdin line, row_of(request) -> one JSON row per
    line on the original stdout; anything the libraries print goes to stderr. row_of records
    its rows' own errors; an exception it raises becomes the row's "worker: ..." error."""
    result_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    results = os.fdopen(result_fd, "w", buffering=1)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            row = row_of(json.loads(line))
        except Exception as e:
            row = {"error": f"worker: {_short_error(e)}"}
        results.write(json.dumps(row) + "\n")
    return 0


def _measure_request(req: dict) -> dict:
    s = Shape(req["B"], req["T"], req["H"], req["D"])
    return measure(req["op"], s, req["seed"], warm=req.get("warm", False),
                   quick=req.get("quick", False), retune=req.get("retune", False))


def worker_main() -> int:
    """The op bench's worker (see serve_requests)."""
    return serve_requests(_measure_request)


# ============================================================================ workers (parent side)

class WorkerPool:
    """One worker process per op, started on its first request, kept across shapes (so a
    compiled and autotuned kernel is reused). A worker that dies or overruns its time is
    killed and its op marked dead: the op's later rows record why and are skipped."""

    def __init__(self, argv: list, env: dict | None = None, log=sys.stderr):
        self.argv, self.env, self.log = argv, env, log
        self.procs: dict = {}
        self.tails: dict = {}
        self.dead: dict = {}
        self.replies: queue.Queue = queue.Queue()

    def _start(self, op):
        p = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, bufsize=1, env=self.env)
        self.procs[op] = p
        self.tails[op] = deque(maxlen=40)
        threading.Thread(target=self._read_out, args=(op, p), daemon=True).start()
        threading.Thread(target=self._read_err, args=(op, p), daemon=True).start()
        return p

    def _read_out(self, op, p):
        for line in p.stdout:
            self.replies.put((op, p, line))
        self.replies.put((op, p, None))

    def _read_err(self, op, p):
        for line in p.stderr:
            self.tails[op].append(line.rstrip())
            print(f"[{op}] {line.rstrip()}", file=self.log, flush=True)

    def send(self, op: str, request: dict) -> bool:
        if op in self.dead:
            return False
        p = self.procs.get(op)
        if p is not None and p.poll() is not None:          # died while idle
            self._bury(op, self._died(op, p))
            return False
        p = p or self._start(op)
        try:
            p.stdin.write(json.dumps({**request, "op": op}) + "\n")
            p.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            self._bury(op, f"worker gone: {e}")
            return False
        return True

    def _bury(self, op, reason):
        p = self.procs.pop(op, None)
        if p is not None and p.poll() is None:
            p.kill()
        if p is not None:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.dead[op] = reason

    def _died(self, op, p) -> str:
        try:
            rc = p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        time.sleep(0.2)                                      # let the stderr reader finish
        tail = " | ".join(list(self.tails.get(op, ()))[-6:])
        what = "compile error" if re.search(r"LLVM|Assertion|assert|PassManager|MLIR|triton", tail) else "crash"
        sig = f"signal {-rc}" if rc is not None and rc < 0 else f"exit {rc}"
        return f"{what}: worker died ({sig}): {tail[-400:]}"

    def collect(self, pending: dict, deadline_of, first_only=False) -> dict:
        """Waits for the ops in `pending` ({op: start time}, emptied as they answer); returns
        {op: row}, after the first answer with first_only. An op past deadline_of(op, start)
        is killed and answered with a timeout error."""
        rows = {}
        while pending and not (first_only and rows):
            now = time.monotonic()
            for op, start in list(pending.items()):
                if now >= deadline_of(op, start):
                    reason = f"timeout after {now - start:.0f} s"
                    self._bury(op, reason)
                    rows[op] = {"error": reason}
                    del pending[op]
            if not pending:
                break
            wait = max(0.05, min(deadline_of(op, st) for op, st in pending.items()) - now)
            try:
                op, p, line = self.replies.get(timeout=wait)
            except queue.Empty:
                continue
            if op not in pending or self.procs.get(op) is not p:
                continue                                     # a late reply of a killed worker
            if line is None:
                reason = self._died(op, p)
                self._bury(op, reason)
                rows[op] = {"error": reason}
            else:
                try:
                    rows[op] = json.loads(line)
                except ValueError:
                    continue
            del pending[op]
        return rows

    def run(self, op: str, request: dict, timeout: float) -> dict:
        if not self.send(op, request):
            return {"error": f"skipped: {self.dead.get(op, 'worker unavailable')}"}
        return self.collect({op: time.monotonic()}, lambda _op, st: st + timeout)[op]

    def close(self, grace: float = 5.0):
        """Closes every worker's stdin (its loop ends); kills what is still busy after grace s."""
        for p in self.procs.values():
            try:
                p.stdin.close()
            except OSError:
                pass
        end = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


class InProcess:
    """--inprocess: everything in this process (for profilers and debugging); a crash ends
    the run."""
    dead: dict = {}

    def run(self, op, request, timeout):
        return measure(op, Shape(request["B"], request["T"], request["H"], request["D"]),
                       request["seed"], request.get("warm", False), request.get("quick", False))

    def close(self):
        pass


# ============================================================================ machine facts

def measure_ceilings(quick=False) -> dict:
    """Copy bandwidth (a 4 GiB device-to-device copy, bytes read + written) and the bf16
    8192^3 matmul rate, medians of do_bench."""
    torch = _torch()
    from triton.testing import do_bench
    rep = 50 if quick else 200
    x = torch.empty(2**30, device="cuda", dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), warmup=20, rep=rep, return_mode="median")
    copy = 2 * x.numel() * 4 / (t * 1e-3) / 1e12
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: a @ b, warmup=20, rep=rep, return_mode="median")
    mm = 2 * 8192**3 / (t * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_TBps": copy, "matmul_TFLOPs": mm}


def versions() -> dict:
    from importlib import metadata
    out = {"python": sys.version.split()[0]}
    for key, dist in (("torch", "torch"), ("triton", "triton"), ("fla", "fla-core"),
                      ("mlstm_kernels", "mlstm-kernels"), ("linattn", "linattn")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    torch = _torch()
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    return out


def _available(module: str | None) -> bool:
    if module is None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ============================================================================ output

def _fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def format_table(rows: list) -> str:
    """The short text table printed last: time next to floor, peak next to memory floor."""
    head = f"{'op':<38} {'shape':<22} {'fwd ms':>8} {'floor':>6} {'fwd+bwd':>8} {'floor':>6} {'peak GiB':>8} {'floor':>6}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("decode"):
            cells = (f"{_fmt(r.get('step_us'), 1):>8} {_fmt(r.get('floor_fwd_ms') and r['floor_fwd_ms'] * 1e3, 1):>6} "
                     f"{'':>8} {'':>6} {'':>8} {'':>6}")
            note = "us/step" + (f", state {r['state_TBps']:.2f} TB/s" if r.get("state_TBps") else "")
        else:
            cells = (f"{_fmt(r.get('fwd_ms')):>8} {_fmt(r.get('floor_fwd_ms')):>6} "
                     f"{_fmt(r.get('fwdbwd_ms')):>8} {_fmt(r.get('floor_fwdbwd_ms')):>6} "
                     f"{_fmt(r.get('peak_gib')):>8} {_fmt(r.get('mem_floor_gib')):>6}")
            note = ""
        if r.get("error"):
            note = (note + "; " if note else "") + r["error"][:90]
        lines.append(f"{r['op']:<38} {r['shape']:<22} {cells}  {note}".rstrip())
    return "\n".join(lines)


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def format_markdown(result: dict) -> str:
    """Tables for BENCHMARKS.md: per D, each op's fwd / fwd+bwd ms at each T (floors in
    the last row), then every row with its floors, then the decoding steps."""
    v, c = result["versions"], result["ceilings"]
    out = [f"## linattn bench: {result['gpu']}, {result['date']}", "",
           f"torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, "
           f"fla {v.get('fla') or '-'}, mlstm_kernels {v.get('mlstm_kernels') or '-'}. "
           f"Measured ceilings: copy {c['copy_TBps']:.2f} TB/s (read + write), "
           f"bf16 matmul {c['matmul_TFLOPs']:.0f} TFLOP/s. B*T = {result['config']['tokens']}, "
           f"H = {result['config']['H']}, bf16, median of do_bench; peak = extra memory of one "
           f"forward+backward.", "", f"Command: `{result['command']}`", ""]
    out += [f"- {n}" for n in result.get("notes", [])] + [""]
    train = [r for r in result["rows"] if not r.get("decode")]
    for D in sorted({r["D"] for r in train}):
        Ts = sorted({r["T"] for r in train if r["D"] == D})
        ops = list(dict.fromkeys(r["op"] for r in train if r["D"] == D))
        cell = {(r["op"], r["T"]): r for r in train if r["D"] == D}
        out += [f"### D = {D}: ms, forward / forward+backward (the floors are in the table of every row)", "",
                "| op | " + " | ".join(f"T={T}" for T in Ts) + " | peak GiB (floor) |",
                "|---|" + "---|" * len(Ts) + "---|"]
        for op in ops:
            cells = []
            for T in Ts:
                r = cell.get((op, T))
                if r is None:
                    cells.append("")
                elif r.get("fwd_ms") is None:
                    cells.append(_md(r.get("error", ""))[:80])
                else:
                    txt = f"{r['fwd_ms']:.2f} / {_fmt(r.get('fwdbwd_ms'))}"
                    if r.get("error"):
                        txt += f" ({_md(r['error'])[:60]})"
                    cells.append(txt)
            peaks = [r for T in Ts if (r := cell.get((op, T))) and r.get("peak_gib") is not None]
            peak = f"{peaks[0]['peak_gib']:.2f} ({peaks[0]['mem_floor_gib']:.2f})" if peaks else ""
            out.append(f"| {op} | " + " | ".join(cells) + f" | {peak} |")
        out.append("")
    if train:
        out += ["### Every row", "",
                "| op | shape | fwd ms | floor | fwd+bwd ms | floor | peak GiB | floor GiB | note |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            out.append(f"| {r['op']} | {r['shape']} | {_fmt(r.get('fwd_ms'))} | {_fmt(r.get('floor_fwd_ms'))} "
                       f"({r.get('floor_fwd_bound', '')}) | {_fmt(r.get('fwdbwd_ms'))} | "
                       f"{_fmt(r.get('floor_fwdbwd_ms'))} ({r.get('floor_fwdbwd_bound', '')}) | "
                       f"{_fmt(r.get('peak_gib'))} | {_fmt(r.get('mem_floor_gib'))} | {_md(r.get('error', ''))[:120]} |")
        out.append("")
    dec = [r for r in result["rows"] if r.get("decode")]
    if dec:
        out += ["### Decoding: one step (T = 1), float32 state read and written", "",
                "| op | shape | us / step | floor us | state TB/s | note |", "|---|---|---|---|---|---|"]
        for r in dec:
            fl = r.get("floor_fwd_ms")
            out.append(f"| {r['op']} | {r['shape']} | {_fmt(r.get('step_us'), 1)} | "
                       f"{_fmt(fl * 1e3 if fl is not None else None, 1)} | {_fmt(r.get('state_TBps'))} | "
                       f"{_md(r.get('error', ''))[:120]} |")
        out.append("")
    return "\n".join(out)


def plot(result: dict, path: Path) -> bool:
    """ms vs T, log-log, one panel per (D, variant): ours solid, peers dashed, SDPA dotted;
    forward+backward thick, forward thin."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    train = [r for r in result["rows"] if not r.get("decode") and r.get("fwd_ms") is not None]
    panels = list(dict.fromkeys((r["D"], r["variant"]) for r in train if r["variant"] != "softmax"))
    if not panels:
        return False
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    style = {"ours": "-", "fla": "--", "tfla": "--", "sdpa": ":"}
    for ax, (D, variant) in zip(axes.flat, panels):
        rows = [r for r in train if r["D"] == D and r["variant"] in (variant, "softmax")]
        for op in dict.fromkeys(r["op"] for r in rows):
            if op == "sdpa[flash]":
                continue
            pts = sorted((r["T"], r["fwd_ms"], r.get("fwdbwd_ms")) for r in rows if r["op"] == op)
            fam = OPS_BY_NAME[op].family if op in OPS_BY_NAME else "ours"
            line, = ax.plot([p[0] for p in pts], [p[2] for p in pts], style.get(fam, "-"),
                            marker="o", lw=2, label=op + " fwd+bwd")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style.get(fam, "-"), marker=".",
                    lw=0.8, color=line.get_color(), label=op + " fwd")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{variant}, D={D}", fontsize=9)
        ax.set_xlabel("T (B*T constant)", fontsize=8)
        ax.set_ylabel("ms", fontsize=8)
        ax.legend(fontsize=5)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{result['gpu']} {result['date']}: bf16, H={result['config']['H']}, "
                 f"B*T={result['config']['tokens']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def write_outputs(result: dict, out_dir: Path, stem: str, final: bool, markdown=None, draw=None):
    """out_dir/stem.json (replaced atomically at every call); when final also stem.md
    (markdown(result), default this bench's format_markdown) and stem.png (draw(result,
    path), default plot), a plot failure reported but never losing the numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (stem + ".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out_dir / (stem + ".json"))
    if final:
        (out_dir / (stem + ".md")).write_text((markdown or format_markdown)(result) + "\n")
        try:
            (draw or plot)(result, out_dir / (stem + ".png"))
        except Exception as e:  # a plot failure must not lose the numbers
            print(f"plot failed: {_short_error(e)}", file=sys.stderr)


# ============================================================================ the run

def parse_args(argv):
    p = argparse.ArgumentParser(prog="linattn bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="", help="comma-separated op names or globs (see --list); default all")
    p.add_argument("--T", default=None, help="comma-separated sequence lengths (first = most important)")
    p.add_argument("--D", default=None, help="comma-separated head dims (K = V)")
    p.add_argument("--tokens", type=int, default=TOKENS, help="B * T of every training shape")
    p.add_argument("--quick", action="store_true", help="T=8192, D=128 only, shorter do_bench")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON, PNG and markdown")
    p.add_argument("--no-peers", action="store_true", help="skip fla and mlstm_kernels")
    p.add_argument("--no-decode", action="store_true", help="skip the decoding rows")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per row (compile included)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run: rows left are skipped")
    p.add_argument("--jobs", type=int, default=4,
                   help="ops compiled and autotuned in parallel before timing (0: each compiles at its first "
                        "timed row); above 1, autotuners tune again alone before each op's first timed row per D")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inprocess", action="store_true", help="no worker processes (a crash ends the run)")
    p.add_argument("--list", action="store_true", help="list the ops and exit")
    p.add_argument("--models", action="store_true",
                   help="time training steps of whole models instead (see `linattn bench --models --help`)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _ints(text, default):
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else default


def select_ops(patterns: str, no_peers: bool, no_decode: bool) -> list:
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = []
    for spec in OPS:
        if pats and not any(spec.name == p or fnmatch.fnmatchcase(spec.name, p) for p in pats):
            continue
        if no_peers and spec.family in ("fla", "tfla"):
            continue
        if no_decode and spec.decode:
            continue
        chosen.append(spec)
    return chosen


def plan_rows(specs, Ts, Ds, tokens, H=HEADS) -> list:
    """(spec, shape) in order of importance: the first (T, D) for every op, then the
    decoding steps, then the other T at the first D, then the other D."""
    train = [s for s in specs if not s.decode]
    shapes = [Shape(max(1, tokens // T), T, H, D) for D in Ds for T in Ts]
    plan = [(sp, shapes[0]) for sp in train]
    plan += [(sp, Shape(B, 1, H, DECODE_D)) for sp in specs if sp.decode for B in DECODE_B]
    plan += [(sp, sh) for sh in shapes[1:] for sp in train]
    return plan


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--models" in argv:                                   # the model-level bench
        from .bench_models import main as models_main
        return models_main([a for a in argv if a != "--models"])
    args = parse_args(argv)
    if args.worker:
        return worker_main()
    specs = select_ops(args.ops, args.no_peers, args.no_decode)
    if args.list:
        for s in OPS:
            print(f"{s.name:<40} {s.family:<5} {s.variant}")
        return 0
    if not specs:
        print(f"linattn bench: no op matches --ops {args.ops!r} (see --list)", file=sys.stderr)
        return EXIT_NO_GPU
    torch = _torch()
    if not torch.cuda.is_available():
        print("linattn bench needs a CUDA GPU, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing was measured.",
              file=sys.stderr)
        return EXIT_NO_GPU
    Ts = _ints(args.T, QUICK_T if args.quick else DEFAULT_T)
    Ds = _ints(args.D, QUICK_D if args.quick else DEFAULT_D)
    t0 = time.monotonic()
    deadline = t0 + args.budget if args.budget is not None else float("inf")
    missing = {s.needs for s in specs if not _available(s.needs)}
    gpu = torch.cuda.get_device_name()
    date = _dt.date.today().isoformat()
    stem = f"bench-{_slug(gpu)}-{date}"
    out_dir = Path(args.out)
    notes = [f"forward timed with inputs that require grad; fwd+bwd = torch.autograd.grad of o with a "
             f"random cotangent; our ops with backend='triton'",
             "floors: bytes = read q, k, v, gates + write o (fwd), + read do + write dq, dk, dv, dgates "
             "(fwd+bwd); FLOPs of a chunked algorithm, L = 64, fwd+bwd = 3x fwd (3.5x for softmax); "
             "memory floor = o + dq + dk + dv + dgates",
             "delta rule: keys L2-normalised before the call for every library (fla with "
             "use_qk_l2norm_in_kernel=False); TFLA mLSTMsig with normalize=False, chunk_size=128"]
    if any(s.family == "fla" for s in specs) and "fla" not in missing:
        notes.append("fla gated ops timed with fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 forced True: "
                     "fla 0.6.0 refuses their backward on Hopper with triton < 3.7.1 (their gradients "
                     "may be wrong there; timing only)")
    if args.jobs > 1 and not args.inprocess:
        notes.append(f"compile + autotune warm-up ran up to {args.jobs} ops at once before timing; "
                     "each op's autotuners then tuned again alone (caches cleared) before its first "
                     "timed row at that D (the row's retuned: how many), so the warm-up's load does "
                     "not pick the configs")
    print(f"linattn bench on {gpu}: measuring the ceilings ...", flush=True)
    result = {"gpu": gpu, "date": date, "command": " ".join(["linattn bench"] + list(sys.argv[1:] if argv is None else argv)),
              "versions": versions(), "ceilings": measure_ceilings(args.quick),
              "config": {"tokens": args.tokens, "H": HEADS, "T": list(Ts), "D": list(Ds),
                         "decode_B": list(DECODE_B), "chunk_for_flops": CHUNK, "timeout_s": args.timeout,
                         "budget_s": args.budget, "jobs": args.jobs},
              "notes": notes, "rows": []}
    c = result["ceilings"]
    print(f"copy {c['copy_TBps']:.2f} TB/s, bf16 matmul {c['matmul_TFLOPs']:.0f} TFLOP/s; "
          f"versions {json.dumps(result['versions'])}", flush=True)
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (pkg_root, env.get("PYTHONPATH")) if x)
    env["PYTHONUNBUFFERED"] = "1"
    runner = InProcess() if args.inprocess else WorkerPool([sys.executable, "-m", "linattn.bench", "--worker"], env)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, on_term)
    warmed, retuned = set(), set()
    try:
        for spec, shape in plan_rows(specs, Ts, Ds, args.tokens):
            row = {"op": spec.name, "family": spec.family, "variant": spec.variant, "decode": spec.decode,
                   "B": shape.B, "T": shape.T, "H": shape.H, "D": shape.D, "shape": shape.label}
            row.update(floors(spec, shape, c["copy_TBps"], c["matmul_TFLOPs"]))
            if spec.needs in missing:
                row["error"] = f"skipped: {spec.needs} is not importable"
            elif time.monotonic() >= deadline:
                row["error"] = "skipped: out of the time budget (--budget)"
            elif spec.name in runner.dead:
                row["error"] = f"skipped: {runner.dead[spec.name]}"
            else:
                if (shape.D, spec.decode) not in warmed and isinstance(runner, WorkerPool) and args.jobs > 0:
                    warmed.add((shape.D, spec.decode))
                    result.setdefault("warmup_s", {}).update(_warm_up(
                        runner, [s for s in specs if s.decode == spec.decode and s.needs not in missing],
                        shape, args, deadline))
                req = {"op": spec.name, "B": shape.B, "T": shape.T, "H": shape.H, "D": shape.D,
                       "seed": args.seed, "quick": args.quick}
                # the first timed row per op and D after a warm-up beside other ops tunes again
                key = (spec.name, shape.D, spec.decode)
                if (shape.D, spec.decode) in warmed and args.jobs > 1 and key not in retuned:
                    retuned.add(key)
                    req["retune"] = True
                t_row = time.monotonic()
                row.update(runner.run(spec.name, req, max(1.0, min(args.timeout, deadline - time.monotonic()))))
                row["wall_s"] = round(time.monotonic() - t_row, 2)   # compile included, if any left
            result["rows"].append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
            write_outputs(result, out_dir, stem, final=False)
    finally:
        signal.signal(signal.SIGTERM, old)
        runner.close()
        result["wall_s"] = time.monotonic() - t0
        write_outputs(result, out_dir, stem, final=True)
        print(f"\nwrote {out_dir / stem}.json, .md, .png ({result['wall_s']:.0f} s)\n", flush=True)
        print(format_table(result["rows"]), flush=True)
    return 0


def _warm_up(pool: WorkerPool, specs, shape: Shape, args, deadline) -> dict:
    """Compile and autotune every op at this shape's D, up to args.jobs at once; returns the
    seconds each took, {"op@D": s} (what a budget for the next run must allow). An op that
    overran --timeout among the others (compiles share the CPUs, autotuning the GPU) gets one
    more try alone, within the budget: fla's gated ops needed 150-170 s with four at once."""
    took, started, timed_out = {}, {}, []

    def request(op):
        return {"op": op, "B": shape.B, "T": shape.T, "H": shape.H, "D": shape.D,
                "seed": args.seed, "warm": True}

    todo = [s.name for s in specs if s.name not in pool.dead]
    print(f"compile warm-up at {shape.label}: {len(todo)} ops, {args.jobs} at a time", flush=True)
    pending: dict = {}
    while todo or pending:
        while todo and len(pending) < args.jobs:
            op = todo.pop(0)
            if pool.send(op, request(op)):
                pending[op] = started[op] = time.monotonic()
        if not pending:
            continue
        # collect whichever finishes first: wait on all, one reply at a time
        done = pool.collect(pending, lambda _op, st: min(st + args.timeout, deadline), first_only=True)
        for op, row in done.items():
            took[f"{op}@D{shape.D}"] = round(time.monotonic() - started[op], 1)   # collect empties pending
            if str(row.get("error", "")).startswith("timeout") and args.jobs > 1:
                timed_out.append(op)
            elif op in pool.dead:
                pool.dead[op] = f"in the compile warm-up: {pool.dead[op]}"
            if row.get("error"):
                print(f"warm-up {op}: {row['error']}", file=sys.stderr, flush=True)
    for op in timed_out:                                     # alone this time
        left = deadline - time.monotonic()
        if left < 1.0:
            pool.dead[op] = f"in the compile warm-up: {pool.dead.get(op, 'timeout')}"
            continue
        pool.dead.pop(op, None)
        print(f"compile warm-up: retrying {op} alone", flush=True)
        t0 = time.monotonic()
        row = pool.run(op, request(op), min(args.timeout, left))
        took[f"{op}@D{shape.D}"] = round(time.monotonic() - t0, 1)
        if op in pool.dead:
            pool.dead[op] = f"in the compile warm-up (also alone): {pool.dead[op]}"
        if row.get("error"):
            print(f"warm-up {op} (alone): {row['error']}", file=sys.stderr, flush=True)
    return took


if __name__ == "__main__":
    raise SystemExit(main())
