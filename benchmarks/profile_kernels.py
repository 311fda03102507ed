"""Where the time goes: one CUDA profiler pass per op (bf16, B=8, T=8192, H=16, D=128).

For each gated-family kind (none, const, const_frozen, scalar, key, mlstm_sig, mlstm_exp) and
both delta variants: one warm-up forward+backward (compile), then 3 under torch.profiler;
prints the per-kernel table (self device time, averaged over the 3 steps) and writes it as
JSON. Beside it, without the profiler: the host's time to enqueue one step (cpu_ms), the wall
time of back-to-back steps (wall_ms; near cpu_ms and above the kernels' sum when the host is
the bottleneck), and the operations that synchronise with the device (torch's sync debug
mode), which would stall the queue.
Not a benchmark (no peers, profiler overhead): `linattn bench` is where claims come from.

    PYTHONPATH=. python3 benchmarks/profile_kernels.py --json $OUT/profile.json [--kinds none,delta]

When to run it: when `linattn bench` shows a kernel change moved an op's time, to see which
kernel moved (and before a launch sweep, to pick the kernel to sweep).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_delta  # noqa: E402
import time_gated  # noqa: E402

import linattn  # noqa: E402

GATED = ["none", "const", "const_frozen", "scalar", "key", "mlstm_sig", "mlstm_exp"]
DELTA = ["delta", "gated_delta"]
STEPS = 3


def fwd_bwd_step(kind: str, B: int, T: int, H: int, D: int, config=None):
    """A closure running one forward+backward of `kind` on fixed bf16 inputs. A kind with a
    dot is an op of `linattn bench` (e.g. fla.chunk_delta_rule: a peer's kernels, profiled
    on the bench's inputs). config: the delta rule's launch choices
    (linattn.ops.triton.delta_config.DeltaConfig; None: the device's)."""
    if "." in kind:
        from linattn.bench.op_cases import OPS_BY_NAME, Shape
        gen = torch.Generator(device="cuda")
        gen.manual_seed(0)
        inputs, fn = OPS_BY_NAME[kind].build(Shape(B, T, H, D), gen)
        leaves = [x for x in inputs if x.requires_grad]

        def step():
            out = fn()
            out = out[0] if isinstance(out, (tuple, list)) else out
            return torch.autograd.grad(out, leaves, torch.ones_like(out))
        return step
    if kind in DELTA:
        q, k, v, beta, g = time_delta.make_inputs(B, T, H, D, kind == "gated_delta", torch.bfloat16)
        leaves = [x.requires_grad_() for x in (q, k, v, beta, g) if x is not None]
        do = torch.randn_like(v)
        from linattn.ops.triton import delta_api
        return lambda: torch.autograd.grad(
            delta_api.delta_rule(q, k, v, beta, g, scale=D ** -0.5, config=config)[0], leaves, do)
    frozen = kind == "const_frozen"                       # the decay needs no gradient
    kind = "const" if frozen else kind
    ins = time_gated.make(kind, B, T, H, D, "cuda", torch.bfloat16)
    fn = time_gated.op(kind)
    if frozen:
        ins["g"] = ins["g"].detach()
    leaves = [x for x in ins.values() if x.requires_grad]
    do = torch.randn_like(ins["v"])
    return lambda: torch.autograd.grad(fn(**ins)[0], leaves, do)


def host_timing(step, reps: int = 10) -> dict:
    """cpu_ms: host time to enqueue one step; wall_ms: per step of `reps` back to back; syncs:
    the first few device synchronisations one step makes (torch.cuda sync debug mode)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]
    return dict(cpu_ms=(t1 - t0) * 1e3 / reps, wall_ms=(t2 - t0) * 1e3 / reps,
                n_syncs=len(syncs), syncs=syncs[:5])


def profile_one(kind: str, B: int, T: int, H: int, D: int,
                config=None) -> tuple[list[dict], dict]:
    step = fwd_bwd_step(kind, B, T, H, D, config)
    step()
    torch.cuda.synchronize()
    host = host_timing(step)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = ev.self_cuda_time_total
        if us > 0:
            rows.append(dict(kernel=ev.key, ms_per_step=us / 1e3 / STEPS, calls_per_step=ev.count / STEPS))
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows, host


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """--B --T --H --D (the bench's shape by default) and --json, for this and sweep_delta.py."""
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--json", default=None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default=",".join(GATED + DELTA))
    add_shape_args(ap)
    args = ap.parse_args()
    result = {}
    for kind in args.kinds.split(","):
        try:
            rows, host = profile_one(kind, args.B, args.T, args.H, args.D)
        except Exception as e:  # report and go on with the other kinds
            print(f"== {kind}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            result[kind] = {"error": f"{type(e).__name__}: {e}"}
            continue
        total = sum(r["ms_per_step"] for r in rows)
        result[kind] = {"total_ms": total, **host, "kernels": rows}
        print(f"== {kind}: {total:.2f} ms of kernels per fwd+bwd; host enqueue {host['cpu_ms']:.2f}, "
              f"wall {host['wall_ms']:.2f} ms per step, {host['n_syncs']} syncs {host['syncs'][:2]}",
              flush=True)
        for r in rows[:10]:
            print(f"  {r['ms_per_step']:8.3f} ms  x{r['calls_per_step']:<4g} {r['kernel'][:90]}")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(shape=vars(args), result=result), indent=1))


if __name__ == "__main__":
    main()
