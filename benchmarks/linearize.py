"""Linearization bar: one softmax teacher, every `linattn convert` method, the same small
distillation budget; held-out bits per byte and generation speed.

    # 1. the teacher (trained for --teacher-budget seconds, default 420; ~7.5 min in all)
    PYTHONPATH=$PWD python benchmarks/linearize.py teacher --work runs/linearize
    # 2. every method: convert, distill, evaluate; resumable, run again until "methods: all done"
    PYTHONPATH=$PWD python benchmarks/linearize.py methods --work runs/linearize --out $OUT/linearize.json
    # 3. generation speed of the teacher and each converted model, into the same JSON
    PYTHONPATH=$PWD python benchmarks/linearize.py speed --work runs/linearize --out $OUT/linearize.json

Each command fits a 10-minute device call: `methods` and `speed` start no new work after
--time-budget seconds (420); a distillation stage running at that point stops at its
checkpoint (--eval-reserve seconds, 45, are kept for the evaluation after it) and the next
`methods` command resumes it: what is done is in --work (runs/ is git-ignored, so it stays on
a warm device machine between commands) and WORK/results.json (copied to --out), and a
finished teacher, method or model timing is never redone. A teacher cut short is trained
afresh.

Teacher: transformers' LlamaForCausalLM, 6 layers, d_model 512, 8 heads (4 key/value heads:
GQA), SwiGLU 1376, byte vocabulary (257), trained on the Python standard library's source
(the text task, held-out files by hash; --corpus for another) at sequence length 512, batch
32, bf16 autocast, for as many steps (up to --teacher-steps) as --teacher-budget allows
(measured on a probe).

Methods: liger, liger-attention, hedgehog, lolcats (docs/linearization.md compares each with
its authors' code). Budget: --budget-percent (1%) of the teacher's training tokens. Liger and
Liger Attention spend it on LoRA fine-tuning (q/k/v, lr 1e-3); Hedgehog and LoLCATs split it
in half between attention transfer (lr 1e-2; Hedgehog matches attention weights, LoLCATs the
attention outputs) and LoRA fine-tuning (q/k/v/o, lr 1e-4), the learning rates of the
authors' configs (LRS; --finetune-lr overrides the fine-tuning one), constant, no warm-up.
LoRA rank --lora-rank (8), batch --distill-batch (8) windows of --seq-len.

Metrics: bits per byte on the held-out split (the same windows for every model), the
unigram baseline's (byte frequencies of the training split), and each method's recovery
(unigram - method) / (unigram - teacher), with the tokens it used against its budget and the
teacher's tokens. Generation: batch 64, a 2048-token prompt (held-out text), 512 new tokens,
greedy, bf16 weights: teacher with transformers' generate (SDPA, DynamicCache); each converted
model with generate() and with linattn.hf.greedy; tokens/s and speed-up over the teacher.
Speed does not depend on the weights, so it is timed on the converted models as converted.

CPU smoke (tests/convert/test_linearize_bench.py runs the same in-process):
    A="--work /tmp/lin --device cpu --corpus $STDLIB/json --seq-len 64 --no-progress"
    python benchmarks/linearize.py teacher $A --teacher-dims 64 2 4 2 --batch 8 --teacher-budget 20 --teacher-steps 150
    python benchmarks/linearize.py methods $A --distill-batch 4 --eval-batches 2 --budget-percent 10
    python benchmarks/linearize.py speed $A --gen-batch 2 --prompt 64 --new-tokens 8

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
    train_teacher(args.corpus, work / "probe", cfg_model, probe, seq_len=args.seq_len, progress=False)
    per_step = (time.perf_counter() - t0) / probe.steps
    shutil.rmtree(work / "probe", ignore_errors=True)
    steps = max(10, min(args.teacher_steps, int(0.9 * args.teacher_budget / per_step)))
    print(f"teacher: {per_step * 1000:.0f} ms/step (probe, start-up included) -> {steps} steps")
    cfg = TrainConfig(steps=steps, batch_size=args.batch, lr=2e-3, warmup_steps=min(200, steps // 10),
                      device=args.device, ckpt_every=10**6)
    res = train_teacher(args.corpus, tdir, cfg_model, cfg, seq_len=args.seq_len, progress=args.progress)
    (tdir / "train" / "checkpoint.pt").unlink(missing_ok=True)  # optimizer state: not needed any more
    print(f"teacher: {res['step']} steps, {res['tokens']:,} tokens (1% = {res['tokens'] // 100:,}), "
          f"final loss {res['losses'][-1]:.3f}")
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


# The authors' learning rates (docs/linearization.md): Liger fine-tunes its LoRA at 1e-3;
# LoLCATs (and Hedgehog, run by LoLCATs' code) transfers attention at 1e-2, fine-tunes at 1e-4.
LRS = {"liger": {"finetune": 1e-3}, "liger-attention": {"finetune": 1e-3},
       "hedgehog": {"attention": 1e-2, "finetune": 1e-4}, "lolcats": {"attention": 1e-2, "finetune": 1e-4}}


def stage_steps(method: str, budget_tokens: int, per_step: int) -> dict:
    """Steps per distillation stage: Liger spends the budget on fine-tuning; LoLCATs and
    Hedgehog split it in half between attention transfer and fine-tuning (LoLCATs' 20M + 20M)."""
    if method in ("hedgehog", "lolcats"):
        half = budget_tokens // 2
        return {"attention": max(1, half // per_step), "finetune": max(1, (budget_tokens - half) // per_step)}
    return {"finetune": max(1, budget_tokens // per_step)}


def method_result(args, method: str, teacher_tokens: int, deadline: float) -> dict | None:
    """Converts, distills and evaluates one method; resumable: work/<method>/row.json keeps
    what is done, each stage checkpoints (linattn distill) and stops at the deadline
    (time.perf_counter() value). Returns the finished row, or None when time ran out."""
    import linattn.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from linattn.convert.distill import distill
    from linattn.convert.llama import convert
    from linattn.convert.teacher import bits_per_byte
    from linattn.tasks.text import Text
    from linattn.train import TrainConfig

    work = Path(args.work)
    out = work / method
    row_path = out / "row.json"
    task = Text(corpus=args.corpus, seq_len=args.seq_len)
    if time.perf_counter() > deadline - args.eval_reserve:
        return None
    if not row_path.is_file():
        if out.exists():
            shutil.rmtree(out)  # a conversion cut short
        t0 = time.perf_counter()
        convert(work / "teacher", out, method)
        untrained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(args.device).eval()
        budget = int(args.budget_percent / 100 * teacher_tokens)
        row = {"method": method, "budget_tokens": budget, "stages": {}, "seconds": 0.0,
               "bpb_as_converted": bits_per_byte(untrained, task, batches=args.eval_batches, batch_size=16)}
        del untrained
        row["seconds"] = time.perf_counter() - t0
        row_path.write_text(json.dumps(row, indent=2) + "\n")
    row = json.loads(row_path.read_text())
    per_step = args.distill_batch * args.seq_len
    for stage, steps in stage_steps(method, row["budget_tokens"], per_step).items():
        if row["stages"].get(stage, {}).get("done"):
            continue
        left = deadline - time.perf_counter() - args.eval_reserve
        if left <= 0:
            return None
        lr = args.finetune_lr if (stage == "finetune" and args.finetune_lr) else LRS[method][stage]
        cfg = TrainConfig(steps=steps, batch_size=args.distill_batch, weight_decay=0.0, lr=lr, warmup_steps=0,
                          min_lr_ratio=1.0, device=args.device, ckpt_every=10**6, time_limit_s=left)
        loss = "weights" if (method == "hedgehog" and stage == "attention") else "output"  # Hedgehog's own loss
        t0 = time.perf_counter()
        res = distill(out, str(work / "teacher"), args.corpus, stage, cfg, seq_len=args.seq_len,
                      lora_rank=args.lora_rank, loss=loss, progress=args.progress)
        row["seconds"] += time.perf_counter() - t0
        row["stages"][stage] = dict(res, lr=lr)
        row_path.write_text(json.dumps(row, indent=2) + "\n")
        if not res["done"]:
            return None
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(args.device).eval()
    row["bpb"] = bits_per_byte(model, task, batches=args.eval_batches, batch_size=16)
    row["tokens"] = sum(s["tokens"] for s in row["stages"].values())
    row["seconds"] += time.perf_counter() - t0
    shutil.rmtree(out)  # the speed runs convert afresh (speed does not depend on the weights)
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


def speed_rows(args, done: list[dict], deadline: float) -> list[dict]:
    """Generation speed of the teacher and each method's converted model, appended to done
    (rows of models already timed are kept and skipped); stops starting models at the deadline."""
    import linattn.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from linattn.convert.llama import convert
    from linattn.hf.greedy import greedy_generate
    from linattn.tasks.text import Text

    work = Path(args.work)
    task = Text(corpus=args.corpus, seq_len=args.prompt)
    ids = task.batch("test", 7, 0, args.gen_batch).input_ids.to(args.device)
    n = args.new_tokens
    rows = list(done)

    def hf(model):
        return lambda x, k: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k,
                                           min_new_tokens=k, do_sample=False, pad_token_id=0)

    for name in ("teacher",) + METHODS:
        if any(r["model"] == name for r in rows):
            continue
        if time.perf_counter() > deadline:
            break
        src = work / "teacher"
        if name != "teacher":
            src = convert(work / "teacher", work / f"speed-{name}", name)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).to(args.device).eval()
        if name != "teacher":
            shutil.rmtree(src)
        runs = {"hf.generate": hf(model)}
        if name != "teacher":
            runs["linattn greedy"] = lambda x, k, m=model: greedy_generate(m, x, k)
            if torch.device(args.device).type == "cuda":
                runs["linattn greedy+graph"] = lambda x, k, m=model: greedy_generate(m, x, k, cuda_graph=True)
        for how, run in runs.items():
            try:
                run(ids[:, : min(256, ids.shape[1])], 8)  # warm-up: kernels compiled and tuned
                rows.append({"model": name, "how": how, **time_generate(model, run, ids, n)})
            except Exception as e:  # noqa: BLE001  (record it, time the others)
                rows.append({"model": name, "how": how, "error": f"{type(e).__name__}: {e}"})
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = next((r["tokens_per_s"] for r in rows if r["model"] == "teacher" and "tokens_per_s" in r), None)
    for r in rows:
        r["speedup_vs_teacher"] = r["tokens_per_s"] / base if base and "tokens_per_s" in r else None
    return rows


def load_results(args) -> tuple[Path, dict]:
    work = Path(args.work)
    if not (work / "teacher" / "train" / "result.json").is_file():
        raise SystemExit(f"no trained teacher in {work}/teacher: run the teacher stage first")
    path = work / "results.json"
    res = json.loads(path.read_text()) if path.is_file() else {"methods": {}}
    res["teacher"] = json.loads((work / "teacher" / "train" / "result.json").read_text())
    cfg = json.loads((work / "teacher" / "config.json").read_text())
    res["teacher"]["dims"] = {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size")}
    return path, res


def save_results(args, path: Path, res: dict) -> None:
    """Writes res (and --out); the stage's own arguments go under "<stage>_settings"."""
    import transformers

    res.update(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               torch=torch.__version__, transformers=transformers.__version__,
               python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    res[f"{args.stage}_settings"] = dict(vars(args))
    path.write_text(json.dumps(res, indent=2) + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


def stage_methods(args) -> dict:
    """Teacher and unigram bits/byte once, then each method not yet in the results (resumed
    where a previous command stopped); new work starts only before --time-budget seconds."""
    from linattn.convert.teacher import bits_per_byte
    from linattn.tasks.text import Text

    deadline = time.perf_counter() + args.time_budget
    path, res = load_results(args)
    work = Path(args.work)
    if "teacher_bpb" not in res:
        from transformers import AutoModelForCausalLM

        task = Text(corpus=args.corpus, seq_len=args.seq_len)
        teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).to(args.device).eval()
        res["teacher_bpb"] = bits_per_byte(teacher, task, batches=args.eval_batches, batch_size=16)
        res["unigram_bpb"] = unigram_bpb(task, args.eval_batches, args.batch)
        del teacher
        save_results(args, path, res)
    left = []
    for method in args.methods:
        if method in res["methods"]:
            continue
        row = method_result(args, method, res["teacher"]["tokens"], deadline)
        if row is None:
            left = [m for m in args.methods if m not in res["methods"]]
            break
        row["recovery"] = (res["unigram_bpb"] - row["bpb"]) / (res["unigram_bpb"] - res["teacher_bpb"])
        res["methods"][method] = row
        save_results(args, path, res)
        print(f"{method}: {row['bpb']:.3f} bits/byte, recovery {row['recovery']:.1%}, {row['seconds']:.0f} s",
              flush=True)
    save_results(args, path, res)
    print_table(res)
    print(f"time budget spent: run the same command again for {', '.join(left)}" if left
          else "methods: all done")
    return res


def stage_speed(args) -> dict:
    path, res = load_results(args)
    res["speed"] = speed_rows(args, res.get("speed", []), time.perf_counter() + args.time_budget)
    save_results(args, path, res)
    print_table(res)
    timed = {r["model"] for r in res["speed"]}
    print("speed: all done" if timed >= {"teacher", *METHODS} else "time budget spent: run the same command again")
    return res


def print_table(res: dict) -> None:
    t = res["teacher"]
    dims = t["dims"]
    print(f"{res['gpu']}; teacher d_model {dims['hidden_size']}, {dims['num_hidden_layers']} layers, "
          f"{dims['num_attention_heads']} heads ({dims['num_key_value_heads']} kv): "
          f"{t['steps']} steps, {t['tokens']:,} tokens")
    if "teacher_bpb" in res:
        print(f"held-out bits/byte: teacher {res['teacher_bpb']:.3f}, unigram {res['unigram_bpb']:.3f}")
    head = (f"{'method':<16} {'as converted':>12} {'bits/byte':>9} {'recovered':>9} {'tokens':>11} "
            f"{'budget':>11} {'of teacher':>10} {'seconds':>7}")
    print(head + "\n" + "-" * len(head))
    for m, r in res["methods"].items():
        print(f"{m:<16} {r['bpb_as_converted']:>12.3f} {r['bpb']:>9.3f} {r['recovery']:>9.1%} {r['tokens']:>11,} "
              f"{r['budget_tokens']:>11,} {r['tokens'] / t['tokens']:>10.2%} {r['seconds']:>7.0f}")
    if res.get("speed"):
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
    p.add_argument("stage", choices=("teacher", "methods", "speed"))
    p.add_argument("--work", default="runs/linearize")
    p.add_argument("--out", default=None, help="also write the results JSON here")
    p.add_argument("--device", default="cuda")
    p.add_argument("--corpus", default=None, help="text corpus (default: the Python standard library)")
    p.add_argument("--teacher-steps", type=int, default=6000)
    p.add_argument("--teacher-dims", type=int, nargs=4, default=[512, 6, 8, 4], metavar=("D", "LAYERS", "HEADS", "KV"))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="teacher batch")
    p.add_argument("--teacher-budget", type=float, default=420.0, help="seconds of teacher training")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget-percent", type=float, default=1.0)
    p.add_argument("--distill-batch", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="LoRA learning rate for every method (default: each method's authors', LRS)")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="methods / speed: seconds of work one command starts (training stops resumably)")
    p.add_argument("--eval-reserve", type=float, default=45.0,
                   help="methods: seconds kept back from training for the evaluation after it")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    args.corpus = args.corpus or corpus()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"teacher": stage_teacher, "methods": stage_methods, "speed": stage_speed}[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
