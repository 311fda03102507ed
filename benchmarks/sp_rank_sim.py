"""One rank of a 2-GPU LASP-2 group on ONE GPU, against the plain op on the same slice.

    PYTHONPATH=$PWD python3 benchmarks/sp_rank_sim.py --out $OUT/sp_sim.json

A rank's work is simulated without NCCL: linattn.parallel.lasp's ops run over a
LoopbackComm(rank, 2), whose all-gathers return this rank's message for every rank, so the
rank does exactly its local work (its passes over time, the op on its slice with an incoming
state, the backward) without any communication. For each case (linear attention with a
scalar gate, a per-key gate, no gate; the gated delta rule) at B = 1, H = 16, D = 128, bf16,
and each slice length T, it times forward+backward (median of --iters runs after --warmup,
torch.cuda.synchronize around each) of:

    plain   linattn.linear_attention / linattn.delta_rule on the slice (q, k, v, gates
            requiring grad, as in the rank)
    rank r  the simulated rank r of W = 2 (--ranks, default 1), sums="auto" (the delta
            rule: its default form, "states")
    main    the rank with its passes over time on chunked float32 PyTorch sums
            (sums="torch") instead of the time-split Triton kernel, and for the delta rule
            form="twice"
    twice   (delta rule) form="twice" with the Triton sums: a forward on [0 | v] without
            autograd for (M, E) and o~, then the op from S_in with autograd
    once    (delta rule) form="once" with the Triton sums: the op once on [0 | v] with
            autograd

Rank 1 of 2 is the last rank: without --final it sends no pair (nobody reads it), so the
delta rule's "states" form runs only its transition pass (for o~) beside the op; with
--final (output_final_state=True) it also sends (M, E), the work of a middle rank of a
larger group.

and profiles one forward+backward of each (torch.profiler, top kernels by device time). The
bar (issue 29): rank / plain <= 1.15. Prints plain's and rank 1's top kernels per case, where
each rank's extra device time goes, then a table (ratio per case); writes everything
(every profile) to --out as JSON.

When to run it: on one GPU after a change to linattn/parallel (LASP-2) or to the ops' state
inputs, to see a rank's overhead over the plain op without a second GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

CASES = ("scalar", "delta", "key", "none")  # the two bars first


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--lengths", type=int, nargs="+", default=[65536, 262144, 524288],
                   help="slice lengths T (a length that runs out of memory is recorded and skipped)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1],
                   help="simulated ranks of W = 2 (rank 0 too: --ranks 1 0)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-main", action="store_true", help="skip main's form of the rank")
    p.add_argument("--no-twice", action="store_true", help="skip the delta rule's form='twice' rank")
    p.add_argument("--no-once", action="store_true", help="skip the delta rule's form='once' rank")
    p.add_argument("--final", action="store_true",
                   help="ranks return the final state (every rank sends its (M, E) pair)")
    p.add_argument("--top", type=int, default=15, help="kernels per profile (in the JSON)")
    p.add_argument("--out", default="benchmarks/results/sp_rank_sim.json")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (PyTorch paths)")
    return p.parse_args(argv)


def make_inputs(case, T, H, D, device, seed=0):
    """(names, tensors) of one slice: q, k, v bf16 [1, T, H, D] (unit keys), the case's gates
    in float32 (scalar [1, T, H] from logsigmoid(N(4, 1)), per key [1, T, H, D]; the delta
    rule: beta = sigmoid(N(0, 1)) and a scalar g), all requiring grad; do bf16."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, generator=gen, dtype=dtype)

    q, k, v = (rn(1, T, H, D, dtype=torch.bfloat16) for _ in range(3))
    k = F.normalize(k.float(), dim=-1).to(torch.bfloat16)
    x = dict(q=q, k=k, v=v)
    if case == "delta":
        x["beta"] = torch.sigmoid(rn(1, T, H))
        x["g"] = F.logsigmoid(rn(1, T, H) + 4)
    elif case == "scalar":
        x["g"] = F.logsigmoid(rn(1, T, H) + 4)
    elif case == "key":
        x["g"] = F.logsigmoid(rn(1, T, H, D) + 4)
    for t in x.values():
        t.requires_grad_(True)
    return x, rn(1, T, H, D, dtype=torch.bfloat16)


def op_fn(case, mode, rank=1, world=2, final=False):
    """fn(**inputs) -> (o, state): mode "plain" (the single-GPU op), "rank" (the simulated
    rank), "main" (its passes over time on PyTorch sums, the delta rule's form="twice"),
    "twice" / "once" (the delta rule's forms); final: the rank returns the final state."""
    import linattn
    from linattn.parallel import lasp
    from linattn.parallel.comm import LoopbackComm

    if mode == "plain":
        return linattn.delta_rule if case == "delta" else linattn.linear_attention
    kw = dict(sums="torch" if mode == "main" else "auto", output_final_state=final)
    if case == "delta" and mode in ("main", "twice", "once"):
        kw["form"] = "twice" if mode == "main" else mode
    fn = lasp.delta_rule_on if case == "delta" else lasp.linear_attention_on

    def run(**x):
        return fn(LoopbackComm(rank, world, record=False), **x, **kw)
    return run


