"""Numbers grid: arithmetic and number understanding for softmax, linear and hybrid models.

(Named numbers_grid.py: a benchmarks/numbers.py would shadow the standard library's `numbers`
module, which torch imports, for every script run from this folder.)

Each cell trains one small model from scratch on one task and records steps-to-99% (the first
periodic test evaluation whose exact match, all answer tokens right, reaches 0.99) and the
final exact match and token accuracy on a fresh test set. Cells, in the order they run:

    mul5   5-digit x 5-digit multiplication, answer reversed then forward, every mixer
    mul5x1 5-digit x 1-digit multiplication (Qiu et al.'s m x u case: carries without
           partial-product sums), both orders, every mixer
    add3   3-digit addition, reversed and forward, every mixer
    tok    6-digit addition, forward answer, digits one per token vs groups of 3 from the
           left vs from the right (Singh & Strouse 2024), attention and gated_deltanet
    nupa   Number Cookbook problems (float_max, frac_max, int_to_sci, int_floordiv) at 4
           digits, attention and gated_deltanet

Mixers: attention (softmax, RoPE), gated_deltanet, mlstm_sig, gla, and a 3:1 hybrid (three
gated_deltanet layers, then attention). Model: d_model 256, 4 layers, 4 heads, SwiGLU MLP x4
(~3.2M parameters for attention), AdamW lr 1e-3 (betas 0.9/0.95, weight decay 0.1), batch
512, bf16 autocast on CUDA.

The recipe for multiplication follows Qiu et al. ("Dissecting Multiplication in Transformers",
2024, arXiv 2407.15360), whose three fixes together took a tiny decoder from 0% to 99.9% exact
match on 5x5 digits (their Table 5; any two of them: at most 65%): the product reversed (least
significant digit first), depth (their reversed 5x5 models: 2 layers 33.6%, 4 layers 97.4%,
8 layers 99.6%, 12 layers 99.9%; 3 heads suffice), and a training mix with "simple" samples
(--train-lengths simple: a fraction --simple-fraction of the samples multiply a full-width
a by a b that is zero but for one digit, at any position; the paper's sweep of the fraction
finds too few and too many both worse and gives no best value). Operands are zero-padded
to 5 digits, the product to 10, as theirs; the test set is uniform 5-digit operands.
--train-lengths uniform is a milder mix (each operand's significant length uniform in 1..5:
only 1/25 of its samples are full 5x5 products).

Time boxes: every cell trains for --cell-s seconds of wall clock (the clock starts after the
warm-up: a forward and backward that compile the kernels and the graph, no optimizer step,
and one evaluation) or until the periodic test exact match reaches --stop-at, whichever comes
first, and never past the command's --budget-s less --final-s (a slow compile shortens the
training, not the budget); --max-steps also stops it. The learning rate warms up over 200
steps, then follows a cosine down to 0.1x over the time box (over --max-steps steps when
given; over --schedule-s training seconds summed across --continue calls when given). So the
step count depends on the GPU's speed and on how many cells share it (--workers cells run at
once, each in its own process; small models leave most of a GPU idle): records give steps,
seconds and steps/s. A cell starts only if its time box still fits the budget.

Compiling (--compile, default "default" on CUDA, "none" on the CPU): the training forward
and backward run as one torch.compile graph (linattn.train.compile_model; the loss and the
optimizer stay eager); "reduce-overhead" also replays them as CUDA graphs (each training
call is marked a new step). Evaluation runs on the eager model, which shares the weights.

Continuing (--continue, with --save-dir): each cell saves its checkpoint (model, optimizer,
steps, training seconds) and its test curve (STATE_FILE) in its run directory; a later
command with --continue trains the cells whose checkpoint has their key and did not reach
--stop-at for another time box from there, and appends a record with the cumulative steps,
seconds and curve (the table shows a key's last record). Batches are a function of the step,
so a continued cell sees the batches an uninterrupted one would.

Results: one JSON line per finished cell appended to --out (resumable: cells already there
are skipped), and a PNG plus a Markdown table beside it.

    # GPU, device commands of < 10 minutes (all cells of a command at once where they fit)
    python benchmarks/numbers_grid.py --phases mul5 --workers 10 --cell-s 380 --budget-s 480 \\
        --train-lengths simple --save-dir runs/numbers
    python benchmarks/numbers_grid.py --phases add3,mul5x1,tok --workers 13 --cell-s 150 \\
        --budget-s 470 --save-dir runs/numbers
    python benchmarks/numbers_grid.py --phases nupa --workers 8 --cell-s 240 --budget-s 400   # optional
    # the two reversed 5x5 cells for the 99% bar, 8 layers, continued by each further call
    python benchmarks/numbers_grid.py --phases mul5 --mixers attention,hybrid --orders reversed \\
        --workers 2 --layers 8 --train-lengths simple --tag long --cell-s 450 --budget-s 480 \\
        --schedule-s 1100 --save-dir runs/numbers --continue
    # CPU sanity (small model, one cell)
    python benchmarks/numbers_grid.py --device cpu --phases add3 --mixers attention --orders reversed \\
        --d-model 128 --layers 2 --heads 2 --batch 64 --cell-s 240 --workers 1 --out /tmp/n.jsonl

When to run it: through benchmarks/numbers_gpu.sh after a change to the arithmetic tasks or
to how a mixer learns them; it is the source of the README's numbers grid.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

MIXERS = {
    "attention": dict(mixer="attention"),
    "gated_deltanet": dict(mixer="gated_deltanet"),
    "mlstm_sig": dict(mixer="mlstm_sig"),
    "gla": dict(mixer="gla"),
    "hybrid": dict(mixer="gated_deltanet", hybrid=3),
}
NUPA_PROBLEMS = ("float_max", "frac_max", "int_to_sci", "int_floordiv")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "numbers.jsonl"
STATE_FILE = "grid_state.json"  # beside a saved cell's checkpoint.pt: its key, steps, seconds, test curve


def cells(phases: list[str], mixers: list[str], orders: list[str]) -> list[dict]:
    """The grid's cells in run order: {"phase", "task": {knobs}, "mixer"}."""
    out = []
    for phase in phases:
        mul = re.fullmatch(r"mul(\d+)(?:x(\d+))?", phase)  # mulN: N by N digits; mulNxM: N by M
        if mul:
            b = {} if mul.group(2) is None else {"digits_b": int(mul.group(2))}
            for order in orders:
                out += [dict(phase=phase, task=dict(name="arithmetic", digits=int(mul.group(1)), op="mul",
                                                    order=order, **b), mixer=m)
                        for m in mixers]
        elif phase == "add3":
            out += [dict(phase=phase, task=dict(name="arithmetic", digits=3, op="add", order=o), mixer=m)
                    for m in mixers for o in orders]
        elif phase == "tok":
            out += [dict(phase=phase, task=dict(name="arithmetic", digits=6, op="add", order="forward",
                                                tokenization=t), mixer=m)
                    for m in mixers if m in ("attention", "gated_deltanet") for t in ("digit", "l2r3", "r2l3")]
        elif phase == "nupa":
            out += [dict(phase=phase, task=dict(name="nupa", problem=p, digits=4), mixer=m)
                    for p in NUPA_PROBLEMS for m in mixers if m in ("attention", "gated_deltanet")]
        else:
            raise ValueError(f"unknown phase {phase!r}; choose from mulN, mulNxM (mul5, mul3, "
                             "mul5x1, ...), add3, tok, nupa")
    return out


