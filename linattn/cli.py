"""The `linattn` command: train and evaluate models on synthetic tasks, run the benchmarks.

    linattn train --task mqar --mixer gated_deltanet --steps 2000 --out runs/mqar
    linattn train --config run.yaml --lr 3e-3 --out runs/x     # explicit flags beat the file
    linattn train --out runs/mqar --resume                      # continue an interrupted run
    linattn eval runs/mqar                                      # fresh test set, a table
    torchrun --nproc-per-node 2 -m linattn.cli train ... --sequence-parallel   # LASP-2
    linattn bench ...                                           # linattn.bench.main(argv)

Settings come from three layers, later ones winning: the defaults (LMConfig, the task's
dataclass, TrainConfig), a YAML/JSON file given with --config (flat keys named like the
long flags, or the sections "model", "task", "train" of a run's config.json), and the
flags given on the command line. A setting that cannot work (unknown mixer or task, a
hybrid ratio that does not fit the layer count, d_model not divisible by the heads, a knob
of another task) prints one error line to stderr and exits 2 (LINATTN_DEBUG=1: a traceback).

--sequence-parallel trains one model replica with every sequence cut along time over the
processes torchrun starts (see linattn.train); outside torchrun it is such an error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr (exit 2)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_or_none(text: str):
    return None if str(text).lower() in ("none", "null", "0", "") else int(text)


def _csv(text):
    if isinstance(text, (list, tuple)):
        return list(text)
    return [s.strip() for s in str(text).split(",") if s.strip()]


# dest: (flags, type, section, help). Dests are the config keys (LMConfig / task / TrainConfig).
SETTINGS = {
    # model
    "mixer": (["--mixer"], str, "model", "token mixer of every layer (gated_deltanet, gla, mlstm_sig, attention, ...)"),
    "d_model": (["--d-model"], int, "model", "model width"),
    "n_layers": (["--n-layers", "--layers"], int, "model", "number of layers"),
    "n_heads": (["--n-heads", "--heads"], int, "model", "heads per layer (must divide d_model)"),
    "hybrid": (["--hybrid"], _int_or_none, "model", "N for an N:1 hybrid: one attention layer after every N mixer layers"),
    "layers": (["--pattern"], _csv, "model", "explicit layer pattern, comma separated mixer names (overrides --hybrid)"),
    "mlp_ratio": (["--mlp-ratio"], float, "model", "MLP hidden size / d_model"),
    "sliding_window": (["--sliding-window"], _int_or_none, "model", "window of the attention layers (none: full)"),
    "feature_map": (["--feature-map"], str, "model", "feature map of the linear-attention mixers"),
    "backend": (["--backend"], str, "model", "ops backend: auto (Triton on CUDA), triton, torch, reference"),
    # task
    "task": (["--task"], str, "task", "mqar, arithmetic, compare, copy or nupa"),
    "pairs": (["--pairs"], int, "task", "mqar: key-value pairs"),
    "queries": (["--queries"], int, "task", "mqar: queries (0: one per pair)"),
    "seq_len": (["--seq-len"], int, "task", "mqar, copy: sequence length"),
    "vocab": (["--vocab"], int, "task", "mqar, copy: vocabulary size"),
    "digits": (["--digits"], int, "task", "arithmetic, nupa: (max) digits per operand"),
    "op": (["--op"], str, "task", "arithmetic: add, sub, mul or mixed"),
    "order": (["--order"], str, "task", "arithmetic: answer digits forward or reversed"),
    "int_digits": (["--int-digits"], int, "task", "compare: max integer digits"),
    "frac_digits": (["--frac-digits"], int, "task", "compare: max fraction digits"),
    "copy_len": (["--copy-len"], int, "task", "copy: marked tokens to copy"),
    "digits_b": (["--digits-b"], int, "task", "arithmetic: digits of the second operand (0: as --digits)"),
    "tokenization": (["--tokenization"], str, "task",
                     "arithmetic, nupa: digit (one token per digit), l2r3 or r2l3 (groups of 3 digits "
                     "from the left / from the right)"),
    "lengths": (["--lengths"], str, "task", "arithmetic: fixed (every digit uniform) or uniform "
                "(each operand's significant length uniform in 1..width, zero-padded)"),
    "problem": (["--problem"], str, "task", "nupa: int_add, int_sub, int_mul, int_floordiv, int_mod, "
                "int_max, int_get_digit, int_length, int_to_sci, float_add, float_max, frac_add, frac_max"),
    # training
    "steps": (["--steps"], int, "train", "optimizer steps"),
    "batch_size": (["--batch", "--batch-size"], int, "train", "sequences per step"),
    "lr": (["--lr"], float, "train", "peak learning rate (AdamW, warmup then cosine)"),
    "weight_decay": (["--weight-decay"], float, "train", "AdamW weight decay of matrices"),
    "warmup_steps": (["--warmup-steps"], int, "train", "warmup steps (-1: 5%% of steps)"),
    "min_lr_ratio": (["--min-lr-ratio"], float, "train", "final lr / peak lr"),
    "grad_clip": (["--grad-clip"], float, "train", "max gradient norm (0: off)"),
    "seed": (["--seed"], int, "train", "seed of the weights and of the data"),
    "device": (["--device"], str, "train", "auto, cpu, cuda or cuda:N"),
    "dtype": (["--dtype"], str, "train", "auto (bf16 autocast on CUDA, float32 on CPU), float32, bfloat16"),
    "log_every": (["--log-every"], int, "train", "steps per metrics.jsonl line"),
    "eval_every": (["--eval-every"], int, "train", "steps between test evaluations (0: at the end only)"),
    "eval_batches": (["--eval-batches"], int, "train", "test batches per evaluation"),
    "ckpt_every": (["--ckpt-every"], int, "train", "steps between checkpoints"),
    "time_limit_s": (["--time-limit"], float, "train", "stop training after this many seconds (0: none)"),
    "seq_len_warmup": (["--seq-len-warmup"], float, "train",
                       "fraction of the steps trained at the task's shortest length (0: none)"),
}
ALIASES = {"heads": "n_heads", "batch": "batch_size", "time_limit": "time_limit_s", "pattern": "layers",
           "name": "task"}
RESUME_MAY_CHANGE = {"device", "time_limit_s"}


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="linattn", description="Linear-attention models: train, evaluate, benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,bench}", parser_class=_Parser)
    sub.required = True

    tr = sub.add_parser("train", help="train a model on a synthetic task",
                        description="Train a causal LM on a synthetic task; write its run directory.",
                        argument_default=argparse.SUPPRESS)
    groups = {s: tr.add_argument_group(f"{s} settings") for s in ("model", "task", "train")}
    for dest, (flags, kind, section, help_) in SETTINGS.items():
        groups[section].add_argument(*flags, dest=dest, type=kind, help=help_)
    tr.add_argument("--config", help="YAML or JSON file of settings (explicit flags override it)")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--sequence-parallel", action="store_true",
                    help="cut every sequence along time over the processes of a torchrun launch "
                         "(LASP-2; gloo on CPU, NCCL with one GPU per process): "
                         "torchrun --nproc-per-node N -m linattn.cli train ... --sequence-parallel; "
                         "same weights as one process, rank 0 writes --out")

    ev = sub.add_parser("eval", help="evaluate a trained run on a fresh test set",
                        description="Reload a run directory and evaluate it on a fresh test set.")
    ev.add_argument("run_dir", help="directory written by `linattn train`")
    ev.add_argument("--seed", type=int, default=None,
                    help="test-set seed (default: the run's seed + 1, a test set never seen in training)")
    ev.add_argument("--batches", type=int, default=None, help="test batches (default: the run's eval_batches)")
    ev.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the run's)")
    ev.add_argument("--device", default=None, help="auto, cpu, cuda (default: the run's)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    ev.add_argument("--digits", default=None,
                    help="length generalisation: evaluate at these operand lengths instead, one row "
                         "each (6-9, 5,7 or 8; tasks with a digits knob)")

    sub.add_parser("bench", help="time the ops against softmax attention and peers (see `linattn bench --help`)",
                   add_help=False)
    return parser


# ------------------------------------------------------------------------------ settings

def _canonical(key: str) -> str:
    key = key.replace("-", "_")
    return ALIASES.get(key, key)


def flatten_config(data: dict, source: str) -> dict:
    """Flat {setting: value} from a config file's mapping: flat keys, or the "model", "task",
    "train" sections of a run's config.json. Values go through the flags' type parsers."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    flat = {}
    for key, value in data.items():
        if key in ("model", "task", "train") and isinstance(value, dict):
            for k, v in value.items():
                if key == "model" and k in ("vocab_size", "max_seq_len"):
                    continue  # derived from the task
                flat[_canonical(k)] = v
        else:
            flat[_canonical(key)] = value
    out = {}
    extra_model_keys = _model_fields() - {"vocab_size", "max_seq_len"} - set(SETTINGS)
    for key, value in flat.items():
        if key in extra_model_keys:  # LMConfig fields without a flag (tie_embeddings, ...)
            out[key] = value
            continue
        if key not in SETTINGS:
            raise ValueError(f"{source}: unknown setting {key!r}")
        kind = SETTINGS[key][1]
        try:
            out[key] = value if value is None else kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {key} = {value!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    return out


def _model_fields() -> set[str]:
    from .models import LMConfig

    return {f.name for f in fields(LMConfig)}


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path} not found")
    text = p.read_text()
    if p.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return flatten_config(data or {}, f"config file {path}")


