"""Where the time goes: one CUDA profiler pass per op (bf16, B=8, T=8192, H=16, D=128).

For each gated-family kind (none, const, scalar, key, mlstm_sig, mlstm_exp) and both delta
variants: one warm-up forward+backward (compile), then 3 under torch.profiler; prints the
per-kernel table (self device time, averaged over the 3 steps) and writes it as JSON.
Not a benchmark (no peers, profiler overhead): `linattn bench` is where claims come from.

    PYTHONPATH=. python3 benchmarks/profile_kernels.py --json $OUT/profile.json [--kinds none,delta]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_delta  # noqa: E402
import time_gated  # noqa: E402

import linattn  # noqa: E402

GATED = ["none", "const", "scalar", "key", "mlstm_sig", "mlstm_exp"]
DELTA = ["delta", "gated_delta"]
STEPS = 3


def fwd_bwd_step(kind: str, B: int, T: int, H: int, D: int):
    """A closure running one forward+backward of `kind` on fixed bf16 inputs."""
    if kind in DELTA:
        q, k, v, beta, g = time_delta.make_inputs(B, T, H, D, kind == "gated_delta", torch.bfloat16)
        leaves = [x.requires_grad_() for x in (q, k, v, beta, g) if x is not None]
        do = torch.randn_like(v)
        return lambda: torch.autograd.grad(
            linattn.delta_rule(q, k, v, beta, g, backend="triton")[0], leaves, do)
    ins = time_gated.make(kind, B, T, H, D, "cuda", torch.bfloat16)
    fn = time_gated.op(kind)
    leaves = list(ins.values())
    do = torch.randn_like(ins["v"])
    return lambda: torch.autograd.grad(fn(**ins)[0], leaves, do)


def profile_one(kind: str, B: int, T: int, H: int, D: int) -> list[dict]:
    step = fwd_bwd_step(kind, B, T, H, D)
    step()
    torch.cuda.synchronize()
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
    return rows


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
            rows = profile_one(kind, args.B, args.T, args.H, args.D)
        except Exception as e:  # report and go on with the other kinds
            print(f"== {kind}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            result[kind] = {"error": f"{type(e).__name__}: {e}"}
            continue
        total = sum(r["ms_per_step"] for r in rows)
        result[kind] = {"total_ms": total, "kernels": rows}
        print(f"== {kind}: {total:.2f} ms of kernels per fwd+bwd", flush=True)
        for r in rows[:10]:
            print(f"  {r['ms_per_step']:8.3f} ms  x{r['calls_per_step']:<4g} {r['kernel'][:90]}")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(shape=vars(args), result=result), indent=1))


if __name__ == "__main__":
    main()
