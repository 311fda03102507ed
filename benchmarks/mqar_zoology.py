"""MQAR under Zoology's protocol: a grid of (mixer, d_model, T, pairs, lr), one JSON row per run.

Every run is `linattn train --preset zoology` (linattn.models.config.preset_settings, Zoology's
figure-2 recipe: two LayerNorm blocks of the mixer with an identity state mixer, one head,
GPT-2 init, learned positions for attention, vocabulary 8192, Zoology's layout and power-law
query placement, fixed sets of 100,000 training and 3,000 test examples, Zoology's batch size
for T, float32, AdamW (0.9, 0.999) with weight decay 0.1 on every parameter, cosine stepped
once per epoch, no warmup) for --epochs epochs (64 in Zoology) capped at --max-steps steps
(the cosine then spans the capped run), evaluated on the whole test set every epoch (or every
--eval-every steps when that is sooner) and stopped once test accuracy reaches 0.99. "hybrid"
is a 1:1 Gated DeltaNet / attention model (layer 0 Gated DeltaNet, layer 1 attention). Every
model has one head, except where the op's head-dim limit (256) needs more (heads_for: the
linear mixer at d_model 256, every mixer at 512).

Rows are appended to --out (JSON Lines) as runs finish, with at least the keys mixer,
d_model, seq_len, num_kv_pairs, lr, steps, accuracy (the fraction of query positions
answered right on the test set), and state_size (floats of recurrent state per sequence,
summed over layers, caches of the short convs included; attention counts its KV cache at
length T). The grid is resumable: a (mixer, d_model, seq_len, num_kv_pairs, lr) with a
complete row in --out is skipped; a run cut short by --budget-s is written with
complete=false and runs again next time (from the start), and so does a run stopped by its
--run-time-limit when this call's limit is longer (rows record run_time_limit_s; the tables
read each cell's most accurate row). Learning rates: --lrs in order; a
(mixer, d_model, T, pairs) that some lr already solved (accuracy >= --solved-at, 0.99) runs no
further lr, so a first call with one lr and a later one with two more is Zoology's sweep
restricted to the cells that need it. --jobs runs that many trainings
at once, each in its own process (small models leave most of a GPU idle). --budget-s bounds
the whole command: no run starts when less than --min-run-s is left, and each run's time
limit is the smaller of --run-time-limit and what is left. Order: the cells in --cells order,
then d_model, then mixer, then lr, so the bar's cells come first.

    python benchmarks/mqar_zoology.py --out benchmarks/results/mqar_zoology-h100-DATE.json \\
        --cells 256:16,512:64 --d-models 64,128,256 --jobs 8 --budget-s 540
    python benchmarks/mqar_zoology.py --plot benchmarks/results/mqar_zoology-h100-DATE.json
    python benchmarks/mqar_zoology.py --smoke --out /tmp/zoo.json     # CPU, toy size, ~10 s

When to run it: through benchmarks/mqar_zoology_gpu.sh after a change that can move a
mixer's recall (its layer, its gates, the training recipe); it is the source of
BENCHMARKS.md's recall table.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

MIXERS = ["attention", "gated_deltanet", "deltanet", "gla", "linear", "mlstm_sig", "lightning",
          "mom", "hybrid"]
KEY = ("mixer", "d_model", "seq_len", "num_kv_pairs", "lr")
ZOOLOGY_LRS = "4.6e-4,2.2e-3,1e-2"  # three of Zoology's logspace(-4, -2, 4)

_TASKS: dict = {}  # per worker process: one task object per data setting, so the fixed sets are generated once


def gpu_slug() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    for short in ("h200", "h100", "a100", "l40s", "a10"):
        if short in name:
            return short
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def default_out() -> Path:
    date = datetime.date.today().isoformat()
    return Path(__file__).resolve().parent / "results" / f"mqar_zoology-{gpu_slug()}-{date}.json"


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row_key(r: dict) -> tuple:
    return tuple(float(r[k]) if k == "lr" else r[k] for k in KEY)


def state_size(model, seq_len: int, device) -> int:
    """Floats of state per sequence after seq_len tokens, summed over layers."""
    import torch

    ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    with torch.no_grad():
        _, state = model.forward_with_state(ids)

    def count(s):
        if isinstance(s, torch.Tensor):
            return s.numel() if s.is_floating_point() else 0
        if isinstance(s, dict):
            return sum(count(v) for v in s.values())
        if isinstance(s, (list, tuple)):
            return sum(count(v) for v in s)
        return 0

    return count(state)


def heads_for(mixer: str, d_model: int) -> int:
    """One head (Zoology's), or the fewest powers of two that keep the op's head dims <= 256
    (the linear mixer's value carries one extra column for its denominator)."""
    extra = 1 if mixer == "linear" else 0
    heads = 1
    while d_model // heads + extra > 256:
        heads *= 2
    return heads


def run_one(spec: dict) -> dict:
    """Trains one grid point; returns its row (never raises: errors become a row field)."""
    t0 = time.time()
    row = {k: spec[k] for k in ("mixer", "d_model", "seq_len", "num_kv_pairs", "lr")}
    try:
        import torch

        from linattn.cli import build_run
        from linattn.train import train

        settings = {"preset": "zoology", "task": "mqar", "d_model": spec["d_model"],
                    "seq_len": spec["seq_len"], "pairs": spec["num_kv_pairs"], "lr": spec["lr"],
                    "epochs": spec["epochs"], "device": spec["device"], "backend": spec["backend"],
                    "seed": spec["seed"], "time_limit_s": spec["time_limit_s"],
                    "log_every": 50, "ckpt_every": 10**9}
        if spec["mixer"] == "hybrid":
            settings.update(mixer="gated_deltanet", hybrid=1)
        else:
            settings["mixer"] = spec["mixer"]
        settings["n_heads"] = heads_for(spec["mixer"], spec["d_model"])
        settings.update(spec.get("overrides", {}))
        model_cfg, task, cfg = build_run(settings)
        task = _TASKS.setdefault(tuple(sorted(task.to_dict().items())), task)
        per_epoch = task.steps_per_epoch(cfg.batch_size)
        if cfg.steps > spec["max_steps"]:
            cfg.steps = spec["max_steps"]
        cfg.eval_every = min(per_epoch, spec["eval_every"], cfg.steps)
        metrics = train(model_cfg, task, cfg, None, progress=False)
        model = metrics.pop("model")
        stopped = metrics["stopped_by"]
        if stopped == "time_limit":
            stopped = "budget" if spec["budget_cut"] else "run_time_limit"
        row.update(steps=metrics["steps"], accuracy=metrics["accuracy"],
                   exact_match=metrics["exact_match"], loss=metrics["loss"], stopped_by=stopped,
                   complete=stopped != "budget", run_time_limit_s=spec["time_limit_s"],
                   epochs_done=metrics["steps"] / per_epoch,
                   batch_size=cfg.batch_size, tokens_per_s=metrics["tokens_per_s"],
                   parameters=metrics["parameters"],
                   state_size=state_size(model, spec["seq_len"], next(model.parameters()).device),
                   n_heads=model_cfg.n_heads, n_layers=model_cfg.n_layers, dtype=metrics["dtype"],
                   backend=spec["backend"], device=spec["device"], gpu=spec["gpu"],
                   torch=torch.__version__, seed=spec["seed"])
    except Exception as e:  # a failed run is a row, so the grid goes on and the file says why
        row.update(error=f"{type(e).__name__}: {e}"[:500], complete=False)
    row["wall_s"] = round(time.time() - t0, 1)
    return row


class InProcess:
    """The executor interface of --jobs 1: runs each submitted call at once, here."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        fut = cf.Future()
        fut.set_result(fn(*args))
        return fut


def mixer_lrs(a) -> dict:
    """{mixer: [lr, ...]} from --mixer-lrs "attention=4.6e-4,2.2e-3;hybrid=1e-3"."""
    out = {}
    for part in filter(None, (a.mixer_lrs or "").split(";")):
        name, _, lrs = part.partition("=")
        out[name.strip()] = [float(v) for v in lrs.split(",")]
    return out


def grid(a) -> list[dict]:
    cells = [tuple(int(v) for v in c.split(":")) for c in a.cells.split(",")]
    own = mixer_lrs(a)
    specs = []
    for T, P in cells:
        for d in [int(v) for v in a.d_models.split(",")]:
            for mixer in a.mixers.split(","):
                for lr in own.get(mixer, [float(v) for v in a.lrs.split(",")]):
                    specs.append(dict(mixer=mixer, d_model=d, seq_len=T, num_kv_pairs=P, lr=lr))
    return specs


def run_is_final(row: dict, run_time_limit: float) -> bool:
    """Whether a row's run needs no rerun: complete, and not stopped by a time limit shorter
    than `run_time_limit` (rows without run_time_limit_s count as finished)."""
    if not row.get("complete"):
        return False
    return not (row.get("stopped_by") == "run_time_limit"
                and row.get("run_time_limit_s", math.inf) < run_time_limit)


def run_grid(a) -> int:
    out = Path(a.out) if a.out else default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out)
    done = {row_key(r) for r in rows if run_is_final(r, a.run_time_limit)}
    solved = {row_key(r)[:4] for r in rows if r.get("complete") and r.get("accuracy", 0) >= a.solved_at}
    todo = [s for s in grid(a) if row_key(s) not in done and row_key(s)[:4] not in solved]
    print(f"{len(todo)} runs to do ({len(done)} complete in {out}; {len(solved)} cells solved at "
          f">= {a.solved_at} by some lr, their other lrs skipped)", flush=True)
    overrides = json.loads(a.overrides) if a.overrides else {}
    gpu = gpu_slug() if a.device != "cpu" else "cpu"
    start = time.time()
    finished = []
    pool_cm = InProcess() if a.jobs == 1 else cf.ProcessPoolExecutor(max_workers=a.jobs,
                                                                     mp_context=mp.get_context("spawn"))
    with pool_cm as pool:
        pending = {}
        while todo or pending:
            left = a.budget_s - (time.time() - start)
            while todo and len(pending) < a.jobs and left >= a.min_run_s:
                spec = todo.pop(0)
                limit = min(a.run_time_limit, left - a.margin_s)
                spec.update(epochs=a.epochs, max_steps=a.max_steps, eval_every=a.eval_every,
                            device=a.device, backend=a.backend, seed=a.seed, gpu=gpu,
                            time_limit_s=max(limit, 1.0), budget_cut=limit < a.run_time_limit,
                            overrides=overrides)
                pending[pool.submit(run_one, spec)] = spec
            if not pending:
                break
            done_now, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done_now:
                pending.pop(fut)
                row = fut.result()
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                finished.append(row)
                acc = row.get("accuracy")
                print(f"{row['mixer']:>15} d{row['d_model']:<4} T{row['seq_len']:<5} P{row['num_kv_pairs']:<3} "
                      f"lr {row['lr']:.1e}  acc {acc if acc is None else f'{acc:.4f}'}  steps {row.get('steps')}  "
                      f"{row.get('stopped_by', row.get('error'))}  {row['wall_s']} s", flush=True)
    print(f"{len(finished)} runs in {time.time() - start:.0f} s, {len(todo)} left for the next call")
    print(f"wrote {out}")
    print(summary_table(read_rows(out)))
    return 0


# ------------------------------------------------------------------------------ plots, table

def best_rows(rows: list[dict]) -> dict:
    """(mixer, d_model, seq_len, pairs) -> the row of highest test accuracy over the cell's
    learning rates and repeated runs (Zoology reports the best lr per cell; a rerun with a
    longer time limit is one more trained model, and a run cut by the budget still measured
    the accuracy it reports)."""
    best = {}
    for r in rows:
        if "accuracy" not in r:
            continue
        cell = (r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"])
        if cell not in best or r["accuracy"] > best[cell]["accuracy"]:
            best[cell] = r
    return best


def summary_table(rows: list[dict]) -> str:
    """Markdown: best accuracy per mixer (rows) and (T, pairs, d_model) (columns)."""
    best = best_rows(rows)
    if not best:
        return "(no finished runs)"
    cols = sorted({(T, P, d) for _, d, T, P in best})
    mixers = [m for m in MIXERS if any(k[0] == m for k in best)] + \
        sorted({k[0] for k in best} - set(MIXERS))
    head = "| mixer | " + " | ".join(f"T{T} P{P} d{d}" for T, P, d in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for m in mixers:
        cells = []
        for T, P, d in cols:
            r = best.get((m, d, T, P))
            cells.append("" if r is None else f"{r['accuracy']:.3f}" + ("" if r.get("complete") else "*"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n(* a run cut by the command's budget)"


def plot(path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_rows(read_rows(path))
    cells = sorted({(T, P) for _, _, T, P in best})
    mixers = [m for m in MIXERS if any(k[0] == m for k in best)]
    written = []
    for kind in ("d_model", "state"):
        fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False)
        for ax, (T, P) in zip(axes[0], cells):
            for m in mixers:
                pts = sorted((r["d_model"] if kind == "d_model" else r.get("state_size", 0), r["accuracy"])
                             for (mm, d, TT, PP), r in best.items() if (mm, TT, PP) == (m, T, P))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log", base=2 if kind == "d_model" else 10)
            ax.set_title(f"T = {T}, {P} pairs")
            ax.set_xlabel("model dimension" if kind == "d_model" else "recurrent state size (floats)")
            ax.set_ylabel("MQAR accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        png = path.with_name(path.stem + ("" if kind == "d_model" else "-state") + ".png")
        fig.savefig(png, dpi=120)
        plt.close(fig)
        written.append(png)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON Lines file (default benchmarks/results/mqar_zoology-<gpu>-<date>.json)")
    p.add_argument("--mixers", default=",".join(MIXERS))
    p.add_argument("--cells", default="256:16,512:64", help="T:pairs, comma separated")
    p.add_argument("--d-models", default="64,128,256")
    p.add_argument("--lrs", default=None, help=f"comma separated (default {ZOOLOGY_LRS}; at most 3 "
                   "per cell is the plan)")
    p.add_argument("--mixer-lrs", default="", help='per-mixer lr lists that replace --lrs, e.g. '
                   '"attention=4.6e-4,2.2e-3;hybrid=1e-3"')
    p.add_argument("--solved-at", type=float, default=0.99,
                   help="skip the other lrs of a (mixer, d_model, T, pairs) that reached this accuracy")
    p.add_argument("--epochs", type=float, default=64.0)
    p.add_argument("--max-steps", type=int, default=3000, help="cap on each run's steps (its lr schedule too)")
    p.add_argument("--eval-every", type=int, default=250, help="test evaluation period, at most one epoch")
    p.add_argument("--jobs", type=int, default=8, help="runs at once (processes)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock bound of the command")
    p.add_argument("--run-time-limit", type=float, default=300.0, help="training time limit of one run")
    p.add_argument("--min-run-s", type=float, default=60.0, help="start no run with less budget left")
    p.add_argument("--margin-s", type=float, default=25.0, help="per run: start-up and final evaluation")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overrides", default="", help="JSON of extra `linattn train` settings for every run")
    p.add_argument("--plot", metavar="FILE", help="plot FILE (accuracy vs d_model and vs state size), print its table")
    p.add_argument("--smoke", action="store_true", help="a toy grid on the CPU")
    a = p.parse_args(argv)
    if a.plot:
        for png in plot(Path(a.plot)):
            print(f"wrote {png}")
        print(summary_table(read_rows(Path(a.plot))))
        return 0
    if a.smoke:
        a.mixers, a.cells, a.d_models, a.lrs = "attention,mom,hybrid", "16:2", "16", a.lrs or "1e-2"
        a.device, a.backend, a.max_steps, a.jobs, a.eval_every = "cpu", "torch", 3, 2, 2
        a.budget_s, a.run_time_limit, a.min_run_s, a.margin_s = 120.0, 60.0, 1.0, 1.0
        a.overrides = json.dumps({"train_examples": 64, "test_examples": 16, "batch_size": 8,
                                  "vocab": 64, "n_heads": 2})
    a.lrs = a.lrs or ZOOLOGY_LRS
    return run_grid(a)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