def build_run(settings: dict):
    """(LMConfig, Task, TrainConfig) from flat settings; ValueError for anything that cannot run."""
    from .tasks import TASKS, make_task
    from .train import TrainConfig, model_config_for

    task_name = settings.get("task", "mqar")
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose one of {', '.join(TASKS)}")
    sections = {s: {} for s in ("model", "task", "train")}
    for key, value in settings.items():
        section = SETTINGS[key][2] if key in SETTINGS else "model"
        if key != "task":
            sections[section][key] = value
    task_knobs = set(TASKS[task_name].knobs())
    foreign = sorted(set(sections["task"]) - task_knobs)
    if foreign:
        flags = ", ".join(SETTINGS[k][0][0] for k in foreign)
        raise ValueError(f"{flags} does not apply to task {task_name} "
                         f"(its knobs: {', '.join('--' + k.replace('_', '-') for k in task_knobs)})")
    task = make_task(task_name, **sections["task"])
    model_kwargs = {k: v for k, v in sections["model"].items() if k in _model_fields()}
    model_cfg = model_config_for(task, **model_kwargs)
    train_cfg = TrainConfig.from_dict(sections["train"]).validate()
    return model_cfg, task, train_cfg


def _stored_settings(out: Path) -> dict:
    return flatten_config(json.loads((out / "config.json").read_text()), f"{out}/config.json")


