"""`linattn bench --models`: training steps of whole CausalLMs, each mixer against attention
and against the same model built on fla's layers, on one GPU.

    linattn bench --models --model-size 12x768                 # T 8192 and 2048, every case
    linattn bench --models --model-size 24x1024 --out $OUT
    linattn bench --models --cases 'attention,*gated_deltanet*' --T 8192
    linattn bench --models --compile                           # torch.compile(fullgraph=True)
    linattn bench --models --save-for-backward recompute       # every linear model recomputes
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
with chunks of L = 64 (see linattn.bench.flops); x3 for forward + backward.

Cases (linattn.bench.model_cases.CASES, name -> Case) are our CausalLM with each mixer,
the same CausalLM with softmax attention (SDPA, the default backend), and, when fla imports,
the same CausalLM whose linear layers are fla's own (fla.layers.GatedDeltaNet, ...) at the
same dims, wrapped to our mixer contract (FlaMixer). fla 0.6.0 refuses its gated backward on Hopper with
triton < 3.7.1: it is forced on (fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True), for
timing only (its gradients may be wrong there).

Every case runs in its own worker process (linattn.bench.runner's WorkerPool), kept across
its rows: a crash or a hang costs that case's rows, never the run. Before the rows, every case
runs one forward+backward at batch 1 (--jobs at a time; with --compile at the first row's
shape, at most 3 at a time) so the Triton and inductor compiles of all cases overlap and land
in their disk caches. On the GPU a row runs with every other worker closed (idle workers' CUDA
contexts and caches would take the card's memory and pressure the allocator of the row being
timed), so a case's first row starts a new worker, which loads the compiled kernels from disk
and autotunes alone in its warm-up steps (where a worker lives on, its autotuners' choices are
forgotten first); a case's rows run together, so its worker serves all of them. Cases run in CASES order, within --timeout each row and --budget overall; a row that
cannot run records why. Each row records the device memory free when it began
(device_free_gib). A run that must fit a short time box can take one T per command (--T).

Writes bench-models-<gpu>-<date>-<size>[-compile][-recompute].json (every row, the GPU, the versions,
the matmul rate, the command line), .png and .md into --out, and prints a markdown table
last. Without a CUDA GPU (and without --smoke or --device cpu) it says so and exits 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import report
from ..ops.api import SAVE_FOR_BACKWARD
from .flops import CHUNK
from .model_cases import CASES, Case, ModelSize, describe_pattern, matmul_params, mfu
from .runner import EXIT_NO_GPU, Job, Machine, clear_autotune_caches, run_rows, short_error, versions, warm_up

TOKENS = 16384
DEFAULT_T = (8192, 2048)                  # each case's rows in this order
LR = 1e-4
COMPILE_WARM_JOBS = 3                     # --compile warm-ups at once: each a full step's memory
WORKER_ARGV = [sys.executable, "-m", "linattn.bench", "--models", "--worker"]

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
                warm: bool = False, retune: bool = False,
                save_for_backward: str | None = None) -> dict:
    """Builds case's model and times training steps at [B, T] in this process. warm: one
    forward+backward (compiles and autotunes) and return. retune: first forget the configs
    the Triton autotuners chose (in a warm-up beside other cases, under load), so the warm-up
    steps tune again with the GPU to themselves. save_for_backward: what our linear mixers
    keep for the backward ("states" or "recompute", LMConfig.save_for_backward) in place of
    the case's own choice; None keeps it (fla's and attention's cases have no such choice).
    The row holds parameters, the FLOP counts,
    ms_per_step (median), tokens_per_s, peak_mem_gib, or an error naming the stage that
    failed."""
    dev = torch.device(device)
    row: dict = {}
    stage = "build"
    model = opt = None
    try:
        if dev.type == "cuda":       # what the other processes on the card leave free
            row["device_free_gib"] = torch.cuda.mem_get_info()[0] / 2**30
        torch.manual_seed(seed)
        own = {"save_for_backward": save_for_backward} if save_for_backward and case.family == "ours" else {}
        with dev:                     # parameters made on the device: no host init and copy
            model = case.build(size, T, "auto", **own)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["matmul_parameters"] = matmul_params(model)
        row["layers"] = describe_pattern(model)
        row.update(case.flops(model, T))
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
            row["retuned"] = clear_autotune_caches()    # tune alone, at this shape
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
        row["error"] = f"{stage}: {short_error(e)}"
    finally:
        model = opt = None                                   # free them before the next row
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def request_row(req: dict, cases: dict) -> dict:
    """measure_row() of one worker request {case, size, T, B, steps, warmup, device, seed,
    compile, compile_mode, warm?, retune?, save_for_backward?}; cases: name -> Case."""
    case = cases.get(req["case"])
    if case is None:
        return {"error": f"unknown case {req['case']!r}"}
    return measure_row(case, ModelSize(**req["size"]), req["T"], req["B"], steps=req["steps"],
                       warmup=req["warmup"], device=req["device"], seed=req["seed"],
                       compile=req["compile"], compile_mode=req.get("compile_mode"),
                       warm=req.get("warm", False), retune=req.get("retune", False),
                       save_for_backward=req.get("save_for_backward"))



# ============================================================================ the run (parent side)

def parse_args(argv):
    p = argparse.ArgumentParser(prog="linattn bench --models", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="12x768", choices=[s for s in SIZES if s != "smoke"],
                   help="n_layers x d_model (12x768: 6 heads; 24x1024: 8 heads; head dim 128)")
    p.add_argument("--cases", default="", help="comma-separated case names or globs (see --list); default all")
    p.add_argument("--no-fla", action="store_true", help="skip the cases built on fla's layers")
    p.add_argument("--T", default=None, help="comma-separated sequence lengths (each case runs them in this order)")
    p.add_argument("--tokens", type=int, default=None, help=f"tokens per step, B * T ({TOKENS})")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (median taken; 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (3)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile(fullgraph=True) the forward + loss of every model")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--save-for-backward", choices=SAVE_FOR_BACKWARD, default=None,
                   help="what every one of our linear models keeps for the backward: its ops' chunk "
                        "states ('states') or their inputs only, recomputing the rest ('recompute'); "
                        "default: each case's own (states; recompute in *_recompute)")
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
    """(case, T): each case's rows together (its worker, compiled and tuned, serves them all
    and then closes), cases in CASES order, a case's T in the order given."""
    return [(c, T) for c in cases for T in Ts]


