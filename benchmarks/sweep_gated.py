"""Launch-setting sweep of the gated-family Triton kernels: chunk L, tile BT, warps, stages.

For each op kind and each combination, times forward and forward+backward (median of
triton.testing.do_bench) at the bench shape (bf16, B*T = 65536, T = 8192, H = 16, D = 128)
and checks the outputs and gradients against the default settings' (max abs difference),
so a faster setting that changes results shows up. Not a benchmark for claims (no peers):
it picks the defaults in gated_api._config, which `linattn bench` then measures.

    PYTHONPATH=. python3 benchmarks/sweep_gated.py --json $OUT/sweep_gated.json
    PYTHONPATH=. python3 benchmarks/sweep_gated.py --kinds none,key --chunks 64,128 --warps 4
    PYTHONPATH=. python3 benchmarks/sweep_gated.py --chunks 128 --warps 4 --stages 2 --dqk-bk 64,128 --dqk-warps 4,8
    TRITON_INTERPRET=1 python3 benchmarks/sweep_gated.py --smoke     # CPU, tiny, wall clock

When to run it: on a new GPU, a new Triton version, or before changing a launch choice of
the gated-family kernels (gated_api's config); the winners go there and `linattn bench`
confirms them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import time_gated  # noqa: E402

from linattn.ops.triton import gated_api  # noqa: E402


SETTINGS = ("chunk", "tile", "warps", "scan_warps", "stages", "dqk_bk", "dqk_warps", "score_warps",
            "scan_stages", "fwd_cap", "bwd_cap")
DEFAULTS = (None,) * len(SETTINGS)
# each setting's column in the table printed last: (label, width)
LABELS = dict(chunk=("L", 4), tile=("BT", 4), warps=("warps", 5), scan_warps=("scan", 4),
              stages=("stg", 3), dqk_bk=("dqkBK", 5), dqk_warps=("dqkW", 4),
              score_warps=("scW", 4), scan_stages=("scSt", 4), fwd_cap=("fCap", 4),
              bwd_cap=("bCap", 4))


def use_settings(chunk, tile, warps, scan_warps, stages, dqk_bk=None, dqk_warps=None,
                 score_warps=None, scan_stages=None, fwd_cap=None,
                 bwd_cap=None) -> gated_api.Override:
    """These settings (None: the default) as a gated_api.Override for the ops."""
    repl = {k: v for k, v in dict(warps=warps, scan_warps=scan_warps, stages=stages,
                                  BKQ=dqk_bk, dqk_warps=dqk_warps, score_warps=score_warps,
                                  scan_stages=scan_stages, fwd_scan_maxnreg=fwd_cap,
                                  bwd_scan_maxnreg=bwd_cap).items()
            if v is not None}
    return gated_api.Override(chunk=chunk, tile=tile, fields=tuple(repl.items()))


def timed(fn, smoke):
    """Median milliseconds of fn: do_bench on CUDA, wall clock of 3 runs in the interpreter."""
    if not smoke:
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run_kind(kind, ins, settings, smoke):
    """(fwd ms, fwd+bwd ms, [o, grads...]) of one kind under the settings."""
    fn = time_gated.op(kind, use_settings(*settings))
    leaves = list(ins.values())
    do = torch.ones_like(ins["v"])

    def fwd():
        with torch.no_grad():
            fn(**ins)

    def fwd_bwd():
        o, _ = fn(**ins)
        return torch.autograd.grad(o, leaves, do)

    o, _ = fn(**ins)
    outs = [o.detach().float()] + [g.float() for g in fwd_bwd()]   # also compiles
    return timed(fwd, smoke), timed(fwd_bwd, smoke), outs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="none,scalar,key,mlstm_sig,mlstm_exp")
    p.add_argument("--chunks", default="64,128,256")
    p.add_argument("--tiles", default="default", help="BT values, or 'default' (64)")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--scan-warps", default="4")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--dqk-bk", default="default", help="K block of bwd_dqk ('default': the K block)")
    p.add_argument("--dqk-warps", default="default", help="warps of bwd_dqk ('default': --warps)")
    p.add_argument("--score-warps", default="default", help="warps of key_scores (per-key gates)")
    p.add_argument("--scan-stages", default="default", help="num_stages of the state scans")
    p.add_argument("--fwd-cap", default="default", help="fwd_states' register cap (0: none)")
    p.add_argument("--bwd-cap", default="default", help="bwd_states' register cap (0: none)")
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting combinations after this")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="interpreter on the CPU, tiny shape")
    args = p.parse_args(argv)
    ints = lambda s: [None if x == "default" else int(x) for x in s.split(",")]  # noqa: E731
    if args.smoke:
        dev, dtype, B, T, H, D = "cpu", torch.float32, 1, 96, 1, 16
        args.chunks, args.warps, args.stages, args.tiles = "32,64", "4", "1", "16"
    else:
        dev, dtype, H, D = "cuda", torch.bfloat16, 16, 128
        T, B = args.T, args.tokens // args.T
    combos = list(itertools.product(ints(args.chunks), ints(args.tiles), ints(args.warps),
                                    ints(args.scan_warps), ints(args.stages), ints(args.dqk_bk),
                                    ints(args.dqk_warps), ints(args.score_warps),
                                    ints(args.scan_stages), ints(args.fwd_cap), ints(args.bwd_cap)))
    start, rows = time.perf_counter(), []
    for kind in args.kinds.split(","):
        ins = time_gated.make(kind, B, T, H, D, dev, dtype)
        _, _, ref = run_kind(kind, ins, DEFAULTS, args.smoke)
        for combo in combos:
            row = dict(kind=kind, **dict(zip(SETTINGS, combo)))
            if time.perf_counter() - start > args.budget_s:
                row["error"] = "skipped: budget"
            else:
                try:
                    tf, tfb, outs = run_kind(kind, ins, combo, args.smoke)
                    diff = max((a - b).abs().max().item() for a, b in zip(outs, ref))
                    row.update(fwd_ms=round(tf, 3), fwd_bwd_ms=round(tfb, 3), max_diff_vs_default=diff)
                except Exception as e:  # a setting that does not compile or fit is a row
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(shape=dict(B=B, T=T, H=H, D=D, dtype=str(dtype)),
                                                   rows=rows), indent=1))
    print("\n" + f"{'kind':<10} " + " ".join(f"{LABELS[k][0]:>{LABELS[k][1]}}" for k in SETTINGS)
          + f" {'fwd ms':>8} {'fwd+bwd':>8}  diff")
    for r in rows:
        if "error" in r:
            continue
        print(f"{r['kind']:<10} " + " ".join(f"{str(r[k]):>{LABELS[k][1]}}" for k in SETTINGS)
              + f" {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>8.3f}  {r['max_diff_vs_default']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
