"""The `linattn` command: train and evaluate models on synthetic tasks, run the benchmarks.

    linattn train --task mqar --mixer gated_deltanet --steps 2000 --out runs/mqar
    linattn train --config run.yaml --lr 3e-3 --out runs/x     # explicit flags beat the file
    linattn train --out runs/mqar --resume                      # continue an interrupted run
    linattn eval runs/mqar                                      # train's final test numbers again
    linattn generate runs/cmp --prompt "9.11 | 9.9 ?"           # a task's text in, the answer out
    torchrun --nproc-per-node 2 -m linattn.cli train ... --sequence-parallel   # LASP-2
    linattn bench ...                                           # linattn.bench.main(argv)
    linattn train --task digits --model vit --mixer mala --out runs/vit   # vision (linattn.vision)
    linattn sample runs/lit --class 3 --n 64                    # a DiT / LiT run's samples as a PNG grid

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


def _bool(text):
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"not a boolean: {text!r}")
    return t in ("true", "1", "yes")


def _int_or_epoch(text):
    return "epoch" if str(text).strip().lower() == "epoch" else int(text)


def _csv(text):
    if isinstance(text, (list, tuple)):
        return list(text)
    return [s.strip() for s in str(text).split(",") if s.strip()]


# dest: (flags, type, section, help). Dests are the config keys (LMConfig / task / TrainConfig).
SETTINGS = {
    # model
    "mixer": (["--mixer"], str, "model", "token mixer of every layer"),
    "d_model": (["--d-model"], int, "model", "model width"),
    "n_layers": (["--n-layers", "--layers"], int, "model", "number of layers"),
    "n_heads": (["--n-heads", "--heads"], int, "model", "heads per layer (must divide d_model)"),
    "hybrid": (["--hybrid"], _int_or_none, "model", "N for an N:1 hybrid: one attention layer after every N mixer layers"),
    "layers": (["--pattern"], _csv, "model", "explicit layer pattern, comma separated mixer names, "
               "e.g. gla,attention,gla (overrides --mixer and --hybrid; sets --n-layers)"),
    "mlp_ratio": (["--mlp-ratio"], float, "model", "MLP hidden size / d_model"),
    "sliding_window": (["--sliding-window"], _int_or_none, "model", "window of the attention layers (none: full)"),
    "feature_map": (["--feature-map"], str, "model", "feature map of the linear-attention mixers"),
    "backend": (["--backend"], str, "model", "ops backend: auto (Triton on CUDA), triton, torch, reference"),
    "norm": (["--norm"], str, "model", "norm of the blocks and the final norm: rms or layer (LayerNorm)"),
    "pos_embed": (["--pos-embed"], str, "model", "none, or learned (absolute position embeddings added "
                  "to the token embeddings)"),
    "identity_mlp": (["--identity-mlp"], _bool, "model", "with --mlp-ratio 0: each block adds norm(x) "
                     "where the MLP would be (Zoology's blocks with an identity state mixer)"),
    "embed_dropout": (["--embed-dropout"], float, "model", "dropout on the embeddings while training"),
    "init": (["--init"], str, "model", "default, or gpt2 (every Linear and embedding normal(0.02), "
             "biases zero, attention's output projection scaled by 1/sqrt(2 n_layers))"),
    "save_for_backward": (["--save-for-backward"], str, "model", "the linear mixers' memory-for-time "
                          "trade on Triton: states (keep chunk states for the backward) or recompute"),
    # task
    "task": (["--task"], str, "task", "the synthetic task"),
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
    "corpus": (["--corpus"], str, "task", "text: a directory or file of text (e.g. Python's stdlib)"),
    "test_percent": (["--test-percent"], int, "task", "text: percent of documents held out for evaluation"),
    "include": (["--include"], str, "task", "text: comma-separated file-name patterns to read (default *)"),
    "exclude": (["--exclude"], str, "task", "text: comma-separated directory/file-name patterns to skip"),
    "block_bytes": (["--block-bytes"], int, "task", "text: document size of a single-file corpus"),
    "digits_b": (["--digits-b"], int, "task", "arithmetic: digits of the second operand (0: as --digits)"),
    "tokenization": (["--tokenization"], str, "task",
                     "arithmetic, nupa: digit (one token per digit), l2r3 or r2l3 (groups of 3 digits "
                     "from the left / from the right)"),
    "lengths": (["--lengths"], str, "task", "arithmetic: fixed (every digit uniform), uniform "
                "(each operand's significant length uniform in 1..width, zero-padded) or simple "
                "(Qiu et al.'s mix: --simple-fraction of the samples with b zero but for one digit)"),
    "simple_fraction": (["--simple-fraction"], float, "task",
                        "arithmetic --lengths simple: the fraction of simple samples"),
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
    "beta2": (["--beta2"], float, "train", "AdamW's beta2 (beta1 is 0.9)"),
    "decay_all": (["--decay-all"], _bool, "train", "weight decay on every parameter, not only matrices"),
    "lr_period": (["--lr-period"], _int_or_epoch, "train", "steps between learning-rate changes, or "
                  "epoch (once per pass over the fixed training set, as Zoology's scheduler)"),
    "seed": (["--seed"], int, "train", "seed of the weights and of the data"),
    "device": (["--device"], str, "train", "auto, cpu, cuda or cuda:N"),
    "dtype": (["--dtype"], str, "train", "auto (bf16 autocast on CUDA, float32 on CPU), float32, bfloat16"),
    "log_every": (["--log-every"], int, "train", "steps per metrics.jsonl line"),
    "eval_every": (["--eval-every"], int, "train", "steps between test evaluations (0: at the end only, "
                   "-1: about 10 over the run)"),
    "eval_batches": (["--eval-batches"], int, "train", "test batches per evaluation"),
    "ckpt_every": (["--ckpt-every"], int, "train", "steps between checkpoints"),
    "time_limit_s": (["--time-limit"], float, "train", "stop training after this many seconds (0: none)"),
    "seq_len_warmup": (["--seq-len-warmup"], float, "train",
                       "fraction of the steps trained at the task's shortest length (0: none)"),
    "compile": (["--compile"], str, "train",
                "torch.compile the model: none, default or reduce-overhead (CUDA graphs, for small "
                "launch-bound models); on CPU the graph is captured with aot_eager"),
    # Zoology's MQAR protocol (see linattn.tasks.mqar and linattn.models.config.preset_settings)
    "preset": (["--preset"], str, "model", "a bundle of defaults that other settings override: "
               "zoology (Zoology's MQAR recipe: its data, model, optimiser and epochs; see "
               "linattn.models.config.preset_settings)"),
    "layout": (["--layout"], str, "task", "mqar: token layout, linattn or zoology"),
    "power_a": (["--power-a"], float, "task", "mqar (zoology layout): power law of the query positions"),
    "train_examples": (["--train-examples"], int, "task", "mqar: fixed training set size (0: fresh data every step)"),
    "test_examples": (["--test-examples"], int, "task", "mqar: fixed test set size (0: unlimited)"),
    "epochs": (["--epochs"], float, "train", "passes over the fixed training set (sets --steps unless given)"),
    "aux_loss_coef": (["--aux-loss-coef"], float, "train", "weight of auxiliary losses (MoM load balancing)"),
    "stop_at_accuracy": (["--stop-at-accuracy"], float, "train",
                         "stop once a periodic test evaluation reaches this accuracy (0: off)"),
    # vision (linattn.vision): --task digits with --model vit or dit
    "model_type": (["--model"], str, "model", "lm (a causal LM, the default), or vit / dit on --task digits "
                   "(linattn.vision: --mixer attention, linear, mala or lit)"),
    "patch_size": (["--patch-size"], int, "model", "vit, dit: patch side in pixels"),
    "diffusion_steps": (["--diffusion-steps"], int, "model", "dit: DDPM steps"),
    "inherit_from": (["--inherit-from"], str, "model", "dit: a trained DiT run to inherit every weight "
                     "but the mixers' from, and to distill from (LiT)"),
    "distill_eps": (["--distill-eps"], float, "model", "dit with --inherit-from: weight of the noise distillation"),
    "distill_var": (["--distill-var"], float, "model", "dit with --inherit-from: weight of the variance distillation"),
    "eval_samples": (["--eval-samples"], int, "model", "dit: samples per class of the sample-quality evaluation"),
}
ALIASES = {"heads": "n_heads", "batch": "batch_size", "time_limit": "time_limit_s", "pattern": "layers",
           "name": "task"}
RESUME_MAY_CHANGE = {"device", "time_limit_s", "steps"}
CLI_DEFAULTS = {"eval_every": -1}  # the command's defaults where they differ from TrainConfig's


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="linattn", description="Linear-attention models: train, evaluate, generate, "
                                                 "export and convert models, benchmark, self-test.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)  # lists every command
    sub.required = True

    tr = sub.add_parser("train", help="train a model on a synthetic task",
                        description="Train a causal LM on a synthetic task; write its run directory.",
                        argument_default=argparse.SUPPRESS)
    groups = {s: tr.add_argument_group(f"{s} settings") for s in ("model", "task", "train")}
    defaults = _setting_defaults()
    for dest, (flags, kind, section, help_) in SETTINGS.items():
        groups[section].add_argument(*flags, dest=dest, type=kind, help=_with_default(dest, help_, defaults))
    tr.add_argument("--config", help="YAML or JSON file of settings (explicit flags override it)")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its checkpoint (its settings, which may not "
                         "change, except --device, --time-limit and --steps). --steps N above the "
                         "steps it has trained extends it, a finished run too: training goes on to "
                         "step N, the learning rate following the schedule of an N-step run from "
                         "there (it rises again after a finished run's decay)")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    tr.add_argument("--no-progress", action="store_true",
                    help="no progress bar: a plain line on stderr every ~10 s instead (as when stderr "
                         "is not a terminal)")
    tr.add_argument("--sequence-parallel", action="store_true",
                    help="cut every sequence along time over the processes of a torchrun launch "
                         "(LASP-2; gloo on CPU, NCCL with one GPU per process): "
                         "torchrun --nproc-per-node N -m linattn.cli train ... --sequence-parallel; "
                         "same weights as one process, rank 0 writes --out")

    ev = sub.add_parser("eval", help="evaluate a trained run on its test split",
                        description="Reload a run directory and evaluate it on its task's test split "
                                    "(never drawn in training); by default on the batches of "
                                    "training's final evaluation, so it prints metrics.json's numbers.")
    ev.add_argument("run_dir", help="directory written by `linattn train`")
    ev.add_argument("--seed", type=int, default=None,
                    help="test-set seed (default: the run's seed, whose test split training never "
                         "drew from: with the default batches and batch size, the test numbers "
                         "train reported; another seed draws other test sequences)")
    ev.add_argument("--batches", type=int, default=None, help="test batches, >= 1 (default: the run's eval_batches)")
    ev.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the run's)")
    ev.add_argument("--device", default=None, help="auto, cpu, cuda (default: the run's)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    ev.add_argument("--digits", default=None,
                    help="length generalisation: evaluate at these operand lengths instead, one row "
                         "each (6-9, 5,7 or 8; tasks with a digits knob)")

    _add_generate_parser(sub)
    _add_sample_parser(sub)
    sub.add_parser("bench", help="time the ops against softmax attention and peers (see `linattn bench --help`)",
                   add_help=False)
    _build_export_parser(sub)
    _build_convert_parsers(sub)
    _add_selftest_parser(sub)
    return parser


def _add_generate_parser(sub) -> None:
    """`linattn generate RUN_DIR --prompt TEXT`: see _cmd_generate."""
    ge = sub.add_parser(
        "generate", help="continue a prompt with a trained run's model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue a prompt written in the run's task text with CausalLM.generate and print "
                    "the continuation (by default the task's answer) as text.",
        epilog="Task text (spaces between characters do not matter for arithmetic and compare):\n"
               "  compare     9.11 | 9.9 ?          answer <, > or =\n"
               "  arithmetic  123+456=              operands with exactly --digits digits; answer in\n"
               "                                    the run's --order (reversed: least significant first)\n"
               "  mqar        k3 v7 k1 v2 k3        keys k0.., values v0.., _ filler; answer v7\n"
               "  copy        * 5 9 4 * 12 7 3 |    marked tokens (after *), ids 3..vocab-1; answer 5 12")
    ge.add_argument("run_dir", help="directory written by `linattn train`, or a model directory "
                                    "written by `linattn export` / save_pretrained")
    ge.add_argument("--prompt", required=True, help="the prompt, in the task's text (see below)")
    ge.add_argument("--max-new-tokens", type=int, default=None,
                    help="tokens to generate (default: the length of the task's answer; "
                         "128 for text runs and model directories)")
    ge.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampled")
    ge.add_argument("--seed", type=int, default=0, help="seed of the sampling (temperature > 0)")
    ge.add_argument("--device", default=None, help="auto, cpu, cuda (default: the run's)")
    hf = ge.add_argument_group("text runs and model directories (transformers' generate; the hf extra)")
    hf.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    hf.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    hf.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' repetition penalty (1: off)")
    hf.add_argument("--no-stream", action="store_true", help="print the continuation at the end, not as it comes")


def _setting_defaults() -> dict:
    """dest -> the value a train setting takes when neither a flag nor --config gives it; task
    knobs map to {task name: default} (tasks share knob names with other defaults)."""
    from dataclasses import MISSING

    from .models import LMConfig
    from .tasks import TASKS
    from .train import TrainConfig

    out = {f.name: f.default for f in fields(LMConfig) if f.default is not MISSING}
    out.update({f.name: f.default for f in fields(TrainConfig)})
    out.update(CLI_DEFAULTS)
    out["task"] = "mqar"
    per_task = {}
    for name, cls in TASKS.items():
        for knob, value in cls.knobs().items():
            per_task.setdefault(knob, {})[name] = value
    return {**out, **per_task}


def _with_default(dest: str, help_: str, defaults: dict) -> str:
    """help_ plus the setting's choices (mixers, tasks) and "(default: ...)"."""
    if dest == "mixer":
        from .layers import MIXERS

        help_ += f": {', '.join(MIXERS)}"
    if dest == "task":
        from .tasks import TASKS

        help_ += f": {', '.join(TASKS)}"
    if dest not in defaults:
        return help_
    value = defaults[dest]
    if isinstance(value, dict):
        values = set(map(str, value.values()))
        value = (next(iter(values)) if len(values) == 1
                 else ", ".join(f"{task} {v}" for task, v in value.items()))
    elif value is None:
        value = "none"
    return f"{help_} (default: {value})".replace("%%", "%").replace("%", "%%")


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
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not a text file") from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ValueError(f"config file {path} is not valid YAML{where}: "
                             f"{str(getattr(e, 'problem', None) or e).splitlines()[0]}") from None
    return flatten_config(data or {}, f"config file {path}")