def cell_key(cell: dict, model: dict) -> str:
    task = ",".join(f"{k}={v}" for k, v in sorted(cell["task"].items()))
    size = f"d{model['d_model']}x{model['n_layers']}h{model['n_heads']}"
    lengths = model.get("train_lengths", "fixed")
    if lengths == "simple" and model.get("simple_fraction") is not None:  # None: the task's default
        lengths += f"{model['simple_fraction']:g}"
    mix = "" if lengths == "fixed" else f"|train_lengths={lengths}"
    tag = f"|{model['tag']}" if model.get("tag") else ""
    return f"{cell['phase']}|{task}|{cell['mixer']}|{size}|seed{model['seed']}{mix}{tag}"


def run_name(cell: dict, tag: str = "") -> str:
    """Directory name of a cell's saved run, e.g. mul5-mul5_reversed-attention (and -TAG when
    the cells carry a tag)."""
    t = cell["task"]
    by = f"x{t['digits_b']}" if t.get("digits_b") else ""
    what = t.get("problem") or f"{t['op']}{t['digits']}{by}_{t['order']}"
    tok = t.get("tokenization", "digit")
    return f"{cell['phase']}-{what}{'' if tok == 'digit' else '_' + tok}-{cell['mixer']}{'-' + tag if tag else ''}"


