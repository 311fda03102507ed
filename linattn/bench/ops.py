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
                          per token and head (see linattn.bench.flops); fwd+bwd = 3x fwd (the
                          backward's matmuls are twice the forward's, nothing recomputed),
                          3.5x for softmax attention (flash-attention's count)
    memory floor = the outputs and gradients that must exist: o, dq, dk, dv, dgates
Both ceilings (device-to-device copy bandwidth counting bytes read + written, and a bf16
8192^3 matmul) are measured at the start of the run.

Every op runs in its own worker process (`python -m linattn.bench --worker`), so a compiler
crash (mlstm_kernels' TFLA mLSTMexp aborts LLVM with triton 3.6) or a hang costs that op's
rows, never the run: the row records the error and the run goes on. Rows run in order of
importance (T = 8192 and D = 128 first), within --timeout per row and --budget overall.

The ops are data (linattn.bench.op_cases.OPS), the worker pool and the row loop are
linattn.bench.runner's, the tables and the plot linattn.bench.report's.

Writes bench-<gpu>-<date>.json (every row, the GPU, the versions, the ceilings, the command
line), .png (ms vs T per op, log scale) and .md (tables for BENCHMARKS.md) into --out, and
prints a short table last. Without a CUDA GPU it says so on stderr and exits 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import gc
import json
import sys
import time
from pathlib import Path

from . import report
from .flops import CHUNK, floors
from .op_cases import OPS, OPS_BY_NAME, Shape
from .runner import EXIT_NO_GPU, Job, Machine, clear_autotune_caches, run_rows, short_error, versions, warm_up

TOKENS = 65536
HEADS = 16
DEFAULT_T = (8192, 2048, 32768)          # in order of importance: the first runs first
DEFAULT_D = (128, 256)
QUICK_T, QUICK_D = (8192,), (128,)
DECODE_B = (1, 64, 256)
DECODE_D = 128
WORKER_ARGV = [sys.executable, "-m", "linattn.bench", "--worker"]


# ============================================================================ one row (worker side)

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def measure(name: str, s: Shape, seed: int, warm: bool = False, quick: bool = False,
            retune: bool = False) -> dict:
    """Times one op (an OPS name) at one shape in this process. warm: run fwd+bwd once
    (compile and autotune) and return. retune: first forget the configs the autotuners
    chose (in a warm-up that ran beside other ops, where the timings they compared were
    under load) and run fwd+bwd once untimed, so each autotuner tunes again with the GPU to
    itself. The row holds fwd_ms, fwdbwd_ms, peak_gib (and retuned: how many autotuners
    tuned again), step_us and state_TBps for a decoding step, or an error."""
    import torch
    from triton.testing import do_bench
    case = OPS_BY_NAME[name]
    warmup, rep = (10, 40) if quick else (25, 100)
    row: dict = {}
    stage = "inputs"
    try:
        gen = torch.Generator(device="cuda")
        gen.manual_seed(seed)
        if case.decode:
            state, step = case.build(s, gen)
            stage = "step"
            step()
            if not warm:
                t = do_bench(step, warmup=warmup, rep=rep, return_mode="median")
                row["step_us"] = t * 1e3
                row["state_TBps"] = 2 * state.numel() * 4 / (t * 1e-3) / 1e12
            return row
        inputs, fn = case.build(s, gen)
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
        row["error"] = f"{stage}: {short_error(e)}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return row


def measure_request(req: dict) -> dict:
    """measure() of one worker request {op, B, T, H, D, seed, warm?, quick?, retune?}."""
    s = Shape(req["B"], req["T"], req["H"], req["D"])
    return measure(req["op"], s, req["seed"], warm=req.get("warm", False),
                   quick=req.get("quick", False), retune=req.get("retune", False))


# ============================================================================ the run (parent side)

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


def select_ops(patterns: str, no_peers: bool, no_decode: bool, cases: list = OPS) -> list:
    """The cases whose names match one of the comma-separated names or globs (all when
    none), in registry order; no_peers drops fla's and TFLA's, no_decode the decoding steps."""
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in cases
            if (not pats or any(c.name == p or fnmatch.fnmatchcase(c.name, p) for p in pats))
            and not (no_peers and c.family in ("fla", "tfla")) and not (no_decode and c.decode)]


def plan_rows(specs, Ts, Ds, tokens, H=HEADS) -> list:
    """(case, shape) in order of importance: the first (T, D) for every op, then the
    decoding steps, then the other T at the first D, then the other D."""
    train = [s for s in specs if not s.decode]
    shapes = [Shape(max(1, tokens // T), T, H, D) for D in Ds for T in Ts]
    plan = [(sp, shapes[0]) for sp in train]
    plan += [(sp, Shape(B, 1, H, DECODE_D)) for sp in specs if sp.decode for B in DECODE_B]
    plan += [(sp, sh) for sh in shapes[1:] for sp in train]
    return plan


def _notes(specs, missing, args) -> list:
    notes = ["forward timed with inputs that require grad; fwd+bwd = torch.autograd.grad of o with a "
             "random cotangent; our ops with backend='triton'",
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
    return notes


def main(argv=None, machine: Machine | None = None) -> int:
    """`linattn bench` (see the module's docstring); machine: what the run asks of the
    machine (tests pass fakes)."""
    machine = machine or Machine()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        from .runner import serve_requests
        return serve_requests(measure_request)
    specs = select_ops(args.ops, args.no_peers, args.no_decode)
    if args.list:
        for s in OPS:
            print(f"{s.name:<40} {s.family:<5} {s.variant}")
        return 0
    if not specs:
        print(f"linattn bench: no op matches --ops {args.ops!r} (see --list)", file=sys.stderr)
        return EXIT_NO_GPU
    gpu = machine.gpu_name()
    if gpu is None:
        import torch
        print("linattn bench needs a CUDA GPU, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing was measured.",
              file=sys.stderr)
        return EXIT_NO_GPU
    Ts = _ints(args.T, QUICK_T if args.quick else DEFAULT_T)
    Ds = _ints(args.D, QUICK_D if args.quick else DEFAULT_D)
    t0 = time.monotonic()
    deadline = t0 + args.budget if args.budget is not None else float("inf")
    missing = {n: why for n in dict.fromkeys(s.needs for s in specs if s.needs)
               if (why := machine.why_missing(n))}
    date = _dt.date.today().isoformat()
    stem = f"bench-{report.slug(gpu)}-{date}"
    out_dir = Path(args.out)
    print(f"linattn bench on {gpu}: measuring the ceilings ...", flush=True)
    result = {"gpu": gpu, "date": date, "command": " ".join(["linattn bench"] + argv),
              "versions": versions(), "ceilings": machine.ceilings(args.quick),
              "config": {"tokens": args.tokens, "H": HEADS, "T": list(Ts), "D": list(Ds),
                         "decode_B": list(DECODE_B), "chunk_for_flops": CHUNK, "timeout_s": args.timeout,
                         "budget_s": args.budget, "jobs": args.jobs},
              "notes": _notes(specs, missing, args), "rows": []}
    c = result["ceilings"]
    print(f"copy {c['copy_TBps']:.2f} TB/s, bf16 matmul {c['matmul_TFLOPs']:.0f} TFLOP/s; "
          f"versions {json.dumps(result['versions'])}", flush=True)
    pool = machine.pool(None if args.inprocess else WORKER_ARGV, measure_request)
    warm = args.jobs > 0 and not args.inprocess
    warmed, retuned = set(), set()

    def prepare(job) -> dict:
        """Warms up every op at this row's D (once per D and kind) before its first row;
        after a parallel warm-up, an op's first timed row per D tunes again alone."""
        spec, shape = job.spec
        group = (shape.D, spec.decode)
        if warm and group not in warmed:
            warmed.add(group)
            todo = [s.name for s in specs if s.decode == spec.decode and s.needs not in missing]
            print(f"compile warm-up at {shape.label}: {len(todo)} ops, {args.jobs} at a time", flush=True)
            took = warm_up(pool, todo, lambda op: {**job.request, "op": op, "warm": True},
                           jobs=args.jobs, timeout=args.timeout, deadline=deadline, retry_alone=True)
            result.setdefault("warmup_s", {}).update({f"{op}@D{shape.D}": s for op, s in took.items()})
        key = (spec.name, shape.D, spec.decode)
        if group in warmed and args.jobs > 1 and key not in retuned:
            retuned.add(key)
            return {"retune": True}
        return {}

    plan = []
    for spec, shape in plan_rows(specs, Ts, Ds, args.tokens):
        row = {"op": spec.name, "family": spec.family, "variant": spec.variant, "decode": spec.decode,
               "B": shape.B, "T": shape.T, "H": shape.H, "D": shape.D, "shape": shape.label}
        row.update(floors(spec, shape, c["copy_TBps"], c["matmul_TFLOPs"]))
        request = {"op": spec.name, "B": shape.B, "T": shape.T, "H": shape.H, "D": shape.D,
                   "seed": args.seed, "quick": args.quick}
        plan.append(Job(spec.name, row, request, spec.needs, spec=(spec, shape)))

    def on_row(row):
        result["rows"].append(row)
        print(report.ops_table([row]).splitlines()[-1], flush=True)
        report.write_outputs(result, out_dir, stem, final=False)

    def finish():
        result["wall_s"] = time.monotonic() - t0
        report.write_outputs(result, out_dir, stem, final=True)
        print(f"\nwrote {out_dir / stem}.json, .md, .png ({result['wall_s']:.0f} s)\n", flush=True)
        print(report.ops_table(result["rows"]), flush=True)

    run_rows(plan, pool, missing=missing, timeout=args.timeout, deadline=deadline, on_row=on_row,
             finish=finish, prepare=prepare)
    return 0