def build_run(settings: dict):
    """(LMConfig, Task, TrainConfig) from flat settings; ValueError for anything that cannot run."""
    from .tasks import TASKS, make_task
    from .train import TrainConfig, model_config_for

    task_name = settings.get("task", "mqar")
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose one of {', '.join(TASKS)}")
    settings, epochs = _with_preset(settings)
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
    layers = sections["model"].get("layers")
    if layers is not None:  # an explicit pattern sets the depth
        n_layers = sections["model"].setdefault("n_layers", len(layers))
        if n_layers != len(layers):
            raise ValueError(f"--pattern {','.join(layers)} has {len(layers)} layers but --n-layers "
                             f"is {n_layers}: give one of them, or make them agree")
    model_kwargs = {k: v for k, v in sections["model"].items() if k in _model_fields()}
    model_cfg = model_config_for(task, **model_kwargs)
    _fixed_set_schedule(task, sections["train"], epochs)
    for key, value in CLI_DEFAULTS.items():  # after the fixed set's schedule, which sets its own
        sections[SETTINGS[key][2]].setdefault(key, value)
    train_cfg = TrainConfig.from_dict(sections["train"]).validate()
    return model_cfg, task, train_cfg


def _with_preset(settings: dict) -> tuple[dict, float | None]:
    """(settings over the defaults of their "preset", if any, without "preset" and "epochs";
    the epochs asked for, or None)."""
    from .models.config import preset_settings

    settings = dict(settings)
    name = settings.pop("preset", None)
    if name is not None:
        settings = {**preset_settings(name, settings), **settings}
    return settings, settings.pop("epochs", None)