def measure_cpu_matmul(n: int = 512, reps: int = 5) -> float:
    """float32 n^3 matmul rate on the CPU in TFLOP/s (the smoke run's peak), best of reps."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def _notes(args, s: dict, cases: list, missing: dict) -> list:
    dev = s["device"]
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
    if args.save_for_backward:
        notes.append(f"--save-for-backward {args.save_for_backward}: every one of our linear models "
                     f"runs with LMConfig.save_for_backward={args.save_for_backward!r}")
    if args.compile:
        notes.append(f"--compile: torch.compile(forward + loss, fullgraph=True, mode={args.compile_mode!r}), "
                     "one static graph per shape; a row whose compile fails records the error")
    return notes


def run(args, cases: list, size: ModelSize, s: dict, machine: Machine | None = None) -> dict:
    """Measures every (case, T) row; returns the result dict (written as it goes). machine:
    what the run asks of the machine (tests pass fakes)."""
    machine = machine or Machine()
    dev = s["device"]
    t0 = time.monotonic()
    deadline = t0 + args.budget if args.budget is not None else float("inf")
    if dev == "cuda":
        gpu = machine.gpu_name()
        print(f"linattn bench --models on {gpu}: measuring the ceilings ...", flush=True)
        ceilings = machine.ceilings(True)
    else:
        gpu = "cpu"
        ceilings = {"copy_TBps": None, "matmul_TFLOPs": measure_cpu_matmul()}
    date = _dt.date.today().isoformat()
    size_name = next((k for k, v in SIZES.items() if v == size), f"{size.n_layers}x{size.d_model}")
    stem = (f"bench-models-{report.slug(gpu)}-{date}-{size_name}" + ("-compile" if args.compile else "")
            + (f"-{args.save_for_backward}" if args.save_for_backward else ""))
    out_dir = Path(args.out)
    missing = {n: why for n in dict.fromkeys(c.needs for c in cases if c.needs) if (why := machine.why_missing(n))}
    result = {"benchmark": "models", "gpu": gpu, "date": date,
              "command": " ".join(["linattn bench --models"] + list(getattr(args, "argv", []))),
              "versions": versions(models=True), "ceilings": ceilings,
              "config": {"size": size_name, **asdict(size), "head_dim": size.d_model // size.n_heads,
                         "tokens_per_step": s["tokens"], "T": list(s["T"]), "warmup": s["warmup"],
                         "steps": s["steps"], "compile": args.compile, "compile_mode": args.compile_mode,
                         "save_for_backward": args.save_for_backward, "device": dev, "timeout_s": args.timeout, "budget_s": args.budget,
                         "jobs": args.jobs, "chunk_for_flops": CHUNK, "lr": LR},
              "notes": _notes(args, s, cases, missing), "rows": []}
    mm = ceilings["matmul_TFLOPs"]
    print(f"matmul {mm:.1f} TFLOP/s; versions {json.dumps(result['versions'])}", flush=True)
    base = {"size": asdict(size), "steps": s["steps"], "warmup": s["warmup"], "device": dev,
            "seed": args.seed, "compile": args.compile, "compile_mode": args.compile_mode,
            "save_for_backward": args.save_for_backward}
    by_name = {c.name: c for c in cases}
    pool = machine.pool(None if args.inprocess else WORKER_ARGV, lambda req: request_row(req, by_name))
    runnable = [c.name for c in cases if c.needs not in missing]
    warmed = not args.inprocess and args.jobs > 0 and bool(runnable)
    retuned = set()

    def start():
        """One forward+backward of every case, --jobs at once (their Triton compiles overlap):
        at [1, min T]; with --compile at the first row's [B, T] (torch.compile keeps one static
        graph per shape: the graph the row runs lands in inductor's disk caches, which the
        row's own worker then hits), at most COMPILE_WARM_JOBS at once (each holds a whole
        training step's activations)."""
        if warmed:
            T = s["T"][0] if args.compile else min(s["T"])
            B = max(1, s["tokens"] // T) if args.compile else 1
            jobs = min(args.jobs, COMPILE_WARM_JOBS) if args.compile else args.jobs
            print(f"compile warm-up at B{B} T{T}: {len(runnable)} cases, {jobs} at a time", flush=True)
            result["warmup_s"] = warm_up(pool, runnable, lambda n: {**base, "case": n, "B": B, "T": T, "warm": True},
                                         jobs=jobs, timeout=args.timeout, deadline=deadline,
                                         retry_alone=False)

    def prepare(job) -> dict:
        """After the shared warm-up, each case's first timed row tunes again alone."""
        first = job.key not in retuned
        retuned.add(job.key)
        return {"retune": warmed and first}

    plan = []
    for case, T in plan_rows(cases, s["T"]):
        B = max(1, s["tokens"] // T)
        row = {"case": case.name, "family": case.family, "peer": case.peer, "T": T, "B": B,
               "tokens_per_step": B * T}
        plan.append(Job(case.name, row, {**base, "case": case.name, "T": T, "B": B}, case.needs))

    def on_row(row):
        result["rows"].append(row)
        add_ratios(result["rows"], mm)
        print(report.models_row_line(row), flush=True)
        report.write_outputs(result, out_dir, stem, final=False)

    def finish():
        add_ratios(result["rows"], mm)
        result["wall_s"] = round(time.monotonic() - t0, 1)
        report.write_outputs(result, out_dir, stem, final=True)
        print(f"\nwrote {out_dir / stem}.json, .md, .png ({result['wall_s']:.0f} s)\n", flush=True)
        print(report.models_markdown_table(result["rows"]), flush=True)

    run_rows(plan, pool, missing=missing, timeout=args.timeout, deadline=deadline, on_row=on_row,
             finish=finish, start=start, prepare=prepare, exclusive=dev == "cuda")
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


def main(argv=None, machine: Machine | None = None) -> int:
    """`linattn bench --models` (see the module's docstring); machine: what the run asks of
    the machine (tests pass fakes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    if args.worker:
        from .runner import serve_requests
        return serve_requests(lambda req: request_row(req, CASES))
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
    if s["device"] == "cuda" and (machine or Machine()).gpu_name() is None:
        print("linattn bench --models needs a CUDA GPU, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing was measured "
              "(--smoke runs a toy model on the CPU).", file=sys.stderr)
        return EXIT_NO_GPU
    run(args, cases, size, s, machine)
    return 0
