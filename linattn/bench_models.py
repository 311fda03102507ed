"""`linattn bench --models`: training steps of whole CausalLMs, each mixer against attention
and against the same model built on fla's layers, on one GPU.

    linattn bench --models --model-size 12x768                 # T 8192 and 2048, every case
    linattn bench --models --model-size 24x1024 --out $OUT
    linattn bench --models --cases 'attention,*gated_deltanet*' --T 8192
    linattn bench --models --compile                           # torch.compile(fullgraph=True)
    linattn bench --models --smoke --inprocess --out /tmp/b    # toy size on the CPU (tests)

A row is one model (a case) at one sequence length T: full training steps (bf16 autocast
forward, CausalLM.loss: the chunked linear + float32 cross-entropy over a 32000
vocabulary, backward, AdamW step) at a constant
number of tokens per step (B = tokens // T), timed as the median of --steps steps after
--warmup steps (CUDA events between consecutive steps), with the peak memory of the timed
steps (torch.cuda.max_memory_allocated: weights, gradients, AdamW states and activations).
Its model FLOPs utilisation is

    MFU = tokens per step * (6 N + 3 * sum over layers of the mixer's forward FLOPs per token)
          / step time / the bf16 matmul rate measured at the start of the same run

with N the parameters (a tied embedding counted once, as the LM head's matmul) and the
mixer's FLOPs those of its sequence mixing alone (its projections are in N): causal softmax
attention T (K + V) per token and head; a linear mixer the matmuls of the chunked algorithm
with chunks of L = 64 (see chunk_flops_per_token); x3 for forward + backward.

Cases (CASES, name -> Case) are our CausalLM with each mixer, the same CausalLM with
softmax attention (SDPA, the default backend), and, when fla imports, the same CausalLM
whose linear layers are fla's own (fla.layers.GatedDeltaNet, ...) at the same dims, wrapped
to our mixer contract (FlaMixer). fla 0.6.0 refuses its gated backward on Hopper with
triton < 3.7.1: it is forced on (fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True), for
timing only (its gradients may be wrong there).

Every case runs in its own worker process (linattn.bench's WorkerPool), kept across its
rows: a crash or a hang costs that case's rows, never the run. Before the rows, every case
runs one forward+backward at batch 1 (--jobs at a time) so the Triton compiles of all cases
overlap; each case's first row then forgets the autotuners' choices (made under that load)
and tunes again alone in its warm-up steps. Rows run in order of importance (the first T first),
within --timeout each and --budget overall; a row that cannot run records why.

Writes bench-models-<gpu>-<date>-<size>[-compile].json (every row, the GPU, the versions,
the matmul rate, the command line), .png and .md into --out, and prints a markdown table
last. Without a CUDA GPU (and without --smoke or --device cpu) it says so and exits 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import functools
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import bench

TOKENS = 16384
DEFAULT_T = (8192, 2048)                  # in order of importance: the first runs first
VOCAB = 32000
CHUNK = 64                                # L of the linear mixers' FLOP model
LR = 1e-4
EXIT_NO_GPU = bench.EXIT_NO_GPU


# ============================================================================ sizes and cases

@dataclass(frozen=True)
class ModelSize:
    """A CausalLM's shape; head_dim = d_model // n_heads."""
    n_layers: int
    d_model: int
    n_heads: int
    vocab: int = VOCAB


SIZES = {
    "12x768": ModelSize(12, 768, 6),      # benchmarks/train_throughput.py's model, head dim 128
    "24x1024": ModelSize(24, 1024, 8),    # head dim 128
    "smoke": ModelSize(4, 32, 2, vocab=64),
}

# How each run mode sets the row plan: T, tokens per step, warm-up and timed steps, device.
SETTINGS = {
    "full": dict(T=DEFAULT_T, tokens=TOKENS, warmup=3, steps=10, device="cuda"),
    "smoke": dict(T=(64,), tokens=128, warmup=1, steps=2, device="cpu"),
}


@dataclass(frozen=True)
class Case:
    """One benchmarked model. family: ours | sdpa | fla. mixer and hybrid: the LMConfig
    layer pattern (for an fla case: the pattern of the model it is compared with; its layers
    named `mixer` are fla's). peer: the case this one is compared with (an fla case names
    ours). build(size, T, backend) -> the model: a CausalLM (its mixers may be FlaMixers)."""
    name: str
    family: str
    mixer: str
    build: Callable
    hybrid: int | None = None
    needs: str | None = None
    peer: str | None = None


