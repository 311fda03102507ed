"""Speed of non-causal linear attention for vision, against SDPA, on one GPU.

    python benchmarks/vision_bench.py --out $OUT            # H100: ~2-3 minutes
    python benchmarks/vision_bench.py --device cpu --grids 8x8 --reps 1   # a smoke run

Rows, each forward and forward+backward, bf16, batch 1, square-ish grids of H x W tokens
(128x128 = 16K, 128x256 = 32K, 256x256 = 64K):
    op     linattn.linear_attention(causal=False) [1, T, heads, head_dim] vs
           scaled_dot_product_attention(is_causal=False) on the same q, k, v
    layer  the vision mixers of linattn.vision (mala, lit, linear; d_model wide, their
           projections and convolutions included) vs the softmax mixer (SDPA) of the same width
Times are medians of triton.testing.do_bench on CUDA (perf_counter medians elsewhere).
Writes vision_bench.json (rows, GPU, versions) into --out and prints a markdown table with
each row's speed-up over SDPA.

When to run it: through benchmarks/vision_gpu.sh after a change to the non-causal path or
the vision mixers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _timer(device: str, reps: int):
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=5 * reps, rep=25 * reps, return_mode="median")

    def cpu(fn):
        fn()
        times = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu


def _pair(fwd, params):
    """(forward, forward+backward) closures; params: tensors that receive gradients."""
    def fwdbwd():
        out = fwd()
        grads = torch.autograd.grad(out, params, torch.ones_like(out))
        return grads

    return fwd, fwdbwd


def op_rows(grid, heads, head_dim, device, dtype, timer):
    T = grid[0] * grid[1]
    from linattn import linear_attention

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, T, heads, head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    qp, kp = F.elu(q.detach()) + 1, F.elu(k.detach()) + 1  # positive features, as the mixers use
    qp.requires_grad_()
    kp.requires_grad_()
    cases = {
        "linear_attention(causal=False)": lambda: linear_attention(qp, kp, v, scale=1.0 / T, causal=False)[0],
        "sdpa(is_causal=False)": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2),
    }
    params = {"linear_attention(causal=False)": [qp, kp, v], "sdpa(is_causal=False)": [q, k, v]}
    return [_row("op", name, grid, heads, head_dim, *_pair(fn, params[name]), timer) for name, fn in cases.items()]


def layer_rows(grid, d_model, device, dtype, timer, mixers=("mala", "lit", "linear", "attention")):
    from linattn.vision.mixers import make_mixer

    T = grid[0] * grid[1]
    x = torch.randn(1, T, d_model, device=device, dtype=dtype, requires_grad=True)
    rows = []
    for name in mixers:
        torch.manual_seed(0)
        m = make_mixer(name, d_model, 0 if name == "lit" else d_model // 64).to(device=device, dtype=dtype)
        params = [x, *m.parameters()]
        rows.append(_row("layer", name, grid, m.n_heads, m.head_dim, *_pair(lambda m=m: m(x, grid), params), timer))
        del m
    return rows


def _row(kind, name, grid, heads, head_dim, fwd, fwdbwd, timer):
    row = {"kind": kind, "name": name, "grid": f"{grid[0]}x{grid[1]}", "tokens": grid[0] * grid[1],
           "heads": heads, "head_dim": head_dim}
    try:
        row["fwd_ms"] = timer(fwd)
        row["fwdbwd_ms"] = timer(fwdbwd)
    except torch.OutOfMemoryError as e:  # SDPA's math fallback at 64K on a small card
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def speedups(rows):
    """Adds "fwd_speedup"/"fwdbwd_speedup" (the SDPA row's time / this row's) to each row of
    the same kind and grid."""
    for r in rows:
        base = next((b for b in rows if b["kind"] == r["kind"] and b["grid"] == r["grid"]
                     and b["name"] in ("sdpa(is_causal=False)", "attention") and "fwd_ms" in b), None)
        if base is not None and "fwd_ms" in r:
            r["fwd_speedup"] = base["fwd_ms"] / r["fwd_ms"]
            r["fwdbwd_speedup"] = base["fwdbwd_ms"] / r["fwdbwd_ms"]
    return rows


def table(rows) -> str:
    lines = ["| kind | name | grid (tokens) | heads x dim | fwd ms | fwd+bwd ms | fwd vs SDPA | fwd+bwd vs SDPA |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['name']} | {r['grid']} ({r['tokens']}) | {r['heads']}x{r['head_dim']} "
                         f"| {r['error']} | | | |")
            continue
        lines.append(f"| {r['kind']} | {r['name']} | {r['grid']} ({r['tokens']}) | {r['heads']}x{r['head_dim']} "
                     f"| {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {r.get('fwd_speedup', float('nan')):.2f}x "
                     f"| {r.get('fwdbwd_speedup', float('nan')):.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default="128x128,128x256,256x256", help="H x W token grids, comma separated")
    p.add_argument("--heads", type=int, default=8, help="op rows: heads (head dim --head-dim)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--d-model", type=int, default=512, help="layer rows: width (heads of 64; lit: 2 heads)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--reps", type=int, default=4, help="do_bench warmup 5x and rep 25x this (ms)")
    p.add_argument("--out", default="benchmarks/results", help="directory of vision_bench.json")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("vision_bench: no CUDA GPU (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    dtype = getattr(torch, a.dtype)
    timer = _timer(a.device, a.reps)
    rows = []
    for g in a.grids.split(","):
        grid = tuple(int(s) for s in g.lower().split("x"))
        rows += op_rows(grid, a.heads, a.head_dim, a.device, dtype, timer)
        rows += layer_rows(grid, a.d_model, a.device, dtype, timer)
    speedups(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    meta = {"gpu": gpu, "torch": torch.__version__, "dtype": a.dtype, "argv": sys.argv[1:] if argv is None else argv}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    (out / "vision_bench.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"{gpu}, {a.dtype}, batch 1")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
