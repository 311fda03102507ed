"""Sequence-parallel (LASP-2) scaling of linear attention on NCCL: 1 GPU vs 2 GPUs.

    python benchmarks/sp_scaling.py --out benchmarks/results/sp_scaling.json

Spawns one process per GPU (NCCL, loopback rendezvous; NCCL_NVLS_ENABLE=0). First a
correctness check on NCCL: the sequence-parallel ops (linear attention with scalar and
per-key gates, the gated delta rule; initial and final states; uneven slices) against the
single-GPU op on the whole sequence in float32, both measured against the float64 reference
(backend="reference"); the sequence-parallel error must stay within 3x the single-GPU error
plus 1e-5. Then, for each case (--cases: linear_attention with a scalar, per-key or no
gate; the gated delta rule) and one sequence (B = 1) of each length, forward+backward
(H=16, D=128, bfloat16; inputs as benchmarks/sp_rank_sim.py makes them):

    1 GPU:  every rank runs the plain op on the whole sequence on its own GPU (rank 0's time)
    W GPUs: linattn.parallel's op (linear_attention_on / delta_rule_on over the default
            group, which linattn.parallel.linear_attention / delta_rule call), each rank one
            slice (the slowest rank's time)

and prints a table with the scaling efficiency time_1 / (W * time_W), writing everything
(with GPU, versions and date) to --out as JSON.

When to run it: on two GPUs after a change to linattn/parallel; it is the source of
BENCHMARKS.md's sequence-parallel table.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from datetime import datetime, timezone

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from sp_rank_sim import make_inputs  # noqa: E402  (this folder: the same inputs as the simulation)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288, 1048576])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--world", type=int, default=2, help="GPUs for the sequence-parallel run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--backend", default="auto", help="the local op's backend")
    p.add_argument("--cases", nargs="+", default=["scalar", "key", "none", "delta"],
                   choices=["scalar", "key", "none", "delta"],
                   help="linear attention with a scalar / per-key / no gate; the gated delta rule")
    p.add_argument("--sums", default="auto", choices=["auto", "triton", "torch"],
                   help="the ranks' passes over time (linattn.parallel.lasp): torch = chunked PyTorch")
    p.add_argument("--skip-check", action="store_true", help="skip the NCCL correctness check")
    p.add_argument("--profile", action="store_true",
                   help="also profile one fwd+bwd at the first length and case: per-kernel time, 1 GPU vs a rank")
    p.add_argument("--out", default="benchmarks/results/sp_scaling.json")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- correctness

def _inputs(case, T, H, D, gen, device):
    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(device)

    x = dict(q=rn(1, T, H, D), k=rn(1, T, H, D), v=rn(1, T, H, D))
    if case == "delta":
        x["k"] = torch.nn.functional.normalize(x["k"], dim=-1)
        x["beta"] = (torch.rand(1, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05).to(device)
    gshape = (1, T, H, D) if case == "key" else (1, T, H)
    x["g"] = (-torch.rand(*gshape, generator=gen, dtype=torch.float64) * 0.5).to(device)
    x["initial_state"] = rn(1, H, D, D)
    return x


def _run(fn, x, do, dfin, dtype, sl=None, **kw):
    """Forward+backward of fn on x (sliced along time by sl); returns (o, final, grads)."""
    leaves = {}
    for n, t in x.items():
        t = t if (sl is None or n == "initial_state") else t[:, sl]
        t = t.to(dtype if n in ("q", "k", "v") else (torch.float64 if dtype == torch.float64 else torch.float32))
        leaves[n] = t.detach().requires_grad_(True)
    o, st = fn(**leaves, output_final_state=True, **kw)
    ((o.double() * (do if sl is None else do[:, sl])).sum() + (st.double() * dfin).sum()).backward()
    return o.detach().double(), st.detach().double(), {n: t.grad.double() for n, t in leaves.items()}


def correctness_check(rank, world, backend, device, lengths=None, H=2, D=64):
    """Rank's errors against the float64 reference, SP vs single-GPU op; raises when off."""
    import linattn
    import linattn.parallel as sp

    lengths = lengths or [333, 190, 257, 101][:world] + [77] * max(0, world - 4)
    T = sum(lengths)
    start = sum(lengths[:rank])
    sl = slice(start, start + lengths[rank])
    report = []
    for case in ("scalar", "key", "delta"):
        gen = torch.Generator().manual_seed(7)
        x = _inputs(case, T, H, D, gen, device)
        do = torch.randn(1, T, H, D, generator=gen, dtype=torch.float64).to(device)
        dfins = [torch.randn(1, H, D, D, generator=gen, dtype=torch.float64).to(device) for _ in range(world)]
        single, par = (linattn.delta_rule, sp.delta_rule) if case == "delta" else \
            (linattn.linear_attention, sp.linear_attention)
        ref = _run(single, x, do, sum(dfins), torch.float64, backend="reference")
        one = _run(single, x, do, sum(dfins), torch.float32, backend=backend)
        mine = _run(par, x, do, dfins[rank], torch.float32, sl=sl, backend=backend)

        def errs(res, cut):
            o, st, gr = res
            e = {"o": (o - ref[0][:, sl] if cut else o[:, sl] - ref[0][:, sl]).abs().max().item(),
                 "final_state": (st - ref[1]).abs().max().item()}
            for n, gd in gr.items():
                r = ref[2][n]
                if n == "initial_state":
                    if rank != 0:
                        continue
                else:
                    r = r[:, sl]
                    gd = gd if cut else gd[:, sl]
                e["d" + n] = (gd - r).abs().max().item()
            return e

        e_one, e_sp = errs(one, False), errs(mine, True)
        for name, es in e_sp.items():
            ok = es <= 3 * e_one[name] + 1e-5
            report.append(dict(case=case, rank=rank, value=name, err_sp=es, err_single=e_one[name], ok=ok))
    bad = [r for r in report if not r["ok"]]
    if bad:
        raise AssertionError(f"rank {rank}: sequence-parallel result off on NCCL: {bad}")
    return report