def build_ours(size: ModelSize, T: int, backend: str, *, mixer: str, hybrid: int | None = None):
    """Our CausalLM with `mixer` in every layer (every (hybrid+1)-th layer attention)."""
    from .models import CausalLM, LMConfig
    cfg = LMConfig(vocab_size=size.vocab, d_model=size.d_model, n_layers=size.n_layers,
                   n_heads=size.n_heads, mixer=mixer, hybrid=hybrid, max_seq_len=T, backend=backend)
    return CausalLM(cfg)


class FlaMixer(nn.Module):
    """An fla layer behind our mixer contract, for training benchmarks:
    y, None = mixer(x [B, T, d_model], state=None, cu_seqlens=None, return_state=False),
    y [B, T, d_model] (fla's dtype under autocast). States are not carried (ValueError)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        if state is not None or return_state:
            raise ValueError("FlaMixer wraps an fla layer for training benchmarks: "
                             "state must be None and return_state False")
        kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        return self.layer(x, **kw)[0], None


def fla_layer(kind: str, d_model: int, n_heads: int, layer_idx: int):
    """fla's layer `kind` at our layers' dims (head dim d_model // n_heads, K and V as our
    mixer of that kind, output gate and short conv where ours have them)."""
    hd = d_model // n_heads
    if kind == "GatedDeltaNet":
        from fla.layers import GatedDeltaNet
        return GatedDeltaNet(hidden_size=d_model, num_heads=n_heads, head_dim=hd, expand_v=1.0,
                             use_gate=True, use_short_conv=True, conv_size=4, layer_idx=layer_idx)
    if kind == "DeltaNet":
        from fla.layers import DeltaNet
        return DeltaNet(hidden_size=d_model, num_heads=n_heads, expand_k=1.0, expand_v=1.0,
                        use_gate=True, use_short_conv=True, conv_size=4, qk_activation="silu",
                        qk_norm="l2", layer_idx=layer_idx)
    if kind == "GatedLinearAttention":
        from fla.layers import GatedLinearAttention
        return GatedLinearAttention(hidden_size=d_model, num_heads=n_heads, expand_k=0.5, expand_v=1.0,
                                    use_short_conv=False, use_output_gate=True, gate_fn="swish",
                                    gate_low_rank_dim=16, gate_logit_normalizer=16, layer_idx=layer_idx)
    if kind == "SimpleGatedLinearAttention":        # scalar data-dependent decay: mLSTMsig's work
        from fla.layers.simple_gla import SimpleGatedLinearAttention
        return SimpleGatedLinearAttention(hidden_size=d_model, num_heads=n_heads, expand_k=1.0,
                                          expand_v=1.0, use_short_conv=False, gate_fn="swish",
                                          layer_idx=layer_idx)
    if kind == "MultiScaleRetention":               # constant per-head decay: Lightning's work
        from fla.layers import MultiScaleRetention
        return MultiScaleRetention(hidden_size=d_model, num_heads=n_heads, expand_k=1.0, expand_v=1.0,
                                   use_short_conv=False, use_output_gate=True, gate_fn="swish",
                                   layer_idx=layer_idx)
    raise ValueError(f"unknown fla layer {kind!r}")


def build_fla(size: ModelSize, T: int, backend: str, *, kind: str, mixer: str, hybrid: int | None = None):
    """Our CausalLM with the pattern of (mixer, hybrid), whose `mixer` layers are fla's
    `kind` layer wrapped by FlaMixer (the attention layers and everything else are ours)."""
    bench._fla_gated_switch()
    model = build_ours(size, T, backend, mixer=mixer, hybrid=hybrid)
    for i, block in enumerate(model.blocks):
        if block.mixer_name == mixer:
            block.mixer = FlaMixer(fla_layer(kind, size.d_model, size.n_heads, i))
    return model


def _ours(name, mixer, hybrid=None, family="ours"):
    return Case(name, family, mixer, functools.partial(build_ours, mixer=mixer, hybrid=hybrid), hybrid)


def _fla(kind, mixer, peer, hybrid=None, name=None):
    return Case(name or f"fla.{kind}", "fla", mixer,
                functools.partial(build_fla, kind=kind, mixer=mixer, hybrid=hybrid), hybrid,
                needs="fla.layers", peer=peer)


HYBRID = "gated_deltanet_3:1_attention"
# In order: attention (the reference), then each of ours beside its fla peer.
CASES = {c.name: c for c in [
    _ours("attention", "attention", family="sdpa"),
    _ours("gated_deltanet", "gated_deltanet"),
    _fla("GatedDeltaNet", "gated_deltanet", "gated_deltanet"),
    _ours(HYBRID, "gated_deltanet", hybrid=3),
    _fla("GatedDeltaNet", "gated_deltanet", HYBRID, hybrid=3, name="fla.GatedDeltaNet_3:1_attention"),
    _ours("gla", "gla"),
    _fla("GatedLinearAttention", "gla", "gla"),
    _ours("deltanet", "deltanet"),
    _fla("DeltaNet", "deltanet", "deltanet"),
    _ours("mlstm_sig", "mlstm_sig"),
    _fla("SimpleGatedLinearAttention", "mlstm_sig", "mlstm_sig"),
    _ours("lightning", "lightning"),
    _fla("MultiScaleRetention", "lightning", "lightning"),
    _ours("mlstm", "mlstm"),
]}


# ============================================================================ FLOPs

# The FLOP model of each mixer's sequence mixing (see chunk_flops_per_token).
MIXER_ALGO = {"attention": "softmax", "gated_deltanet": "delta", "deltanet": "delta", "gla": "gla",
              "mlstm": "gla", "mlstm_sig": "gla", "lightning": "gla"}


def chunk_flops_per_token(algo: str, K: int, V: int, T: int, L: int = CHUNK) -> float:
    """Forward FLOPs per token and head of the sequence mixing (2 per multiply-add); with
    K = V = D these are linattn.bench.flops_per_token's:
    gla      per chunk of L: Q K^T (2 L^2 K), masked A V (2 L^2 V), Q S and K^T V (2 L K V
             each) -> 2 L (K + V) + 4 K V per token
    delta    K K^T, T K, Q K^T (2 L^2 K each), T V, (.) U' (2 L^2 V each), W S, Q S, K^T U'
             (2 L K V each), the L x L triangular inverse (L^3 / 3 multiply-adds)
             -> 2 L (3 K + 2 V) + 6 K V + 2 L^2 / 3
    softmax  causal: a query attends t keys, T / 2 on average; Q K^T and P V -> T (K + V)"""
    if algo == "gla":
        return 2 * L * (K + V) + 4 * K * V
    if algo == "delta":
        return 2 * L * (3 * K + 2 * V) + 6 * K * V + 2 * L * L / 3
    if algo == "softmax":
        return T * (K + V)
    raise ValueError(f"unknown FLOP model {algo!r}")


def matmul_params(model) -> int:
    """N of 6N: every parameter, an untied input embedding excepted (a tied one is the LM
    head's matrix and counts once)."""
    n = sum(p.numel() for p in model.parameters())
    head = getattr(model, "lm_head", None)
    return n - model.embed.weight.numel() if head is not None else n


def mixing_layers(model) -> list:
    """(algorithm, heads, K, V) of every layer's sequence mixing, read from the built layers
    (an fla layer by its num_heads, head_k_dim and head_v_dim; the algorithm is that of the
    mixer it stands for)."""
    out = []
    for block in model.blocks:
        m = block.mixer
        if isinstance(m, FlaMixer):
            H, K, V = m.layer.num_heads, m.layer.head_k_dim, m.layer.head_v_dim
        else:
            H, K, V = m.n_heads, getattr(m, "key_dim", m.head_dim), getattr(m, "value_dim", m.head_dim)
        out.append((MIXER_ALGO[block.mixer_name], H, K, V))
    return out


def model_flops(layers: list, T: int, n_params: int) -> dict:
    """Training FLOPs per token: 6 N (the matmuls with the weights, forward and backward)
    plus 3x the forward sequence mixing of every layer, `layers` as mixing_layers gives them."""
    mixing = sum(H * chunk_flops_per_token(algo, K, V, T) for algo, H, K, V in layers)
    dense = 6.0 * n_params
    return {"flops_per_token_dense": dense, "flops_per_token_mixing": 3.0 * mixing,
            "flops_per_token": dense + 3.0 * mixing}


def mfu(flops_per_token: float, tokens_per_s: float, peak_TFLOPs: float) -> float:
    """Model FLOPs utilisation: the model's FLOP rate over the measured matmul rate."""
    return flops_per_token * tokens_per_s / (peak_TFLOPs * 1e12)


def describe_pattern(model) -> str:
    """'gated_deltanet x9, attention x3' (an fla layer by its class: 'fla.GatedDeltaNet x9')."""
    names = [f"fla.{type(b.mixer.layer).__name__}" if isinstance(b.mixer, FlaMixer) else b.mixer_name
             for b in model.blocks]
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    return ", ".join(f"{n} x{c}" for n, c in counts.items())


# ============================================================================ one row (worker side)

def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _step_clock(dev):
    """mark() -> a handle; elapsed(a, b) -> ms between two marks (CUDA events on the GPU:
    the device's time, host-side gaps in the stream included)."""
    if dev.type == "cuda":
        def mark():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return mark, lambda a, b: a.elapsed_time(b)
    return time.perf_counter, lambda a, b: (b - a) * 1e3


def measure_row(case: Case, size: ModelSize, T: int, B: int, *, steps: int, warmup: int,
                device: str, seed: int = 0, compile: bool = False, compile_mode: str | None = None,
                warm: bool = False, retune: bool = False) -> dict:
    """Builds case's model and times training steps at [B, T] in this process. warm: one
    forward+backward (compiles and autotunes) and return. retune: first forget the configs
    the Triton autotuners chose (in a warm-up beside other cases, under load), so the warm-up
    steps tune again with the GPU to themselves. The row holds parameters, the FLOP counts,
    ms_per_step (median), tokens_per_s, peak_mem_gib, or an error naming the stage that
    failed."""
    dev = torch.device(device)
    row: dict = {}
    stage = "build"
    model = opt = None
    try:
        torch.manual_seed(seed)
        model = case.build(size, T, "auto").to(dev)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        n = matmul_params(model)
        row["matmul_parameters"] = n
        row["layers"] = describe_pattern(model)
        row.update(model_flops(mixing_layers(model), T, n))
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, size.vocab, (B, T + 1), generator=gen).to(dev)    # [B, T + 1]
        x, y = ids[:, :-1], ids[:, 1:]
        def loss_fn(x, y):
            # CausalLM.loss: the chunked linear + cross-entropy, so no row holds the
            # [B * T, vocab] float32 logits (every case is a CausalLM, fla's mixers included).
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                return model.loss(x, y)

        if compile:
            from torch import _dynamo
            _dynamo.config.automatic_dynamic_shapes = False          # one static graph per shape
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 16)
            loss_fn = torch.compile(loss_fn, fullgraph=True, mode=compile_mode)
        if warm:
            stage = "warm-up forward+backward" + (" (torch.compile)" if compile else "")
            t0 = time.perf_counter()
            loss_fn(x, y).backward()
            _sync(dev)
            return {"warm_s": round(time.perf_counter() - t0, 1)}
        opt = torch.optim.AdamW(model.parameters(), lr=LR)

        def step():
            loss = loss_fn(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        if retune and dev.type == "cuda":
            row["retuned"] = bench.clear_autotune_caches()    # tune alone, at this shape
        stage = "first step" + (" (torch.compile)" if compile else "")
        t0 = time.perf_counter()
        step()
        _sync(dev)
        stage = "warm-up steps"
        for _ in range(max(0, warmup - 1)):
            step()
        _sync(dev)
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        stage = "timed steps"
        if dev.type == "cuda":
            row["static_mem_gib"] = torch.cuda.memory_allocated() / 2**30   # weights, grads, AdamW
            torch.cuda.reset_peak_memory_stats()
        mark, elapsed = _step_clock(dev)
        marks = [mark()]
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
            marks.append(mark())
        _sync(dev)
        wall = time.perf_counter() - t0
        ms = [elapsed(a, b) for a, b in zip(marks, marks[1:])]
        row["ms_per_step"] = statistics.median(ms)
        row["ms_per_step_min"], row["ms_per_step_max"] = min(ms), max(ms)
        row["wall_ms_per_step"] = 1e3 * wall / steps
        row["tokens_per_s"] = B * T / (row["ms_per_step"] * 1e-3)
        row["loss"] = float(loss.detach())
        if not math.isfinite(row["loss"]):
            row["error"] = f"loss is {row['loss']} after {warmup + steps} steps"
        if dev.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as e:  # one failing row must not stop the run: the row says why
        row["error"] = f"{stage}: {bench._short_error(e)}"
    finally:
        model = opt = None                                   # free them before the next row
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _request_row(req: dict, cases: dict) -> dict:
    case = cases.get(req["case"])
    if case is None:
        return {"error": f"unknown case {req['case']!r}"}
    return measure_row(case, ModelSize(**req["size"]), req["T"], req["B"], steps=req["steps"],
                       warmup=req["warmup"], device=req["device"], seed=req["seed"],
                       compile=req["compile"], compile_mode=req.get("compile_mode"),
                       warm=req.get("warm", False), retune=req.get("retune", False))


def worker_main() -> int:
    """The model bench's worker (bench.serve_requests over measure_row's requests)."""
    return bench.serve_requests(lambda req: _request_row(req, CASES))


class InProcess:
    """--inprocess: every row in this process (profilers, tests); a crash ends the run."""
    dead: dict = {}

    def __init__(self, cases: dict):
        self.cases = cases

    def run(self, key, request, timeout):
        return _request_row(request, self.cases)

    def close(self):
        pass


# ============================================================================ the run (parent side)

def parse_args(argv):
    p = argparse.ArgumentParser(prog="linattn bench --models", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="12x768", choices=[s for s in SIZES if s != "smoke"],
                   help="n_layers x d_model (12x768: 6 heads; 24x1024: 8 heads; head dim 128)")
    p.add_argument("--cases", default="", help="comma-separated case names or globs (see --list); default all")
    p.add_argument("--no-fla", action="store_true", help="skip the cases built on fla's layers")
    p.add_argument("--T", default=None, help="comma-separated sequence lengths (first = most important)")
    p.add_argument("--tokens", type=int, default=None, help=f"tokens per step, B * T ({TOKENS})")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (median taken; 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (3)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile(fullgraph=True) the forward + loss of every model")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON, PNG and markdown")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per row (compile and autotune included)")
    p.add_argument("--budget", type=float, default=510.0,
                   help="seconds for the whole run (ceilings, warm-up, rows): rows left are skipped")
    p.add_argument("--jobs", type=int, default=8,
                   help="cases warmed up (compiled) at once before the rows; 0: no shared warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda (default) or cpu")
    p.add_argument("--smoke", action="store_true", help="toy model (4 x 32, vocabulary 64, T 64) on the CPU")
    p.add_argument("--inprocess", action="store_true", help="no worker processes (a crash ends the run)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_cases(patterns: str, no_fla: bool, cases: dict = CASES) -> list:
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in cases.values()
            if (not pats or any(c.name == p or fnmatch.fnmatchcase(c.name, p) for p in pats))
            and not (no_fla and c.family == "fla")]


def plan_rows(cases: list, Ts) -> list:
    """(case, T) in order of importance: every case at the first T, then the next T."""
    return [(c, T) for T in Ts for c in cases]


def measure_cpu_matmul(n: int = 512, reps: int = 5) -> float:
    """float32 n^3 matmul rate on the CPU in TFLOP/s (the smoke run's peak), best of reps."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def why_missing(module: str) -> str | None:
    """None when `module` can be imported, else why not (finding a submodule runs its
    packages' __init__, which may fail on a missing or mismatched dependency)."""
    import importlib.util
    try:
        if importlib.util.find_spec(module) is not None:
            return None
        return f"{module} is not importable"
    except Exception as e:  # an __init__ that fails: name the cause
        return f"{module} is not importable: {bench._short_error(e)}"


def _versions() -> dict:
    from importlib import metadata
    v = bench.versions()
    try:
        v["flash_linear_attention"] = metadata.version("flash-linear-attention")
    except metadata.PackageNotFoundError:
        v["flash_linear_attention"] = None
    v["commit"] = git_commit()
    return v


def _warm_up(pool, cases: list, base: dict, T: int, jobs: int, timeout: float, deadline: float) -> dict:
    """One forward+backward of every case at [1, T], up to `jobs` at once (their Triton
    compiles overlap); returns {case: seconds or the error}. A case whose warm-up overran
    `timeout` beside the others is not given up: its rows start a new worker, which compiles
    alone (what the killed one compiled is in Triton's disk cache)."""
    took, started, pending = {}, {}, {}
    todo = [c.name for c in cases if c.name not in pool.dead]
    print(f"compile warm-up at B1 T{T}: {len(todo)} cases, {jobs} at a time", flush=True)
    while todo or pending:
        while todo and len(pending) < jobs and time.monotonic() < deadline:
            name = todo.pop(0)
            if pool.send(name, {**base, "case": name, "B": 1, "T": T, "warm": True}):
                pending[name] = started[name] = time.monotonic()
        if not pending:
            break
        done = pool.collect(pending, lambda _n, st: min(st + timeout, deadline), first_only=True)
        for name, row in done.items():
            took[name] = row.get("error") or round(time.monotonic() - started[name], 1)
            if row.get("error"):
                print(f"warm-up {name}: {row['error']}", file=sys.stderr, flush=True)
            if str(row.get("error", "")).startswith("timeout"):
                pool.dead.pop(name, None)
    for name in todo:
        took[name] = "skipped: out of the time budget (--budget)"
    return took


def run(args, cases: list, size: ModelSize, s: dict, runner=None) -> dict:
    """Measures every (case, T) row; returns the result dict (written as it goes)."""
    dev = s["device"]
    t0 = time.monotonic()
    deadline = t0 + args.budget if args.budget is not None else float("inf")
    if dev == "cuda":
        gpu = torch.cuda.get_device_name()
        print(f"linattn bench --models on {gpu}: measuring the ceilings ...", flush=True)
        ceilings = bench.measure_ceilings(quick=True)
    else:
        gpu = "cpu"
        ceilings = {"copy_TBps": None, "matmul_TFLOPs": measure_cpu_matmul()}
    date = _dt.date.today().isoformat()
    size_name = next((k for k, v in SIZES.items() if v == size), f"{size.n_layers}x{size.d_model}")
    stem = f"bench-models-{bench._slug(gpu)}-{date}-{size_name}" + ("-compile" if args.compile else "")
    out_dir = Path(args.out)
    missing = {}
    for need in dict.fromkeys(c.needs for c in cases if c.needs):
        why = why_missing(need)
        if why:
            missing[need] = why
    notes = [f"training step: {'bf16 autocast' if dev == 'cuda' else 'float32'} forward, float32 "
             f"cross-entropy over every token (CausalLM.loss, chunked linear + cross-entropy), backward, AdamW (lr {LR}, torch's default "
             f"implementation); our mixers on backend 'auto' (Triton on CUDA)",
             f"ms/step: median of {s['steps']} steps after {s['warmup']} (CUDA events between "
             "consecutive steps); peak: torch.cuda.max_memory_allocated over the timed steps "
             "(weights, gradients, AdamW states, activations)",
             f"MFU: tokens/s x (6 N + 3 x the mixers' forward FLOPs per token) / the measured "
             f"matmul rate; N = parameters (the tied embedding once, as the LM head); mixers: "
             f"causal softmax T (K + V) per token and head, linear mixers the chunked algorithm's "
             f"matmuls with L = {CHUNK}",
             "attention: our Attention layer (RoPE, F.scaled_dot_product_attention(is_causal=True), "
             "the default SDPA backend)",
             "fla cases: our CausalLM (embedding, norms, SwiGLU, head, attention layers) whose "
             "linear layers are fla.layers' at the same dims (head dim d_model / n_heads, our K and V, "
             "output gate, short conv where ours have one); fla.SimpleGatedLinearAttention (scalar "
             "decay) stands for mlstm_sig's work, fla.MultiScaleRetention (constant decay) for "
             "lightning's; mlstm (mLSTMexp) has no fla layer"]
    if any(c.family == "fla" and c.needs not in missing for c in cases):
        notes.append("fla's gated ops timed with fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 forced True: "
                     "fla 0.6.0 refuses their backward on Hopper with triton < 3.7.1 (their gradients "
                     "may be wrong there; timing only)")
    if args.compile:
        notes.append(f"--compile: torch.compile(forward + loss, fullgraph=True, mode={args.compile_mode!r}), "
                     "one static graph per shape; a row whose compile fails records the error")
    argv = getattr(args, "argv", [])
    result = {"benchmark": "models", "gpu": gpu, "date": date,
              "command": " ".join(["linattn bench --models"] + list(argv)),
              "versions": _versions(), "ceilings": ceilings,
              "config": {"size": size_name, **asdict(size), "head_dim": size.d_model // size.n_heads,
                         "tokens_per_step": s["tokens"], "T": list(s["T"]), "warmup": s["warmup"],
                         "steps": s["steps"], "compile": args.compile, "compile_mode": args.compile_mode,
                         "device": dev, "timeout_s": args.timeout, "budget_s": args.budget,
                         "jobs": args.jobs, "chunk_for_flops": CHUNK, "lr": LR},
              "notes": notes, "rows": []}
    mm = ceilings["matmul_TFLOPs"]
    print(f"matmul {mm:.1f} TFLOP/s; versions {json.dumps(result['versions'])}", flush=True)
    base = {"size": asdict(size), "steps": s["steps"], "warmup": s["warmup"], "device": dev,
            "seed": args.seed, "compile": args.compile, "compile_mode": args.compile_mode}
    if runner is None:
        if args.inprocess:
            runner = InProcess({c.name: c for c in cases})
        else:
            env = dict(os.environ)
            pkg_root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(x for x in (pkg_root, env.get("PYTHONPATH")) if x)
            env["PYTHONUNBUFFERED"] = "1"
            runner = bench.WorkerPool([sys.executable, "-m", "linattn.bench_models", "--worker"], env)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        runnable = [c for c in cases if c.needs not in missing]
        warmed = isinstance(runner, bench.WorkerPool) and args.jobs > 0 and bool(runnable)
        if warmed:
            result["warmup_s"] = _warm_up(runner, runnable, base, min(s["T"]), args.jobs,
                                          args.timeout, deadline)
        retuned = set()
        for case, T in plan_rows(cases, s["T"]):
            B = max(1, s["tokens"] // T)
            row = {"case": case.name, "family": case.family, "peer": case.peer, "T": T, "B": B,
                   "tokens_per_step": B * T}
            if case.needs in missing:
                row["error"] = f"skipped: {missing[case.needs]}"
            elif time.monotonic() >= deadline:
                row["error"] = "skipped: out of the time budget (--budget)"
            elif case.name in runner.dead:
                row["error"] = f"skipped: {runner.dead[case.name]}"
            else:
                t_row = time.monotonic()
                # after the shared warm-up, each case's first timed row tunes again alone
                req = {**base, "case": case.name, "T": T, "B": B,
                       "retune": warmed and case.name not in retuned}
                retuned.add(case.name)
                row.update(runner.run(case.name, req, max(1.0, min(args.timeout, deadline - time.monotonic()))))
                row["wall_s"] = round(time.monotonic() - t_row, 2)
            add_ratios(result["rows"] + [row], mm)
            result["rows"].append(row)
            print(format_row(row), flush=True)
            write_outputs(result, out_dir, stem, final=False)
    finally:
        signal.signal(signal.SIGTERM, old)
        runner.close()
        add_ratios(result["rows"], mm)
        result["wall_s"] = round(time.monotonic() - t0, 1)
        write_outputs(result, out_dir, stem, final=True)
        print(f"\nwrote {out_dir / stem}.json, .md, .png ({result['wall_s']:.0f} s)\n", flush=True)
        print(format_markdown_table(result["rows"]), flush=True)
    return result


def add_ratios(rows: list, matmul_TFLOPs: float) -> None:
    """Adds mfu, and tokens/s over attention's and over the peer's at the same T, to every
    row that has tokens_per_s."""
    tps = {(r["case"], r["T"]): r["tokens_per_s"] for r in rows if r.get("tokens_per_s")}
    for r in rows:
        if not r.get("tokens_per_s"):
            continue
        if r.get("flops_per_token") is not None:
            r["mfu"] = mfu(r["flops_per_token"], r["tokens_per_s"], matmul_TFLOPs)
        att = tps.get(("attention", r["T"]))
        r["vs_attention"] = r["tokens_per_s"] / att if att else None
        # ours over its fla peer (the fla row names ours as its peer)
        fla = next((f["tokens_per_s"] for f in rows if f["T"] == r["T"] and f.get("tokens_per_s")
                    and f["family"] == "fla" and f.get("peer") == r["case"]), None)
        r["vs_fla"] = r["tokens_per_s"] / fla if fla and r["family"] != "fla" else None


# ============================================================================ output

def _f(x, fmt):
    return "" if x is None else format(x, fmt)


def _md(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def format_row(r: dict) -> str:
    if r.get("tokens_per_s") is None:
        return f"{r['case']:<34} T{r['T']:<6} {r.get('error', '')[:160]}"
    return (f"{r['case']:<34} T{r['T']:<6} B{r['B']:<4} {r['tokens_per_s']:>12,.0f} tok/s "
            f"{r['ms_per_step']:>8.1f} ms  MFU {_f(r.get('mfu') and 100 * r['mfu'], '.1f'):>5}%  "
            + (f"  peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else ""))


def format_markdown_table(rows: list) -> str:
    """One line per row: throughput, ratios to attention and to fla's layers, MFU, memory."""
    out = ["| model | T | B | tokens/s | ms/step | x attention | x fla | MFU % | peak GiB | params | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("tokens_per_s") is not None
        note = r.get("error", "")
        out.append(
            f"| {r['case']} | {r['T']} | {r['B']} | {_f(r.get('tokens_per_s'), ',.0f')} | "
            f"{_f(r.get('ms_per_step'), '.1f')} | {_f(r.get('vs_attention') if ok else None, '.2f')} | "
            f"{_f(r.get('vs_fla') if ok else None, '.2f')} | "
            f"{_f(r.get('mfu') and 100 * r['mfu'] if ok else None, '.1f')} | {_f(r.get('peak_mem_gib'), '.1f')} | "
            f"{_f(r.get('parameters') and r['parameters'] / 1e6, '.1f')}{'M' if r.get('parameters') else ''} | "
            f"{_md(note)[:140]} |")
    return "\n".join(out)


def format_markdown(result: dict) -> str:
    v, c, cfg = result["versions"], result["ceilings"], result["config"]
    head = [f"## linattn bench --models: {cfg['size']} ({cfg['n_layers']} layers, d_model {cfg['d_model']}, "
            f"{cfg['n_heads']} heads), {result['gpu']}, {result['date']}", "",
            f"torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, fla-core "
            f"{v.get('fla') or '-'}, flash-linear-attention {v.get('flash_linear_attention') or '-'}, "
            f"commit {v.get('commit') or '-'}. Measured {'bf16' if cfg['device'] == 'cuda' else 'float32'} "
            f"matmul {c['matmul_TFLOPs']:.4g} TFLOP/s"
            + (f", copy {c['copy_TBps']:.2f} TB/s" if c.get("copy_TBps") else "")
            + f". Vocabulary {cfg['vocab']}, {cfg['tokens_per_step']} tokens per step, "
            f"median of {cfg['steps']} steps after {cfg['warmup']}"
            + (", torch.compile" if cfg.get("compile") else "") + ".", "",
            f"Command: `{result['command']}`", ""]
    head += [f"- {n}" for n in result.get("notes", [])] + [""]
    return "\n".join(head + [format_markdown_table(result["rows"]), ""])


def plot(result: dict, path: Path) -> bool:
    """Bars per T: tokens/s (attention's dashed), MFU and peak memory of every case."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    rows = [r for r in result["rows"] if r.get("tokens_per_s")]
    Ts = sorted({r["T"] for r in rows})
    if not Ts:
        return False
    color = {"ours": "tab:blue", "fla": "tab:orange", "sdpa": "tab:gray"}
    metrics = [m for m in [("tokens_per_s", "tokens/s", 1.0), ("mfu", "MFU %", 100.0),
                           ("peak_mem_gib", "peak GiB", 1.0)] if any(r.get(m[0]) for r in rows)]
    fig, axes = plt.subplots(len(metrics), len(Ts), figsize=(6 * len(Ts), 3.3 * len(metrics) + 1), squeeze=False)
    for j, T in enumerate(Ts):
        at = [r for r in rows if r["T"] == T]
        names = [r["case"] for r in at]
        for i, (key, label, scale) in enumerate(metrics):
            ax = axes[i][j]
            vals = [(r.get(key) or 0.0) * scale for r in at]
            ax.bar(range(len(at)), vals, color=[color.get(r["family"], "tab:green") for r in at])
            ref = next((r.get(key) for r in at if r["case"] == "attention"), None)
            if ref:
                ax.axhline(ref * scale, ls="--", color="k", lw=0.8)
            ax.set_xticks(range(len(at)))
            ax.set_xticklabels(names if i == len(metrics) - 1 else [], rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(label, fontsize=8)
            if i == 0:
                ax.set_title(f"T={T}, B={at[0]['B']}", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
    cfg = result["config"]
    fig.suptitle(f"{result['gpu']} {result['date']}: CausalLM {cfg['size']}, {cfg['tokens_per_step']} tokens/step "
                 f"(blue: ours, orange: fla's layers, gray: attention)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(result: dict, out_dir: Path, stem: str, final: bool):
    """bench.write_outputs with this bench's table and plot."""
    bench.write_outputs(result, out_dir, stem, final, markdown=format_markdown, draw=plot)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    if args.worker:
        return worker_main()
    if args.list:
        for c in CASES.values():
            print(f"{c.name:<36} {c.family:<5} {c.peer or ''}")
        return 0
    cases = select_cases(args.cases, args.no_fla)
    if not cases:
        print(f"linattn bench --models: no case matches --cases {args.cases!r} (see --list)", file=sys.stderr)
        return EXIT_NO_GPU
    s = dict(SETTINGS["smoke" if args.smoke else "full"])
    size = SIZES["smoke" if args.smoke else args.model_size]
    if args.device:
        s["device"] = args.device
    if args.T:
        s["T"] = tuple(int(x) for x in args.T.split(",") if x.strip())
    for key in ("tokens", "steps", "warmup"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if s["device"] == "cuda" and not torch.cuda.is_available():
        print("linattn bench --models needs a CUDA GPU, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing was measured "
              "(--smoke runs a toy model on the CPU).", file=sys.stderr)
        return EXIT_NO_GPU
    run(args, cases, size, s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