def cell_dir(spec: dict) -> Path | None:
    """The cell's run directory under --save-dir (None without one)."""
    hp = spec["hp"]
    return Path(hp["save_dir"]) / run_name(spec["cell"], hp.get("tag", "")) if hp.get("save_dir") else None


def saved_state(spec: dict) -> dict | None:
    """The grid state (STATE_FILE) saved with the cell's checkpoint when it is this cell's
    (the same key) and the checkpoint is there, else None."""
    from linattn.train import CHECKPOINT_FILE

    run = cell_dir(spec)
    if run is None:
        return None
    try:
        state = json.loads((run / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state if state.get("key") == spec["key"] and (run / CHECKPOINT_FILE).is_file() else None


# ------------------------------------------------------------------------------ one cell

def run_cell(spec: dict) -> dict:
    """Train and evaluate one cell (in this process); returns its record.

    spec: {"cell", "hp", "key"}. Keys of hp beyond the command line's: "resume" (continue
    from the checkpoint under save_dir whose STATE_FILE has this key), "train_until" (a
    time.time() by which training stops whatever cell_s says: the command's budget),
    "segment_steps" (stop this call after that many steps: a time box counted in steps)."""
    import torch

    from linattn.tasks import make_task
    from linattn.train import (CHECKPOINT_FILE, TrainConfig, _load_checkpoint, _make_optimizer,
                               _save_checkpoint, _train_step, _warm_outside_graphs, build_model,
                               compile_model, evaluate, model_config_for, resolve_device, resolve_dtype,
                               run_config_dict, save_weights, write_json)

    cell, hp = spec["cell"], spec["hp"]
    task = make_task(**cell["task"])  # evaluated on this
    train_task = task  # trained on this: arithmetic with --train-lengths mixes in simpler samples
    lengths = hp.get("train_lengths", "fixed")
    if task.name == "arithmetic" and lengths != "fixed":
        mix = {"simple_fraction": hp["simple_fraction"]} if (
            lengths == "simple" and hp.get("simple_fraction") is not None) else {}
        train_task = make_task(**{**cell["task"], "lengths": lengths, **mix})
    device = resolve_device(hp["device"])
    dtype = resolve_dtype("auto", device)
    mode = hp.get("compile") or ("default" if device.type == "cuda" else "none")
    model_cfg = model_config_for(task, d_model=hp["d_model"], n_layers=hp["n_layers"],
                                 n_heads=hp["n_heads"], **MIXERS[cell["mixer"]])
    train_cfg = TrainConfig(lr=hp["lr"], weight_decay=0.1, batch_size=hp["batch"], seed=hp["seed"])
    model = build_model(model_cfg, device, hp["seed"])
    optimizer = _make_optimizer(model, train_cfg)
    eval_kw = dict(seed=hp["seed"], batch_size=hp.get("eval_batch", 512), device=device, dtype=dtype)
    run = cell_dir(spec)

    # what earlier calls trained (a resumed cell): steps, seconds and the test curve
    state = dict(key=spec["key"], step=0, train_s=0.0, curve=[], steps_to_99=None, time_to_99_s=None, segments=0)
    if hp.get("resume"):
        saved = saved_state(spec)
        if saved is None:
            raise ValueError(f"nothing to resume for {spec['key']}: no {STATE_FILE} of this key "
                             f"beside a {CHECKPOINT_FILE} in {run}")
        step, train_s = _load_checkpoint(run / CHECKPOINT_FILE, model, optimizer, device)
        state.update(saved, step=step, train_s=train_s)

    run_model = compile_model(model, mode, device)  # model itself for "none"; evaluation stays eager
    graphs = mode == "reduce-overhead" and device.type == "cuda"
    t0 = time.perf_counter()
    if graphs:  # the Triton ops' per-shape caches, built outside CUDA graphs' memory pool
        _warm_outside_graphs(model, [train_task], train_cfg, device, dtype)
        torch.compiler.cudagraph_mark_step_begin()
    _warm_outside_graphs(run_model, [train_task], train_cfg, device, dtype)  # compiles; no optimizer step
    evaluate(model, task, batches=1, **eval_kw)
    warmup_s = time.perf_counter() - t0

    window = hp["cell_s"]
    if hp.get("train_until"):  # the command's budget: a slow compile shortens training, not the budget
        window = max(0.0, min(window, hp["train_until"] - time.time()))
    max_steps, schedule_s = hp.get("max_steps") or 0, hp.get("schedule_s") or 0
    segment_steps = hp.get("segment_steps") or 0
    step, prior_s, first = state["step"], state["train_s"], state["step"]
    curve, loss, stopped = state["curve"], float("nan"), "time"
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= window:
            break
        if max_steps and step >= max_steps:
            stopped = "max_steps"
            break
        if segment_steps and step - first >= segment_steps:
            break
        if max_steps:
            progress = step / max_steps
        else:
            progress = (prior_s + elapsed) / schedule_s if schedule_s else elapsed / window
        warm = min(1.0, (step + 1) / 200)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        batch = train_task.batch("train", hp["seed"], step + 1, hp["batch"]).to(device)  # batch 0: the warm-up's
        loss, _ = _train_step(run_model, optimizer, batch, hp["lr"] * warm * (0.1 + 0.9 * cosine), 1.0,
                              device, dtype)
        step += 1
        if step % hp["eval_every"] == 0:
            ev = evaluate(model, task, batches=4, **eval_kw)
            now = prior_s + time.perf_counter() - start
            curve.append([step, round(now, 2), ev["exact_match"], ev["accuracy"], loss])
            if state["steps_to_99"] is None and ev["exact_match"] >= 0.99:
                state["steps_to_99"], state["time_to_99_s"] = step, round(now, 1)
            if ev["exact_match"] >= hp["stop_at"]:
                stopped = "stop_at"
                break
    segment_s = time.perf_counter() - start
    train_s, segments = prior_s + segment_s, state["segments"] + 1
    if run is not None:  # a run directory that `linattn eval` and numbers_probe.py read, and --continue
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / "config.json", run_config_dict(model_cfg, task, train_cfg))
        save_weights(model, run / "model.safetensors")
        _save_checkpoint(run / CHECKPOINT_FILE, step, model, optimizer, train_s)
        state.update(step=step, train_s=round(train_s, 2), curve=curve, segments=segments, stopped=stopped)
        write_json(run / STATE_FILE, state)
    final = evaluate(model, task, batches=hp.get("final_batches", 16), **{**eval_kw, "seed": hp["seed"] + 1})
    return {
        "key": spec["key"], "phase": cell["phase"], "task": task.to_dict(), "train_task": train_task.to_dict(),
        "mixer": cell["mixer"],
        "layers": model_cfg.layer_pattern(), "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step, "train_s": round(train_s, 1), "warmup_s": round(warmup_s, 1),
        "steps_per_s": round((step - first) / max(segment_s, 1e-9), 2), "segments": segments,
        "segment_steps": step - first, "segment_s": round(segment_s, 1), "stopped": stopped, "compile": mode,
        "steps_to_99": state["steps_to_99"], "time_to_99_s": state["time_to_99_s"],
        "final_exact_match": final["exact_match"], "final_accuracy": final["accuracy"],
        "final_loss": final["loss"], "final_sequences": final["sequences"], "train_loss": loss,
        "curve": curve, "hp": hp, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
    }


# ------------------------------------------------------------------------------ the grid

def done_keys(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        if "final_exact_match" in rec:
            keys.add(rec["key"])
    return keys


def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one write of one line: appends from threads do not interleave
        f.write(json.dumps(record) + "\n")


def run_grid(args) -> list[dict]:
    hp = dict(device=args.device, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
              batch=args.batch, lr=args.lr, seed=args.seed, cell_s=args.cell_s,
              eval_every=args.eval_every, stop_at=args.stop_at, train_lengths=args.train_lengths,
              simple_fraction=args.simple_fraction, eval_batch=args.eval_batch_size,
              final_batches=args.final_batches, save_dir=args.save_dir, tag=args.tag, compile=args.compile,
              max_steps=args.max_steps, schedule_s=args.schedule_s)
    if args.continue_ and not args.save_dir:
        raise SystemExit("--continue needs --save-dir (the cells' checkpoints)")
    todo = [c for c in cells(args.phases, args.mixers, args.orders)]
    done = done_keys(args.out)
    specs, resumed = [], 0
    for c in todo:
        spec = dict(cell=c, hp=hp, key=cell_key(c, hp))
        state = saved_state(spec) if args.continue_ else None
        if state is not None and state.get("stopped") != "stop_at" and not (
                args.max_steps and state["step"] >= args.max_steps):  # stopped by its time box: continue it
            spec["hp"] = {**hp, "resume": True}
            resumed += 1
        elif spec["key"] in done:
            continue
        specs.append(spec)
    print(f"{len(todo)} cells, {len(todo) - len(specs)} already in {args.out}, {len(specs)} to run"
          f"{f' ({resumed} continued from their checkpoints)' if args.continue_ else ''}", flush=True)
    deadline = time.monotonic() + args.budget_s
    train_until = time.time() + args.budget_s - args.final_s  # the children's clock: time.time()
    margin = args.cell_margin_s

    def work(spec):
        if time.monotonic() + args.cell_s + margin > deadline:
            return None  # would not fit the budget: left for the next command
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # many children share the cores
               # inductor's compile workers: the cores shared out, not a pool of all of them per child
               "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get(
                   "TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))}
        spec = {**spec, "hp": {**spec["hp"], "train_until": train_until}}
        try:
            proc = subprocess.run([sys.executable, __file__, "--run-cell", json.dumps(spec)],
                                  capture_output=True, text=True, env=env,
                                  timeout=args.cell_s + margin + 600)  # a hung child, not a slow compile
        except subprocess.TimeoutExpired:
            print(f"timeout: {spec['key']}", flush=True)
            return None
        if proc.returncode != 0:
            print(f"failed: {spec['key']}\n{proc.stderr[-3000:]}", flush=True)
            return None
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        append(args.out, rec)
        print(f"{rec['key']}: exact {rec['final_exact_match']:.4f} steps {rec['steps']} "
              f"to99 {rec['steps_to_99']} ({rec['steps_per_s']} steps/s, compile {rec['compile']}, "
              f"warm-up {rec['warmup_s']} s, call {rec['segments']})", flush=True)
        return rec

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = [r for r in pool.map(work, specs) if r is not None]
    left = len(specs) - len(results)
    if left:
        print(f"{left} cells not run (budget or failure): run the same command again to continue", flush=True)
    return results


# ------------------------------------------------------------------------------ report

def load(path: Path) -> list[dict]:
    recs = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        recs[rec["key"]] = rec  # the last record of a key wins
    return list(recs.values())


def label(rec: dict) -> str:
    task = rec["task"]
    if task["name"] == "nupa":
        return f"nupa {task['problem']} {task['digits']}d"
    tok = "" if task.get("tokenization", "digit") == "digit" else f" {task['tokenization']}"
    train = rec.get("train_task", {})
    mix = {"fixed": "", "uniform": " (train uniform lengths)"}.get(
        train.get("lengths", "fixed"), f" (train simple {train.get('simple_fraction', 0):g})")
    tag = f" [{rec['hp']['tag']}]" if rec.get("hp", {}).get("tag") else ""
    by = f"x{task['digits_b']}" if task.get("digits_b") else ""
    return f"{task['op']}{task['digits']}{by} {task['order']}{tok}{mix}{tag}"


def table(recs: list[dict]) -> str:
    lines = ["| task | mixer | params | steps | steps/s | steps to 99% | final exact match | token acc |",
             "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {label(r)} | {r['mixer']} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | "
                     f"{r['steps_per_s']} | {r['steps_to_99'] if r['steps_to_99'] is not None else '-'} | "
                     f"{r['final_exact_match']:.4f} | {r['final_accuracy']:.4f} |")
    return "\n".join(lines)


def plot(recs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in recs:
        groups.setdefault(label(r), []).append(r)
    names = list(groups)
    mixers = [m for m in MIXERS if any(r["mixer"] == m for r in recs)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(names) + 3), 7), squeeze=False)
    width = 0.8 / max(1, len(mixers))
    for i, m in enumerate(mixers):
        xs, acc, s99 = [], [], []
        for j, name in enumerate(names):
            r = next((r for r in groups[name] if r["mixer"] == m), None)
            if r is not None:
                xs.append(j + (i - (len(mixers) - 1) / 2) * width)
                acc.append(r["final_exact_match"])
                s99.append(r["steps_to_99"] if r["steps_to_99"] is not None else float("nan"))
        axes[0][0].bar(xs, acc, width, label=m)
        axes[1][0].bar(xs, s99, width, label=m)
    for ax, title in ((axes[0][0], "final exact match (test)"), (axes[1][0], "steps to 99% exact match (none: no bar)")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0][0].set_ylim(0, 1.02)
    axes[0][0].axhline(0.99, color="gray", lw=0.6, ls="--")
    axes[0][0].legend(fontsize=8, ncol=len(mixers))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(path: Path) -> None:
    recs = load(path)
    if not recs:
        print(f"no records in {path}")
        return
    md = table(recs)
    path.with_suffix(".md").write_text(md + "\n")
    plot(recs, path.with_suffix(".png"))
    print(md)
    print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-cell", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON Lines file (appended, resumable)")
    p.add_argument("--phases", type=lambda s: s.split(","), default=["mul5", "add3"])
    p.add_argument("--mixers", type=lambda s: s.split(","), default=list(MIXERS))
    p.add_argument("--orders", type=lambda s: s.split(","), default=["reversed", "forward"])
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock bound of the whole command")
    p.add_argument("--cell-s", type=float, default=210.0, help="training time box of one cell")
    p.add_argument("--cell-margin-s", type=float, default=40.0, help="start-up and final evaluation per cell")
    p.add_argument("--workers", type=int, default=5, help="cells trained at once (processes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batch-size", type=int, default=512,
                   help="test sequences per batch (4 batches per periodic evaluation)")
    p.add_argument("--final-batches", type=int, default=16, help="test batches of the final evaluation")
    p.add_argument("--stop-at", type=float, default=0.999, help="stop a cell once its periodic exact match reaches this")
    p.add_argument("--train-lengths", default="fixed", choices=("fixed", "uniform", "simple"),
                   help="arithmetic training data: fixed, operands of uniform significant length "
                        "(zero-padded), or simple: Qiu et al.'s mix, --simple-fraction of the samples "
                        "with b zero but for one digit (evaluation stays fixed)")
    p.add_argument("--simple-fraction", type=float, default=None,
                   help="--train-lengths simple: the fraction of simple samples (default: the "
                        "arithmetic task's simple_fraction)")
    p.add_argument("--compile", default=None, choices=("none", "default", "reduce-overhead"),
                   help="torch.compile the training forward/backward (linattn.train.compile_model; "
                        "evaluation stays eager); default: 'default' on CUDA, 'none' on the CPU")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop a cell at this many steps in all (0: none); the cosine then runs over steps")
    p.add_argument("--schedule-s", type=float, default=0.0,
                   help="the cosine's length in training seconds summed over --continue calls "
                        "(0: each call's own time box)")
    p.add_argument("--continue", dest="continue_", action="store_true",
                   help="cells whose checkpoint under --save-dir has their key and was stopped by its "
                        "time box train another --cell-s from it (the new record, with cumulative "
                        "steps, replaces the old in the table)")
    p.add_argument("--final-s", type=float, default=30.0,
                   help="seconds kept at the end of --budget-s for the final evaluation and saving: "
                        "training stops by then whatever --cell-s says")
    p.add_argument("--save-dir", default=None,
                   help="also save each cell's model as a run directory here (config.json + "
                        "model.safetensors, for linattn eval --digits and numbers_probe.py)")
    p.add_argument("--tag", default="", help="a label added to the cells' keys (a second setting of the same cells)")
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plot from --out")
    args = p.parse_args(argv)
    if args.run_cell:
        print(json.dumps(run_cell(json.loads(args.run_cell))))
        return 0
    for m in args.mixers:
        if m not in MIXERS:
            p.error(f"unknown mixer {m!r}; choose from {', '.join(MIXERS)}")
    if not args.report_only:
        run_grid(args)
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
