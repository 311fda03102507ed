"""MQAR sweep: test accuracy of each mixer at each sequence length and number of pairs.

Mixers: Gated DeltaNet, GLA, mLSTMsig, attention, and a 3:1 Gated DeltaNet / attention
hybrid, all with the same width and depth; sequence length {256, 1024} x key-value pairs
{16, 64}, vocabulary 256 (Zoology uses 8192 with ~100x more training: on the H200 at 8192,
600 steps left every linear mixer at chance and attention at 13%). Each run trains with
linattn.train (bf16 autocast on CUDA) for --steps steps at a constant number of sequences per
step, the first half at the task's shortest length (seq_len_warmup 0.5: pairs and queries
without filler; at the full length alone, 1000 steps left Gated DeltaNet at chance on the
CPU, see BENCHMARKS.md), time-boxed so the whole sweep fits --budget-s (each run gets the
remaining budget over the remaining runs), then is evaluated on the test split at the full
length. lr 1e-3: on the CPU the 4-layer model stayed at chance for 700 steps at 3e-3 (the
2-layer one learns there) and reached 39% at 1e-3 (BENCHMARKS.md). Writes a JSON file and a
PNG next to it.

    python benchmarks/mqar_sweep.py --out benchmarks/results/mqar_sweep.json
    python benchmarks/mqar_sweep.py --smoke --out /tmp/mqar.json         # CPU, toy size

When to run it: for a quick recall check of a new or changed mixer (one GPU command, or
--smoke on a CPU); Zoology's full protocol is mqar_zoology.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from linattn.tasks import make_task  # noqa: E402
from linattn.train import TrainConfig, format_table, model_config_for, train  # noqa: E402

MIXERS = {
    "gated_deltanet": dict(mixer="gated_deltanet"),
    "gla": dict(mixer="gla"),
    "mlstm_sig": dict(mixer="mlstm_sig"),
    "attention": dict(mixer="attention"),
    "gated_deltanet 3:1 hybrid": dict(mixer="gated_deltanet", hybrid=3),
}
FULL = dict(seq_lens=[256, 1024], pairs=[16, 64], vocab=256, d_model=128, n_layers=4, n_heads=2,
            tokens_per_step=32768, steps=400, lr=1e-3, seq_len_warmup=0.5, eval_batches=8,
            device="cuda", budget_s=450.0)
SMOKE = dict(seq_lens=[24], pairs=[2, 4], vocab=16, d_model=16, n_layers=4, n_heads=2,
             tokens_per_step=96, steps=2, lr=1e-2, seq_len_warmup=0.5, eval_batches=1, device="cpu",
             budget_s=120.0)


def plot(rows: list[dict], s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(s["seq_lens"]), figsize=(5 * len(s["seq_lens"]), 3.8), squeeze=False)
    for ax, T in zip(axes[0], s["seq_lens"]):
        for name in MIXERS:
            pts = [(r["pairs"], r["accuracy"]) for r in rows
                   if r["mixer"] == name and r["seq_len"] == T and "accuracy" in r]
            if pts:
                ax.plot(*zip(*pts), "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set(title=f"MQAR, sequence length {T}", xlabel="key-value pairs", ylabel="test accuracy",
               ylim=(-0.02, 1.02), xticks=s["pairs"], xticklabels=[str(p) for p in s["pairs"]])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON results path (the PNG goes beside it)")
    p.add_argument("--smoke", action="store_true", help="toy size on the CPU (tests)")
    p.add_argument("--mixers", nargs="*", default=list(MIXERS), help=f"subset of {list(MIXERS)}")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="time box of the whole sweep")
    args = p.parse_args(argv)
    s = dict(SMOKE if args.smoke else FULL)
    for key in ("steps", "lr", "budget_s"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    unknown = [m for m in args.mixers if m not in MIXERS]
    if unknown:
        p.error(f"unknown mixer {unknown}; choose from {list(MIXERS)}")
    if s["device"] == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use --smoke for the CPU toy run)")

    runs = [(m, T, P) for m in args.mixers for T in s["seq_lens"] for P in s["pairs"]]
    start, rows, warmed = time.perf_counter(), [], {}
    for i, (name, T, P) in enumerate(runs):
        if (name, T) not in warmed:  # compile + autotune outside the timed runs (inside the budget)
            t0 = time.perf_counter()
            try:
                warm_task = make_task("mqar", pairs=P, seq_len=T, vocab=s["vocab"])
                warm_cfg = TrainConfig(steps=2, batch_size=max(1, s["tokens_per_step"] // T),
                                       seq_len_warmup=s["seq_len_warmup"],  # both lengths
                                       device=s["device"], eval_batches=1, ckpt_every=10**9)
                train(model_config_for(warm_task, d_model=s["d_model"], n_layers=s["n_layers"],
                                       n_heads=s["n_heads"], **MIXERS[name]),
                      warm_task, warm_cfg, None, progress=False)
            except Exception:
                pass  # the timed run below records the error
            warmed[(name, T)] = time.perf_counter() - t0
        left = s["budget_s"] - (time.perf_counter() - start)
        per_run = left / (len(runs) - i)
        if per_run < 2:
            rows.append({"mixer": name, "seq_len": T, "pairs": P, "skipped": "time budget"})
            continue
        task = make_task("mqar", pairs=P, seq_len=T, vocab=s["vocab"])
        cfg = TrainConfig(steps=s["steps"], batch_size=max(1, s["tokens_per_step"] // T), lr=s["lr"],
                          seq_len_warmup=s["seq_len_warmup"],
                          device=s["device"], eval_batches=s["eval_batches"], ckpt_every=10**9,
                          log_every=max(1, s["steps"] // 20), time_limit_s=0.85 * per_run)
        try:
            model_cfg = model_config_for(task, d_model=s["d_model"], n_layers=s["n_layers"],
                                         n_heads=s["n_heads"], **MIXERS[name])
            res = train(model_cfg, task, cfg, None, progress=False)
            row = {"mixer": name, "seq_len": T, "pairs": P, "accuracy": res["accuracy"],
                   "compile_warmup_s": warmed[(name, T)],
                   "exact_match": res["exact_match"], "loss": res["loss"], "steps": res["steps"],
                   "stopped_by": res["stopped_by"], "wall_s": res["wall_s"],
                   "tokens_per_s": res["tokens_per_s"], "parameters": res["parameters"]}
        except Exception as e:  # one failing run must not lose the others
            row = {"mixer": name, "seq_len": T, "pairs": P, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name() if s["device"] == "cuda" else "cpu"}
    out.write_text(json.dumps({"benchmark": "mqar_sweep", "settings": s, "env": env, "rows": rows}, indent=2) + "\n")
    plot(rows, s, out.with_suffix(".png"))
    cols = [(T, P) for T in s["seq_lens"] for P in s["pairs"]]
    table = []
    for name in args.mixers:
        line = {"mixer": name}
        for T, P in cols:
            r = next(r for r in rows if r["mixer"] == name and r["seq_len"] == T and r["pairs"] == P)
            line[f"T={T} P={P}"] = f"{r['accuracy']:.3f}" if "accuracy" in r else ("error" if "error" in r else "skip")
        table.append(line)
    print(f"\nMQAR test accuracy (vocab {s['vocab']}, d_model {s['d_model']}, {s['n_layers']} layers, "
          f"<= {s['steps']} steps of {s['tokens_per_step']} tokens)")
    print(format_table(table))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
