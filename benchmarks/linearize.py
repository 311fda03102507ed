"""Linearization bar: one softmax teacher, every `linattn convert` method, the same small
distillation budget; held-out bits per byte and generation speed.

    # 1. the teacher (time-boxed to --teacher-budget seconds, default 420; kept in --work)
    PYTHONPATH=$PWD python benchmarks/linearize.py teacher --work runs/linearize
    # 2. every method: convert, distill, evaluate; then generation speed; JSON + table
    PYTHONPATH=$PWD python benchmarks/linearize.py methods --work runs/linearize \
        --out benchmarks/results/linearize.json

Each command stays under 10 minutes; the second reads the teacher the first saved in --work
(runs/ is git-ignored, so it stays on a warm device machine between commands; a finished
step is skipped when a command is run again, a teacher cut short is trained afresh).

Teacher: transformers' LlamaForCausalLM, 6 layers, d_model 512, 8 heads (4 key/value heads:
GQA), SwiGLU 1376, byte vocabulary (257), trained on the Python standard library's source
(the text task, held-out files by hash) at sequence length 512, batch 32, bf16 autocast, for
as many steps (up to --teacher-steps) as --teacher-budget allows (measured on a probe).

Methods: liger, liger-attention, hedgehog, lolcats (linattn/convert/llama.py says what each
is). Budget: --budget-percent (1%) of the teacher's training tokens, split into the attention
transfer stage (a quarter; Hedgehog and LoLCATs only) and LoRA fine-tuning (rank 8, q/k/v/o)
for the rest; Liger and Liger Attention spend it all on fine-tuning. Hedgehog's attention
stage matches attention weights (its paper's loss), LoLCATs' the layer outputs (MSE).

Metrics: bits per byte on the held-out split (the same windows for every model), the
unigram baseline's (byte frequencies of the training split), and each method's recovery
(unigram - method) / (unigram - teacher). Generation: batch 64, a 2048-token prompt (held-out
text), 512 new tokens, greedy, bf16 weights: teacher with transformers' generate (SDPA,
DynamicCache); each converted model with generate() and with linattn.hf.greedy; tokens/s
and speed-up over the teacher. Speed does not depend on the weights, so it is timed on the
converted models as converted.

When to run it: on one GPU after a change to a `linattn convert` method, the distillation or
the LoRA fine-tuning; it is the source of BENCHMARKS.md's linearization table.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

METHODS = ("liger", "liger-attention", "hedgehog", "lolcats")


def corpus() -> str:
    return str(Path(sysconfig.get_paths()["stdlib"]))


def stage_teacher(args) -> dict:
    from linattn.convert.teacher import teacher_config, train_teacher
    from linattn.train import TrainConfig

    work = Path(args.work)
    tdir = work / "teacher"
    if (tdir / "train" / "result.json").is_file():
        print("teacher: already trained")
        return json.loads((tdir / "train" / "result.json").read_text())
    if tdir.exists():
        shutil.rmtree(tdir)  # a teacher cut short starts over (its schedule was for other steps)
    d, layers, heads, kv = args.teacher_dims
    cfg_model = teacher_config(d, layers, heads, kv, max_len=4096)
    # probe: seconds per step on a throwaway copy, so the real run's schedule fits the budget
    probe = TrainConfig(steps=15, batch_size=args.batch, lr=1e-3, device=args.device, ckpt_every=10**6)
    t0 = time.perf_counter()
    train_teacher(corpus(), work / "probe", cfg_model, probe, seq_len=args.seq_len, progress=False)
    per_step = (time.perf_counter() - t0) / probe.steps
    shutil.rmtree(work / "probe", ignore_errors=True)
    steps = max(10, min(args.teacher_steps, int(0.9 * args.teacher_budget / per_step)))
    print(f"teacher: {per_step * 1000:.0f} ms/step (probe, start-up included) -> {steps} steps")
    cfg = TrainConfig(steps=steps, batch_size=args.batch, lr=2e-3, warmup_steps=min(200, steps // 10),
                      device=args.device, ckpt_every=10**6)
    res = train_teacher(corpus(), tdir, cfg_model, cfg, seq_len=args.seq_len)
    (tdir / "train" / "checkpoint.pt").unlink(missing_ok=True)  # optimizer state: not needed any more
    return res


def unigram_bpb(task, batches: int, batch: int) -> float:
    """Cross-entropy (bits) of the training split's byte frequencies (add-one) on the
    held-out windows bits_per_byte reads."""
    counts = torch.ones(257, dtype=torch.float64)
    for i in range(200):
        counts += torch.bincount(task.batch("train", 1, i, batch).targets.flatten(), minlength=257)
    logp = (counts / counts.sum()).log()
    total = 0.0
    for i in range(batches):
        total += float(-logp[task.batch("test", 0, i, 16).targets].mean())
    return total / batches / math.log(2)


def method_result(args, method: str, teacher_tokens: int) -> dict:
    import linattn.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from linattn.convert.distill import distill
    from linattn.convert.llama import convert
    from linattn.convert.teacher import bits_per_byte
    from linattn.tasks.text import Text
    from linattn.train import TrainConfig

    work = Path(args.work)
    out = work / method
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    convert(work / "teacher", out, method)
    task = Text(corpus=corpus(), seq_len=args.seq_len)
    untrained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(args.device).eval()
    bpb_untrained = bits_per_byte(untrained, task, batches=args.eval_batches, batch_size=16)
    del untrained
    budget = int(args.budget_percent / 100 * teacher_tokens)
    per_step = args.distill_batch * args.seq_len
    stages = {"finetune": budget // per_step}
    if method in ("hedgehog", "lolcats"):
        stages = {"attention": budget // 4 // per_step, "finetune": (budget - budget // 4) // per_step}
    row = {"method": method, "budget_tokens": budget, "bpb_as_converted": bpb_untrained, "stages": {}}
    for stage, steps in stages.items():
        cfg = TrainConfig(steps=max(1, steps), batch_size=args.distill_batch, weight_decay=0.0,
                          lr=1e-2 if stage == "attention" else 1e-3, warmup_steps=min(10, steps // 10),
                          device=args.device, ckpt_every=10**6)
        loss = "weights" if (method == "hedgehog" and stage == "attention") else "output"  # Hedgehog's own loss
        res = distill(out, str(work / "teacher"), corpus(), stage, cfg, seq_len=args.seq_len, lora_rank=8, loss=loss)
        row["stages"][stage] = res
    row["tokens"] = sum(s["tokens"] for s in row["stages"].values())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(args.device).eval()
    row["bpb"] = bits_per_byte(model, task, batches=args.eval_batches, batch_size=16)
    row["seconds"] = time.perf_counter() - t0
    shutil.rmtree(out)  # the models are re-made for the speed runs (speed does not need their weights)
    return row


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_generate(model, run, ids, n) -> dict:
    sync(ids.device)
    t0 = time.perf_counter()
    seq = run(ids, n)
    sync(ids.device)
    wall = time.perf_counter() - t0
    assert seq.shape == (ids.shape[0], ids.shape[1] + n), seq.shape
    return {"wall_s": wall, "tokens_per_s": ids.shape[0] * n / wall}


def speed_rows(args) -> list[dict]:
    import linattn.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from linattn.convert.llama import convert
    from linattn.hf.greedy import greedy_generate
    from linattn.tasks.text import Text

    work = Path(args.work)
    task = Text(corpus=corpus(), seq_len=args.prompt)
    ids = task.batch("test", 7, 0, args.gen_batch).input_ids.to(args.device)
    n = args.new_tokens

    def hf(model):
        return lambda x, k: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k,
                                           min_new_tokens=k, do_sample=False, pad_token_id=0)

    models = {"teacher": AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.bfloat16)}
    for method in METHODS:
        models[method] = AutoModelForCausalLM.from_pretrained(
            convert(work / "teacher", work / f"speed-{method}", method), dtype=torch.bfloat16)
        shutil.rmtree(work / f"speed-{method}")
    rows = []
    for name, model in models.items():
        model = model.to(args.device).eval()
        runs = {"hf.generate": hf(model)}
        if name != "teacher":
            runs["linattn greedy"] = lambda x, k, m=model: greedy_generate(m, x, k)
            if torch.device(args.device).type == "cuda":
                runs["linattn greedy+graph"] = lambda x, k, m=model: greedy_generate(m, x, k, cuda_graph=True)
        for how, run in runs.items():
            try:
                run(ids[:, :256], 8)  # warm-up: kernels compiled and tuned
                rows.append({"model": name, "how": how, **time_generate(model, run, ids, n)})
            except Exception as e:  # noqa: BLE001  (record it, time the others)
                rows.append({"model": name, "how": how, "error": f"{type(e).__name__}: {e}"})
        models[name] = model.cpu()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = next((r["tokens_per_s"] for r in rows if r["model"] == "teacher" and "tokens_per_s" in r), None)
    for r in rows:
        r["speedup_vs_teacher"] = r["tokens_per_s"] / base if base and "tokens_per_s" in r else None
    return rows


def stage_methods(args) -> dict:
    import transformers

    from linattn.convert.teacher import bits_per_byte
    from linattn.tasks.text import Text

    work = Path(args.work)
    tres = json.loads((work / "teacher" / "train" / "result.json").read_text())
    results_path = work / "results.json"
    res = json.loads(results_path.read_text()) if results_path.is_file() else {"methods": {}}
    t0 = time.perf_counter()
    task = Text(corpus=corpus(), seq_len=args.seq_len)
    if "teacher_bpb" not in res:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).to(args.device).eval()
        res["teacher_bpb"] = bits_per_byte(teacher, task, batches=args.eval_batches, batch_size=16)
        res["unigram_bpb"] = unigram_bpb(task, args.eval_batches, args.batch)
        res["teacher"] = tres
    for method in args.methods:
        if method in res["methods"]:
            continue
        if time.perf_counter() - t0 > args.time_budget:
            print(f"time budget spent: run the command again for {method}")
            break
        row = method_result(args, method, tres["tokens"])
        row["recovery"] = (res["unigram_bpb"] - row["bpb"]) / (res["unigram_bpb"] - res["teacher_bpb"])
        res["methods"][method] = row
        results_path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"{method}: {row['bpb']:.3f} bpb, recovery {row['recovery']:.1%}, {row['seconds']:.0f} s")
    if "speed" not in res and time.perf_counter() - t0 < args.time_budget and not args.skip_speed:
        res["speed"] = speed_rows(args)
    res.update(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               torch=torch.__version__, transformers=transformers.__version__,
               python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
               settings={k: v for k, v in vars(args).items() if k not in ("func",)})
    results_path.write_text(json.dumps(res, indent=2) + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    return res


def print_table(res: dict) -> None:
    t = res["teacher"]
    print(f"{res['gpu']}; teacher {res['settings']['teacher_dims']}: {t['steps']} steps, {t['tokens'] / 1e6:.1f}M tokens; held-out bits/byte: "
          f"teacher {res['teacher_bpb']:.3f}, unigram {res['unigram_bpb']:.3f}")
    head = f"{'method':<16} {'tokens':>9} {'% teacher':>9} {'as converted':>12} {'bits/byte':>9} {'recovery':>8}"
    print(head + "\n" + "-" * len(head))
    for m, r in res["methods"].items():
        print(f"{m:<16} {r['tokens']:>9,} {100 * r['tokens'] / t['tokens']:>8.2f}% {r['bpb_as_converted']:>12.3f} {r['bpb']:>9.3f} {r['recovery']:>8.1%}")
    if "speed" in res:
        head = f"{'model':<16} {'how':<20} {'wall s':>7} {'tok/s':>9} {'vs teacher':>10}"
        print(head + "\n" + "-" * len(head))
        for r in res["speed"]:
            if "error" in r:
                print(f"{r['model']:<16} {r['how']:<20} error: {r['error'][:80]}")
                continue
            sp = "-" if r["speedup_vs_teacher"] is None else f"{r['speedup_vs_teacher']:.2f}x"
            print(f"{r['model']:<16} {r['how']:<20} {r['wall_s']:>7.2f} {r['tokens_per_s']:>9,.0f} {sp:>10}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("teacher", "methods"))
    p.add_argument("--work", default="runs/linearize")
    p.add_argument("--out", default=None, help="also write the results JSON here")
    p.add_argument("--device", default="cuda")
    p.add_argument("--teacher-steps", type=int, default=6000)
    p.add_argument("--teacher-dims", type=int, nargs=4, default=[512, 6, 8, 4], metavar=("D", "LAYERS", "HEADS", "KV"))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="teacher batch")
    p.add_argument("--teacher-budget", type=float, default=420.0, help="seconds of teacher training")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget-percent", type=float, default=1.0)
    p.add_argument("--distill-batch", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--time-budget", type=float, default=360.0, help="no new method starts after this many seconds")
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.stage == "teacher":
        stage_teacher(args)
    else:
        stage_methods(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