# ------------------------------------------------------------------------------ commands

def _cmd_train(args) -> int:
    from .train import Interrupted, format_table, load_run, train

    explicit = {k: v for k, v in vars(args).items() if k in SETTINGS}
    settings = load_config_file(args.config) if getattr(args, "config", None) else {}
    settings.update(explicit)
    out = Path(args.out)
    resume = getattr(args, "resume", False)
    parallel = getattr(args, "sequence_parallel", False)
    lead = not parallel or os.environ.get("RANK", "0") == "0"  # the rank that prints

    if resume:
        if not (out / "checkpoint.pt").is_file() or not (out / "config.json").is_file():
            raise ValueError(f"--resume: {out} holds no checkpoint to continue")
        stored = _stored_settings(out)
        for key, value in settings.items():
            if key not in RESUME_MAY_CHANGE and key in stored and stored[key] != value:
                raise ValueError(f"--resume: {key}={value!r} differs from the run's {key}={stored[key]!r}")
        model_cfg, task, train_cfg = load_run(out)
        for key in RESUME_MAY_CHANGE & settings.keys():
            setattr(train_cfg, key, settings[key])
        train_cfg.validate()
    else:
        model_cfg, task, train_cfg = build_run(settings)
        if (out / "config.json").exists() and not getattr(args, "overwrite", False):
            raise ValueError(f"{out} already holds a run: pass --resume to continue it or --overwrite")

    try:
        metrics = train(model_cfg, task, train_cfg, out, resume=resume,
                        progress=not getattr(args, "no_progress", False), sequence_parallel=parallel)
    except Interrupted as e:
        if lead:
            print(f"interrupted at step {e.step}; continue with: linattn train --out {out} --resume",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    if not lead:
        return 0
    print(format_table([{"task": task.name, "model": metrics_model_name(model_cfg),
                   "params": f"{metrics['parameters']:,}", "steps": metrics["steps"],
                   "test loss": f"{metrics['loss']:.4f}", "accuracy": f"{metrics['accuracy']:.4f}",
                   "exact match": f"{metrics['exact_match']:.4f}",
                   "tokens/s": f"{metrics['tokens_per_s']:,.0f}" if metrics["tokens_per_s"] else "-"}]))
    print(f"wrote {out}/ (config.json, metrics.json, metrics.jsonl, model.safetensors, curves.png)")
    return 0


def metrics_model_name(model_cfg) -> str:
    from .train import _describe

    return _describe(model_cfg)


def _cmd_eval(args) -> int:
    from .train import evaluate_run, format_table, load_run

    out = Path(args.run_dir)
    _, _, cfg = load_run(out)
    seed = cfg.seed + 1 if args.seed is None else args.seed
    if getattr(args, "digits", None) is not None:
        return _cmd_eval_digits(args, out, seed)
    res = evaluate_run(out, seed=seed, batches=args.batches, batch_size=args.batch_size,
                       device=args.device)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(format_table([{"run": str(out), "task": res["task"], "model": res["model"],
                   "params": f"{res['parameters']:,}", "test seed": res["seed"],
                   "sequences": res["sequences"], "loss": f"{res['loss']:.4f}",
                   "accuracy": f"{res['accuracy']:.4f}", "exact match": f"{res['exact_match']:.4f}"}]))
    return 0


def _cmd_eval_digits(args, out: Path, seed: int) -> int:
    """`linattn eval RUN --digits 6-9`: one row per operand length (linattn.tasks.lengths)."""
    from .tasks.lengths import evaluate_lengths, parse_digits
    from .train import format_table

    res = evaluate_lengths(out, parse_digits(args.digits), seed=seed, batches=args.batches,
                           batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    trained = res["trained_digits"]
    print(f"{out}: {res['task']['name']} trained at {trained} digits, test seed {seed}")
    print(format_table([{"digits": r["digits"], "vs training": "trained" if r["digits"] == trained else
                         ("longer" if r["digits"] > trained else "shorter"),
                         "tokens": r["seq_len"], "sequences": r["sequences"],
                         "accuracy": f"{r['accuracy']:.4f}", "exact match": f"{r['exact_match']:.4f}"}
                        for r in res["rows"]]))
    return 0


def _cmd_bench(argv: list[str]) -> int:
    import importlib

    try:
        bench = importlib.import_module("linattn.bench")
    except ModuleNotFoundError as e:
        if e.name == "linattn.bench":
            print("linattn bench: error: the benchmark harness (linattn.bench) is not available "
                  "in this installation", file=sys.stderr)
            return 1
        raise
    result = bench.main(argv)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `linattn` command. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:])
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args)
        return _cmd_eval(args)
    except ValueError as e:
        if os.environ.get("LINATTN_DEBUG") == "1":
            raise
        message = " ".join(str(e).split())  # one line
        print(f"linattn {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
