"""Training throughput (tokens/s) of a 12-layer, d_model 768 causal LM, on one GPU.

Times full training steps (bf16 autocast forward, float32 cross-entropy over every token
through CausalLM.loss (the chunked linear + cross-entropy, as `linattn bench --models` does),
backward, AdamW step) at a constant number of tokens per step, for each model at each
sequence length, and records the peak memory. Models: Gated DeltaNet, GLA, mLSTMsig, mLSTM,
DeltaNet, Lightning, a 3:1 Gated DeltaNet / attention hybrid, and attention only (softmax,
SDPA). With --profile N it also profiles N steps of each row: the device's busy time beside
the wall time and the kernels with the most device time (where a step's time goes). One command,
time-boxed (--budget-s): rows it cannot reach are marked skipped, a row that fails (OOM,
compile error) records its error and the rest go on.

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json
    python benchmarks/train_throughput.py --smoke --out /tmp/tp.json     # CPU, toy size

When to run it: to reproduce BENCHMARKS.md's training-throughput table of these models; the
model-level comparison with the peers' layers is `linattn bench --models`.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from linattn.models import CausalLM, LMConfig  # noqa: E402
from linattn.train import format_table  # noqa: E402

MODELS = {
    "gated_deltanet": dict(mixer="gated_deltanet"),
    "gated_deltanet_recompute": dict(mixer="gated_deltanet", save_for_backward="recompute"),
    "gla": dict(mixer="gla"),
    "mlstm_sig": dict(mixer="mlstm_sig"),
    "mlstm": dict(mixer="mlstm"),
    "deltanet": dict(mixer="deltanet"),
    "lightning": dict(mixer="lightning"),
    "gated_deltanet 3:1 hybrid": dict(mixer="gated_deltanet", hybrid=3),
    "attention": dict(mixer="attention"),
}
FULL = dict(d_model=768, n_layers=12, n_heads=6, vocab=32000, seq_lens=[2048, 8192],
            tokens_per_step=16384, warmup=3, steps=10, device="cuda", budget_s=420.0)
# The MQAR sweep's model (benchmarks/mqar_sweep.py): small enough that launch and host costs,
# not the kernels' arithmetic, decide a step's time.
SMALL = dict(d_model=128, n_layers=4, n_heads=2, vocab=256, seq_lens=[256, 1024],
             tokens_per_step=32768, warmup=3, steps=20, device="cuda", budget_s=300.0)
SMOKE = dict(d_model=32, n_layers=4, n_heads=2, vocab=64, seq_lens=[64], tokens_per_step=128,
             warmup=1, steps=1, device="cpu", budget_s=120.0)


def time_model(name: str, arch: dict, T: int, s: dict, dev: torch.device) -> dict:
    """Tokens/s and peak memory of training steps of one model at sequence length T."""
    B = max(1, s["tokens_per_step"] // T)
    cfg = LMConfig(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=s["n_layers"],
                   n_heads=s["n_heads"], max_seq_len=T, **arch)
    torch.manual_seed(0)
    model = CausalLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, s["vocab"], (B, T + 1), generator=gen).to(dev)  # [B, T + 1]
    x, y = ids[:, :-1], ids[:, 1:]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = model.loss(x, y)  # float32 cross-entropy, logits never whole
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(s["warmup"]):  # compile + autotune
        step()
    sync()
    warm_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(s["steps"]):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    row = {"model": name, "seq_len": T, "batch": B, "layers": cfg.layer_pattern(),
           "parameters": sum(p.numel() for p in model.parameters()),
           "tokens_per_s": B * T * s["steps"] / dt, "ms_per_step": 1e3 * dt / s["steps"],
           "warmup_s": warm_s, "loss": float(loss.detach())}
    if dev.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if s.get("profile_steps"):
        row["profile"] = profile_steps(step, sync, s["profile_steps"])
    return row


def profile_steps(step, sync, n: int, top: int = 30) -> dict:
    """torch.profiler over n steps: the device's busy time per step (kernels and copies)
    beside the wall time (a step whose wall time is far above it waits on the host), and the
    ops with the most self time on the device and on the host, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync()
    wall = (time.perf_counter() - t0) / n
    ev = list(prof.key_averages())

    def dev_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    def rows(key):
        best = sorted(ev, key=key, reverse=True)[:top]
        return [{"name": e.key[:80], "calls_per_step": e.count / n,
                 "self_device_ms": dev_us(e) / 1e3 / n, "self_host_ms": e.self_cpu_time_total / 1e3 / n}
                for e in best]

    return {"steps": n, "wall_ms_per_step_profiled": 1e3 * wall,
            "device_busy_ms_per_step": sum(dev_us(e) for e in ev) / 1e3 / n,
            "top_device": rows(dev_us), "top_host": rows(lambda e: e.self_cpu_time_total)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--smoke", action="store_true", help="toy size on the CPU (tests)")
    p.add_argument("--models", nargs="*", default=list(MODELS), help=f"subset of {list(MODELS)}")
    p.add_argument("--seq-lens", nargs="*", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting rows after this many seconds")
    p.add_argument("--small", action="store_true",
                   help="the MQAR sweep's model (d_model 128, 4 layers, vocabulary 256, T 256 and 1024)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps of each row (device busy vs wall time, top ops)")
    p.add_argument("--no-layout-cache", action="store_true",
                   help="rebuild the gated kernels' chunk layout on every call (the cost it saves)")
    args = p.parse_args(argv)
    s = dict(SMOKE if args.smoke else SMALL if args.small else FULL)
    s["profile_steps"] = args.profile
    if args.no_layout_cache:
        from linattn.ops.triton import common
        common._cached_layout = common._cached_layout.__wrapped__
        s["layout_cache"] = False
    for key in ("seq_lens", "steps", "budget_s"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown}; choose from {list(MODELS)}")
    dev = torch.device(s["device"])
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use --smoke for the CPU toy run)")

    start, rows = time.perf_counter(), []
    for T in s["seq_lens"]:
        for name in args.models:
            if time.perf_counter() - start > s["budget_s"]:
                rows.append({"model": name, "seq_len": T, "skipped": "time budget"})
                continue
            try:
                row = time_model(name, MODELS[name], T, s, dev)
            except Exception as e:  # one failing row must not lose the others
                row = {"model": name, "seq_len": T, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
           "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    result = {"benchmark": "train_throughput", "settings": {k: v for k, v in s.items()}, "env": env,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = [{"model": r["model"], "T": r["seq_len"],
              "tokens/s": f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else r.get("error", r.get("skipped")),
              "ms/step": f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else "",
              "peak GiB": f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "",
              "params": f"{r['parameters'] / 1e6:.1f}M" if "parameters" in r else ""} for r in rows]
    print(f"\ntraining throughput, d_model {s['d_model']}, {s['n_layers']} layers, "
          f"{s['tokens_per_step']} tokens/step, {env['device']}")
    print(format_table(table))
    for r in rows:
        if "profile" in r:
            pr = r["profile"]
            print(f"\n{r['model']} T={r['seq_len']}: wall {pr['wall_ms_per_step_profiled']:.1f} ms/step "
                  f"(profiled), device busy {pr['device_busy_ms_per_step']:.1f} ms/step")
            for e in pr["top_device"][:16]:
                print(f"  device {e['self_device_ms']:7.2f} ms  x{e['calls_per_step']:<5g} {e['name']}")
            for e in pr["top_host"][:6]:
                print(f"  host   {e['self_host_ms']:7.2f} ms  x{e['calls_per_step']:<5g} {e['name']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