def modes_of(case, args):
    """The simulated-rank modes timed for a case."""
    delta = case == "delta"
    return (["rank"] + ([] if args.no_main else ["main"])
            + (["twice"] if delta and not args.no_twice else [])
            + (["once"] if delta and not args.no_once else []))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, x, do, warmup, iters):
    """Median seconds of one forward+backward (fn(**x)[0].backward(do)), synchronized."""
    times = []
    for it in range(warmup + iters):
        for t in x.values():
            t.grad = None
        _sync(do.device)
        t0 = time.perf_counter()
        o, _ = fn(**x)
        o.backward(do)
        _sync(do.device)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_fwd_bwd(fn, x, do, top):
    """Top kernels (by self device time) of one forward+backward: [{kernel, ms, calls}]."""
    from torch.profiler import ProfilerActivity, profile

    for t in x.values():
        t.grad = None
    _sync(do.device)
    cuda = do.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        o, _ = fn(**x)
        o.backward(do)
        _sync(do.device)
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) if cuda else ev.self_cpu_time_total
        us = getattr(ev, "self_cuda_time_total", 0) if us is None else us
        if us > 0:
            rows.append(dict(kernel=ev.key, ms=us / 1e3, calls=ev.count))
    rows.sort(key=lambda r: -r["ms"])
    return dict(total_ms=sum(r["ms"] for r in rows), top=rows[:top])


def run_case(case, T, args, device):
    H, D = args.heads, args.dim
    x, do = make_inputs(case, T, H, D, device)
    row = dict(case=case, T=T)
    row["plain_ms"] = time_fwd_bwd(op_fn(case, "plain"), x, do, args.warmup, args.iters) * 1e3
    modes = modes_of(case, args)
    for r in args.ranks:
        for mode in modes:
            fn = op_fn(case, mode, r, final=args.final)
            ms = time_fwd_bwd(fn, x, do, args.warmup, args.iters) * 1e3
            row[f"{mode}{r}_ms"] = ms
            row[f"{mode}{r}_ratio"] = ms / row["plain_ms"]
    row["profile"] = {"plain": profile_fwd_bwd(op_fn(case, "plain"), x, do, args.top)}
    for r in args.ranks:
        for mode in modes:
            row["profile"][f"{mode}{r}"] = profile_fwd_bwd(op_fn(case, mode, r, final=args.final),
                                                           x, do, args.top)
    return row


def extra_kernels(row, name, n=5):
    """The kernels whose device time grew most from the plain op to profile `name`:
    [(kernel, extra ms)] (a kernel missing from a top list counts as 0 there)."""
    base = {r["kernel"]: r["ms"] for r in row["profile"]["plain"]["top"]}
    mine = {r["kernel"]: r["ms"] for r in row["profile"][name]["top"]}
    diff = [(k, ms - base.get(k, 0.0)) for k, ms in mine.items()]
    return sorted(diff, key=lambda d: -d[1])[:n]


def _print_profiles(row, names=("plain", "rank1"), n=8):
    for name in names:
        p = row["profile"].get(name)
        if p is None:
            continue
        print(f"  profile {row['case']} T={row['T']} {name}: {p['total_ms']:.2f} ms of kernels")
        for r in p["top"][:n]:
            print(f"    {r['ms']:9.3f} ms  x{r['calls']:<4} {r['kernel'][:96]}")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu for a smoke test)")
    import triton

    import linattn

    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    out = dict(benchmark="sp_rank_sim", gpu=gpu, torch=torch.__version__,
               triton=triton.__version__, linattn=linattn.__version__,
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"), args=vars(args),
               rows=[])
    rows = out["rows"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for case in args.cases:
        for T in args.lengths:
            try:
                row = run_case(case, T, args, device)
            except torch.cuda.OutOfMemoryError as e:
                row = dict(case=case, T=T, error=f"out of memory: {str(e).splitlines()[0]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            with open(args.out, "w") as f:  # after every case: a cut-off run keeps what it has
                json.dump(out, f, indent=1)
            if "error" in row:
                print(f"{case} T={T}: {row['error']}", flush=True)
                continue
            print(f"{case} T={T}: plain {row['plain_ms']:.2f} ms, " +
                  ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in row.items()
                            if k.endswith("_ms") and k != "plain_ms"), flush=True)
            _print_profiles(row)

    print("\nwhere a rank's extra device time goes (longest T of each case; kernel: ms over plain)")
    for case in args.cases:
        done = [r for r in rows if r["case"] == case and "error" not in r]
        if not done:
            continue
        row = done[-1]
        for name in row["profile"]:
            if name == "plain":
                continue
            extra = row["profile"][name]["total_ms"] - row["profile"]["plain"]["total_ms"]
            top = ", ".join(f"{k[:40]} {ms:+.2f}" for k, ms in extra_kernels(row, name, 3))
            print(f"  {case} T={row['T']} {name}: {extra:+.2f} ms in all; {top}")

    print(f"\nsimulated LASP-2 rank of W = 2 vs the plain op on the slice, B=1 H={args.heads} "
          f"D={args.dim} bf16, fwd+bwd ms ({gpu}){', final state' if args.final else ''}; "
          f"bar: rank/plain <= 1.15")
    cols = [f"{m}{r}" for r in args.ranks for m in ["rank", "main", "twice", "once"]
            if any(f"{m}{r}_ms" in row for row in rows)]
    print(f"{'case':>6} | {'T':>7} | {'plain':>8} | " + " | ".join(f"{c:>15}" for c in cols))
    for row in rows:
        if "error" in row:
            print(f"{row['case']:>6} | {row['T']:>7} | {row['error'][:60]}")
            continue
        cells = [f"{row[c + '_ms']:7.2f} {row[c + '_ratio']:5.2f}x" if c + "_ms" in row else "-"
                 for c in cols]
        print(f"{row['case']:>6} | {row['T']:>7} | {row['plain_ms']:8.2f} | " + " | ".join(f"{c:>15}" for c in cells))

    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