# ----------------------------------------------------------------------------- timing

def _ops(case, args):
    """(1-GPU fn, sequence-parallel fn) of a case, each fn(**inputs) -> (o, state); the
    sequence-parallel one is linattn.parallel's op over the default group (what
    linattn.parallel.linear_attention / delta_rule run), with --sums."""
    import linattn
    from linattn.parallel import lasp
    from linattn.parallel.comm import ProcessGroupComm

    single = linattn.delta_rule if case == "delta" else linattn.linear_attention
    on = lasp.delta_rule_on if case == "delta" else lasp.linear_attention_on

    def one(**x):
        return single(**x, backend=args.backend)

    def par(**x):
        return on(ProcessGroupComm(), **x, backend=args.backend, sums=args.sums)
    return one, par


def _time_fwd_bwd(fn, case, T, H, D, device, warmup, iters, distributed):
    """Median seconds of forward+backward of fn on one sequence of T tokens (sp_rank_sim's
    inputs for the case: bf16 q, k, v, float32 gates, all requiring grad)."""
    x, do = make_inputs(case, T, H, D, device, seed=1)
    times = []
    for it in range(warmup + iters):
        for t in x.values():
            t.grad = None
        torch.cuda.synchronize()
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        o, _ = fn(**x)
        o.backward(do)
        torch.cuda.synchronize()
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _slice_len(T, world, rank):
    return T // world + (1 if rank < T % world else 0)


def _profile(world, rank, args, device):
    """Per-kernel device time (top 15) of one fwd+bwd at the first length and case: the
    single-GPU op on the whole sequence, and this rank's sequence-parallel slice."""
    from torch.profiler import ProfilerActivity, profile

    T, H, D, case = args.lengths[0], args.heads, args.dim, args.cases[0]
    one, par = _ops(case, args)
    out = {}
    for name, fn, n, distributed in (("1gpu", one, T, False),
                                     ("sp", par, _slice_len(T, world, rank), True)):
        if distributed:
            dist.barrier()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _time_fwd_bwd(fn, case, n, H, D, device, 0, 1, distributed)
        rows = []
        for ev in prof.key_averages():
            us = getattr(ev, "self_device_time_total", None)
            us = ev.self_cuda_time_total if us is None else us
            if us > 0:
                rows.append(dict(kernel=ev.key, ms=us / 1e3, calls=ev.count))
        out[name] = sorted(rows, key=lambda r: -r["ms"])[:15]
    return out


def _worker(rank, world, port, args, queue):
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=device)
    try:
        result = {"check": None, "rows": []}
        if not args.skip_check:
            result["check"] = correctness_check(rank, world, args.backend, device)
            dist.barrier()
        H, D = args.heads, args.dim
        for case in args.cases:
            one, par = _ops(case, args)
            for T in args.lengths:
                t1 = _time_fwd_bwd(one, case, T, H, D, device, args.warmup, args.iters,
                                   distributed=False)
                torch.cuda.empty_cache()
                dist.barrier()
                tw = _time_fwd_bwd(par, case, _slice_len(T, world, rank), H, D, device,
                                   args.warmup, args.iters, distributed=True)
                torch.cuda.empty_cache()
                slowest = torch.tensor([tw], device=device, dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                result["rows"].append(dict(case=case, T=T, ms_1gpu=t1 * 1e3,
                                           ms_sp=slowest.item() * 1e3,
                                           efficiency=t1 / (world * slowest.item())))
        if args.profile:
            result["profile"] = _profile(world, rank, args, device)
        if rank == 0:
            queue.put(result)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    if torch.cuda.device_count() < args.world:
        raise SystemExit(f"needs {args.world} CUDA GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(args.world, port, args, queue), nprocs=args.world, join=True)
    result = queue.get()

    if result["check"] is not None:
        worst = max(result["check"], key=lambda r: r["err_sp"] / (3 * r["err_single"] + 1e-5))
        print(f"NCCL correctness check passed (rank 0, {len(result['check'])} values; tightest: "
              f"{worst['case']} {worst['value']} err {worst['err_sp']:.2e} vs single {worst['err_single']:.2e})")
    W = args.world
    print(f"\nB=1 H={args.heads} D={args.dim} bf16, fwd+bwd, backend={args.backend}, sums={args.sums} "
          "(cases: linear_attention with a scalar / per-key / no gate; delta: the gated delta rule)")
    print(f"{'case':>6} | {'T':>9} | {'1 GPU ms':>9} | {W} GPUs ms | efficiency")
    for r in result["rows"]:
        print(f"{r['case']:>6} | {r['T']:>9} | {r['ms_1gpu']:>9.2f} | {r['ms_sp']:>9.2f} | {r['efficiency']:>9.1%}")

    for name, rows in (result.get("profile") or {}).items():
        print(f"\nprofile, {name}, {args.cases[0]} T={args.lengths[0]} (rank 0), one fwd+bwd:")
        for r in rows:
            print(f"  {r['ms']:8.3f} ms  x{r['calls']:<3} {r['kernel'][:90]}")

    import linattn
    out = dict(benchmark="sp_scaling", gpu=torch.cuda.get_device_name(0), world=W,
               torch=torch.__version__, linattn=linattn.__version__,
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"), args=vars(args), **result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
