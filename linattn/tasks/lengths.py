"""Length generalisation: a run trained at one operand length, evaluated at others.

`linattn eval RUN --digits 6-9` reloads a run of a task with a `digits` knob (arithmetic,
nupa), rebuilds the task with digits = 6, 7, 8, 9 (every other knob as trained; arithmetic's
digits_b = 0 follows digits, a fixed digits_b stays) and evaluates the trained weights on the
test split of each, one row per length. Sequences grow with the digits; the models have no
learned position table (attention uses RoPE), so the only limit lifted is the config's
max_seq_len check.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path


def parse_digits(text: str) -> list[int]:
    """"6-9" -> [6, 7, 8, 9]; "5,7" -> [5, 7]; "8" -> [8]. ValueError otherwise."""
    out: list[int] = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--digits takes N, N-M or a comma list of them, got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"--digits range {part.strip()!r} runs backwards")
        out.extend(range(lo, hi + 1))
    return out


def evaluate_lengths(run_dir, digits: list[int], *, seed: int, batches: int | None = None,
                     batch_size: int | None = None, device: str | None = None) -> dict:
    """Evaluate the run in run_dir at each operand length in digits on the test split under
    seed. Returns {"task": the trained task's dict, "trained_digits": int, "rows": [{"digits",
    "seq_len", "sequences", "accuracy", "exact_match", "loss"}, ...]} in the order given."""
    from ..train import (WEIGHTS_FILE, build_model, evaluate, load_run, load_weights,
                         resolve_device, resolve_dtype)

    model_cfg, task, cfg = load_run(run_dir)
    if "digits" not in task.knobs():
        raise ValueError(f"--digits needs a task with a digits knob (arithmetic, nupa); "
                         f"this run's task is {task.name}")
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{run_dir} has no {WEIGHTS_FILE} (did training finish?)")
    tasks = [replace(task, digits=d).validate() for d in digits]
    dev = resolve_device(device or cfg.device)
    model = build_model(model_cfg, dev, cfg.seed)
    load_weights(model, weights)
    model.config.max_seq_len = max(model.config.max_seq_len, *(t.seq_len for t in tasks))
    rows = []
    for d, t in zip(digits, tasks):
        res = evaluate(model, t, seed=seed, batches=batches or cfg.eval_batches,
                       batch_size=batch_size or cfg.batch_size, device=dev,
                       dtype=resolve_dtype(cfg.dtype, dev))
        rows.append({"digits": d, "seq_len": t.seq_len, "sequences": res["sequences"],
                     "accuracy": res["accuracy"], "exact_match": res["exact_match"], "loss": res["loss"]})
    return {"task": task.to_dict(), "trained_digits": task.digits, "seed": seed, "rows": rows}