def _fixed_set_schedule(task, train: dict, epochs) -> None:
    """Fills, in place, the training settings a fixed training/test set implies unless given:
    steps = epochs x steps per epoch, an evaluation every epoch, and evaluation batches that
    cover the fixed test set (and no more); an lr_period of "epoch" becomes the steps per epoch."""
    batch = train.get("batch_size", 32)
    if train.get("lr_period") == "epoch":
        if not getattr(task, "train_examples", 0):
            raise ValueError(f"--lr-period epoch needs a task with a fixed training set, not "
                             f"{task.name} without --train-examples")
        train["lr_period"] = task.steps_per_epoch(batch)
    if epochs is not None:
        if not epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {epochs}")
        per_epoch = task.steps_per_epoch(batch) if hasattr(task, "steps_per_epoch") else None
        if per_epoch is None:
            raise ValueError(f"--epochs needs a task with a fixed training set, not {task.name}")
        train.setdefault("steps", max(1, round(epochs * per_epoch)))
        train.setdefault("eval_every", per_epoch)
    test = getattr(task, "test_examples", 0)
    if test:
        covered = -(-test // batch)
        train.setdefault("eval_batches", covered)
        if train["eval_batches"] > covered:
            raise ValueError(f"--eval-batches {train['eval_batches']} x batch {batch} exceeds the "
                             f"fixed test set of {test} examples ({covered} batches)")


def _stored_settings(out: Path) -> dict:
    from .train import read_run_config

    return flatten_config(read_run_config(out / "config.json"), f"{out}/config.json")


# ------------------------------------------------------------------------------ commands

def _cmd_train(args) -> int:
    from .train import Interrupted, format_table, load_run, train

    explicit = {k: v for k, v in vars(args).items() if k in SETTINGS}
    settings = load_config_file(args.config) if getattr(args, "config", None) else {}
    settings.update(explicit)
    if _is_vision_run(settings):  # --model vit | dit (linattn.vision)
        return _cmd_train_vision(settings, args)
    out = Path(args.out)
    resume = getattr(args, "resume", False)
    parallel = getattr(args, "sequence_parallel", False)
    lead = not parallel or os.environ.get("RANK", "0") == "0"  # the rank that prints

    if resume:
        if not (out / "config.json").is_file():
            raise ValueError(f"--resume: {out} holds no run to continue (no config.json)")
        stored = _stored_settings(out)
        for key, value in settings.items():
            if key not in RESUME_MAY_CHANGE and key in stored and stored[key] != value:
                raise ValueError(f"--resume: {key}={value!r} differs from the run's {key}={stored[key]!r}")
        if not (out / "checkpoint.pt").exists():  # stopped before its first checkpoint
            if lead:
                print(f"note: {out} has no checkpoint yet; training its run from step 0", file=sys.stderr)
            settings, resume = {**stored, **settings}, False
    if resume:
        model_cfg, task, train_cfg = load_run(out)
        for key in RESUME_MAY_CHANGE & settings.keys():
            setattr(train_cfg, key, settings[key])
        train_cfg.validate()
    else:
        model_cfg, task, train_cfg = build_run(settings)
        if _holds_a_run(out) and not getattr(args, "overwrite", False):
            raise ValueError(f"{out} already holds a run: pass --resume to continue it or --overwrite")
    created = _prepare_out(out) if lead and not resume else None

    try:
        metrics = train(model_cfg, task, train_cfg, out, resume=resume,
                        progress="lines" if getattr(args, "no_progress", False) else True,
                        sequence_parallel=parallel)
    except Interrupted as e:
        if lead:
            print(f"interrupted at step {e.step}; continue with: linattn train --out {out} --resume",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException:  # failed before a checkpoint: leave no half run that blocks a rerun
        if created is not None:
            _remove_unfinished(out, *created)
        raise
    if not lead:
        return 0
    _text_bits_per_byte(metrics, out)
    print(format_table([{"task": task.name, "model": metrics_model_name(model_cfg),
                   "params": f"{metrics['parameters']:,}", "steps": metrics["steps"],
                   "test loss": f"{metrics['loss']:.4f}", "accuracy": f"{metrics['accuracy']:.4f}",
                   "exact match": f"{metrics['exact_match']:.4f}",
                   "tokens/s": f"{metrics['tokens_per_s']:,.0f}" if metrics["tokens_per_s"] else "-"}]))
    if "bits_per_byte" in metrics:
        print(f"test bits per byte: {metrics['bits_per_byte']:.4f}")
    print(f"wrote {out}/ (config.json, metrics.json, metrics.jsonl, model.safetensors, curves.png)")
    return 0


def _holds_a_run(out: Path) -> bool:
    """Whether `out` holds something of a run worth keeping (a checkpoint, weights, metrics)."""
    from .train import CHECKPOINT_FILE, METRICS_FILE, WEIGHTS_FILE

    return any((out / name).exists() for name in (CHECKPOINT_FILE, WEIGHTS_FILE, METRICS_FILE))


def _prepare_out(out: Path) -> tuple[list[Path], list[str]]:
    """Creates the run directory `out`; returns what this invocation adds there (the
    directories it made, the run files that are not there yet) for _remove_unfinished.
    ValueError when `out` cannot be a run directory."""
    from .train import RUN_FILES

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    made, p = [], out
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write into the directory (permission denied)")
    return made, [name for name in RUN_FILES if not (out / name).exists()]


def _remove_unfinished(out: Path, made: list[Path], absent: list[str]) -> None:
    """After a run failed before its first checkpoint: remove the run files and directories
    this invocation created, so that a rerun starts clean. A run with a checkpoint stays
    (--resume continues it)."""
    from .train import CHECKPOINT_FILE

    if (out / CHECKPOINT_FILE).exists():
        return
    for name in absent:
        (out / name).unlink(missing_ok=True)
    for d in made:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


def metrics_model_name(model_cfg) -> str:
    from .train import _describe

    return _describe(model_cfg)


def _cmd_eval(args) -> int:
    from .train import evaluate_run, format_table

    out = Path(args.run_dir)
    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if getattr(args, "digits", None) is not None:
        from .train import load_run

        seed = load_run(out)[2].seed if args.seed is None else args.seed  # eval's default: the run's
        return _cmd_eval_digits(args, out, seed)
    res = evaluate_run(out, seed=args.seed, batches=args.batches, batch_size=args.batch_size,
                       device=args.device)
    _text_bits_per_byte(res)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(format_table([{"run": str(out), "task": res["task"], "model": res["model"],
                   "params": f"{res['parameters']:,}", "test seed": res["seed"],
                   "sequences": res["sequences"], "loss": f"{res['loss']:.4f}",
                   "accuracy": f"{res['accuracy']:.4f}", "exact match": f"{res['exact_match']:.4f}"}]))
    if "bits_per_byte" in res:
        print(f"bits per byte: {res['bits_per_byte']:.4f}")
    return 0


def _cmd_generate(args) -> int:
    """Continue --prompt, written in the run's task text, with the run's model; print the
    continuation as text (for task runs by default the task's answer, see Task.answer_text)."""
    import torch

    from .train import autocast, load_trained, resolve_dtype

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if _generates_text(Path(args.run_dir)):
        return _generate_hf(args)
    hf_only = [flag for flag, value, off in (("--top-p", args.top_p, 1.0), ("--top-k", args.top_k, 0),
                                             ("--repetition-penalty", args.repetition_penalty, 1.0))
               if value != off]
    if hf_only:
        raise ValueError(f"{', '.join(hf_only)} apply to text runs and model directories; a task run "
                         "answers with CausalLM.generate (greedy, or sampled with --temperature)")
    model, model_cfg, task, cfg, dev = load_trained(args.run_dir, args.device)
    try:
        prompt = task.prompt_ids(args.prompt)
    except (ValueError, NotImplementedError) as e:  # not a token / a task without a text form
        raise ValueError(f"--prompt: {e}") from None
    # default: the task's answer length, or (answers of varying length) room to its end
    n = args.max_new_tokens or task.answer_len or max(1, min(64, model_cfg.max_seq_len - len(prompt)))
    if len(prompt) + n > model_cfg.max_seq_len:
        raise ValueError(f"--prompt ({len(prompt)} tokens with BOS) plus {n} new tokens is longer than "
                         f"the model's max_seq_len {model_cfg.max_seq_len}")
    generator = torch.Generator(device=dev).manual_seed(args.seed)
    with autocast(dev, resolve_dtype(cfg.dtype, dev)):
        ids = model.generate(torch.tensor([prompt], device=dev), n, temperature=args.temperature,
                             generator=generator)  # [1, len(prompt) + n]
    print(task.answer_text(ids[0, len(prompt):].tolist()))
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


# ------------------------------------------------------- selftest

def _add_selftest_parser(sub) -> None:
    """`linattn selftest`: listed here for --help; linattn.selftest parses its own flags."""
    sub.add_parser("selftest", help="check every op, gate kind and dtype on this device against "
                                    "the float64 oracle (see `linattn selftest --help`)",
                   add_help=False)


def _cmd_selftest(argv: list[str]) -> int:
    from . import selftest

    return selftest.main(argv)


# ------------------------------------------------------- transformers: export, generate, text

def _build_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="convert a run directory to a transformers model directory",
                        description="Write a `linattn train` run as a transformers model directory "
                                    "(config.json, model.safetensors, tokenizer) that "
                                    "AutoModelForCausalLM loads after `import linattn.hf`. "
                                    "Needs the hf extra: pip install 'linattn[hf]'.")
    ex.add_argument("run_dir", help="directory written by `linattn train`")
    ex.add_argument("out_dir", help="directory to write")


def _import_hf():
    """linattn.hf, or a ValueError (one line on stderr) naming the extra to install."""
    try:
        import linattn.hf as hf
    except ImportError as e:
        raise ValueError(str(e)) from None
    return hf


def _cmd_export(args) -> int:
    export_run = _import_hf().export_run

    out = export_run(args.run_dir, args.out_dir)
    print(f"wrote {out}/ (config.json, model.safetensors, generation_config.json, tokenizer)")
    return 0


def _generates_text(path: Path) -> bool:
    """A model directory (linattn export / save_pretrained) or a run of the text task: these
    generate through transformers (linattn.hf.generate); other runs through their task."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        return False
    task = data.get("task")
    return data.get("model_type") == "linattn" or (isinstance(task, dict) and task.get("name") == "text")


def _generate_hf(args) -> int:
    """`linattn generate` through transformers (linattn.hf.generate) for a model directory or
    any run directory: the text task's runs read and print text, synthetic tasks' runs
    space-separated token ids."""
    _import_hf()
    from .hf.generate import generate_cli

    generate_cli(args.run_dir, args.prompt, device=args.device or "auto", stream=not args.no_stream,
                 seed=args.seed, max_new_tokens=args.max_new_tokens or 128,
                 temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    return 0


def _text_bits_per_byte(res: dict, out: Path | None = None) -> None:
    """For the text task: res["bits_per_byte"] = loss / ln 2 (the loss is nats per byte token),
    also written into out/metrics.json when out is given."""
    import math

    if res.get("task") != "text":
        return
    res["bits_per_byte"] = res["loss"] / math.log(2)
    if out is not None and (out / "metrics.json").is_file():
        from .train import write_json

        stored = json.loads((out / "metrics.json").read_text())
        stored["bits_per_byte"] = res["bits_per_byte"]
        write_json(out / "metrics.json", stored)


# ----------------------------------------------------- linearization: convert, distill

def _build_convert_parsers(sub) -> None:
    from .convert.llama import CONVERT_MIXERS, METHODS

    cv = sub.add_parser("convert", help="linearize a Llama-family transformers model",
                        description="Turn a Llama-family causal LM directory (Llama, Qwen2, Mistral) into "
                                    "a linattn.hf model directory whose attention layers are linear "
                                    "(Liger, Liger Attention, Hedgehog, LoLCATs). Needs the hf extra.")
    cv.add_argument("src", help="transformers model directory (config.json, weights, tokenizer)")
    cv.add_argument("out", help="directory to write")
    cv.add_argument("--method", required=True, choices=METHODS)
    cv.add_argument("--mixer", choices=CONVERT_MIXERS, default=None,
                    help="the recurrence (default: gla for liger*, linear for hedgehog and lolcats)")
    cv.add_argument("--window", type=int, default=None,
                    help="sliding window of liger-attention / lolcats (default 64)")
    cv.add_argument("--keep-attention", type=_csv, default=[], metavar="I,J,...",
                    help="layers (0-based) left as softmax attention (a hybrid)")
    di = sub.add_parser("distill", help="train a converted model (attention transfer, fine-tuning)",
                        description="Train a `linattn convert` directory in place on a text corpus: "
                                    "--stage attention (teacher frozen, only the method's new parameters "
                                    "learn to reproduce each attention layer's output), --stage finetune "
                                    "(next-token loss; LoRA through peft, or every weight with "
                                    "--lora-rank 0). Checkpoints in OUT/distill-STAGE/; rerun to resume.")
    di.add_argument("out", help="directory written by `linattn convert` (updated in place)")
    di.add_argument("--teacher", default=None, help="the converted source model (attention stage)")
    di.add_argument("--corpus", required=True, help="a directory or a file of text")
    di.add_argument("--stage", required=True, choices=("attention", "finetune"))
    di.add_argument("--lora-rank", type=int, default=8, help="LoRA rank; 0: full fine-tuning (default 8)")
    di.add_argument("--loss", choices=("output", "weights"), default="output",
                    help="attention stage: match each layer's attention output before o_proj (MSE) or its attention weights "
                         "(Hedgehog's cross-entropy; --method hedgehog)")
    di.add_argument("--steps", type=int, default=200)
    di.add_argument("--batch", type=int, default=8, dest="batch_size")
    di.add_argument("--seq-len", type=int, default=512)
    di.add_argument("--lr", type=float, default=None, help="default 1e-2 (attention), 1e-3 (finetune)")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--device", default="auto")
    di.add_argument("--ckpt-every", type=int, default=50)
    di.add_argument("--time-limit", type=float, default=0.0, dest="time_limit_s",
                    help="stop (resumably) after this many seconds")


def _cmd_convert(args) -> int:
    _import_hf()
    from .convert.llama import convert

    keep = [int(i) for i in args.keep_attention]
    out = convert(args.src, args.out, args.method, mixer=args.mixer, window=args.window, keep_attention=keep)
    print(f"wrote {out}/ ({args.method}; attention kept in layers {keep or 'none'})")
    return 0


def _cmd_distill(args) -> int:
    _import_hf()
    from .convert.distill import distill
    from .train import TrainConfig

    lr = args.lr if args.lr is not None else (1e-2 if args.stage == "attention" else 1e-3)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, weight_decay=0.0, seed=args.seed,
                      device=args.device, ckpt_every=args.ckpt_every, time_limit_s=args.time_limit_s).validate()
    res = distill(args.out, args.teacher, args.corpus, args.stage, cfg, seq_len=args.seq_len,
                  lora_rank=args.lora_rank, loss=args.loss)
    print(json.dumps(res))
    return 0


# ------------------------------------------------------------- vision: train --model vit|dit, sample

VISION_ONLY = ("patch_size", "diffusion_steps", "inherit_from", "distill_eps", "distill_var", "eval_samples")


def _is_vision_run(settings: dict) -> bool:
    """Whether the settings ask for a vision run (--model vit | dit); ValueError for vision
    settings without one, and for --model lm with --task digits."""
    kind = settings.get("model_type", "lm")
    if kind in ("vit", "dit"):
        return True
    if kind != "lm":
        raise ValueError(f"--model must be lm, vit or dit, got {kind!r}")
    given = [SETTINGS[k][0][0] for k in VISION_ONLY if k in settings]
    if given:
        raise ValueError(f"{', '.join(given)} apply to --model vit or dit")
    if settings.get("task") == "digits":
        raise ValueError("task digits is images: train it with --model vit or --model dit")
    return False


def _cmd_train_vision(settings: dict, args) -> int:
    """`linattn train --task digits --model vit|dit ...`: linattn.vision.train.train_vision."""
    from dataclasses import fields as dc_fields

    from .train import TrainConfig, format_table
    from .vision.models import VisionConfig
    from .vision.train import train_vision

    if getattr(args, "resume", False) or getattr(args, "sequence_parallel", False):
        raise ValueError("vision runs start fresh on one process: no --resume or --sequence-parallel")
    settings = dict(settings)
    task = settings.pop("task", "digits")
    if task != "digits":
        raise ValueError(f"--model {settings['model_type']} trains on --task digits, not {task}")
    vision_keys = {f.name for f in dc_fields(VisionConfig)}
    train_keys = {f.name for f in dc_fields(TrainConfig)}
    foreign = sorted(k for k in settings if k not in vision_keys | train_keys)
    if foreign:
        raise ValueError(f"{', '.join(SETTINGS[k][0][0] if k in SETTINGS else k for k in foreign)} "
                         "do not apply to vision runs")
    vcfg = VisionConfig(**{k: v for k, v in settings.items() if k in vision_keys}).validate()
    train = {k: v for k, v in settings.items() if k in train_keys}
    for key, value in CLI_DEFAULTS.items():
        train.setdefault(key, value)
    tcfg = TrainConfig.from_dict(train).validate()
    out = Path(args.out)
    if _holds_a_run(out) and not getattr(args, "overwrite", False):
        raise ValueError(f"{out} already holds a run: pass --overwrite to replace it")
    m = train_vision(vcfg, tcfg, out, progress=True)
    row = {"task": "digits", "model": vcfg.model_type, "mixer": vcfg.mixer, "params": f"{m['parameters']:,}",
           "steps": m["steps"], "accuracy": f"{m['accuracy']:.4f}"}
    if vcfg.model_type == "dit":
        row["fd"] = f"{m['fd']:.3f}"
    print(format_table([row]))
    print(f"wrote {out}/ (config.json, metrics.json, metrics.jsonl, model.safetensors)")
    return 0


def _add_sample_parser(sub) -> None:
    sa = sub.add_parser("sample", help="draw images from a trained DiT / LiT run as a PNG grid",
                        description="Sample --n images of --class from a `linattn train --model dit` run "
                                    "(the full reverse chain) and write them as a PNG grid.")
    sa.add_argument("run_dir", help="directory written by `linattn train --task digits --model dit`")
    sa.add_argument("--class", dest="cls", type=int, required=True, help="the digit to draw, 0..9")
    sa.add_argument("--n", type=int, default=64, help="how many images (default 64)")
    sa.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    sa.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/samples_class{C}.png)")
    sa.add_argument("--device", default=None, help="auto, cpu, cuda (default: the run's)")


def _cmd_sample(args) -> int:
    import torch

    from .train import resolve_dtype
    from .vision.data import NUM_CLASSES, to_pixels
    from .vision.png import image_grid, write_png
    from .vision.quality import train_judge
    from .vision.train import generate, load_vision_run

    if not 0 <= args.cls < NUM_CLASSES:
        raise ValueError(f"--class must be in 0..{NUM_CLASSES - 1}, got {args.cls}")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model, vcfg, tcfg, dev = load_vision_run(args.run_dir, args.device)
    if vcfg.model_type != "dit":
        raise ValueError(f"{args.run_dir} is a {vcfg.model_type} run: sample needs a --model dit run")
    labels = torch.full((args.n,), args.cls, dtype=torch.long)
    images = generate(model, vcfg, labels, seed=args.seed, device=dev, dtype=resolve_dtype(tcfg.dtype, dev))
    path = Path(args.out) if args.out else Path(args.run_dir) / f"samples_class{args.cls}.png"
    write_png(path, image_grid(to_pixels(images)[:, 0], columns=8))
    judged = float((train_judge(seed=0)(images).argmax(-1) == args.cls).float().mean())
    print(f"wrote {path} ({args.n} samples of class {args.cls}; the judge reads {judged:.0%} of them as {args.cls})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `linattn` command. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:])
    if argv and argv[0] == "selftest":
        return _cmd_selftest(argv[1:])
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command in ("convert", "distill"):
            return _cmd_convert(args) if args.command == "convert" else _cmd_distill(args)
        if args.command == "sample":
            return _cmd_sample(args)
        return _cmd_eval(args)
    except (ValueError, OSError) as e:
        if os.environ.get("LINATTN_DEBUG") == "1":
            raise
        if isinstance(e, OSError) and e.filename is not None:  # a file the command reads or writes
            e = f"{e.filename}: {e.strerror}"
        message = " ".join(str(e).split())  # one line
        print(f"linattn {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
