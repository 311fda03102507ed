"""`make demo`: train a small Gated DeltaNet on associative recall (MQAR) on the CPU, then
report its accuracy on a held-out test set.

The task is a real recall problem: 8 key-value pairs drawn from a 64-token vocabulary
(31 possible keys, 32 values), then the 8 keys asked again in random order; the model must
emit each key's value. Chance is 1/32 per answer. Training is time-boxed (--time-limit,
3 minutes by default) and stops at the step budget or the time limit, whichever comes
first; the test set comes from a seed the training never drew from.

    python -m linattn.demo                  # the defaults below
    python -m linattn.demo --steps 400 --out runs/demo
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# Tuned on a shared CPU, one thread, ~0.13 s of CPU per step: with 2 heads of 64 dims this
# model passes 90% accuracy after 200-500 steps (seeds 0, 2, 3 seen) and ends at 99.9-100%
# test accuracy. 4 heads of 32 dims, a one-layer or a d_model 64 model stalled on a 35-50%
# plateau for some seeds.
DEFAULTS = dict(pairs=8, vocab=64, seq_len=32, mixer="gated_deltanet", d_model=128, n_layers=2,
                n_heads=2, mlp_ratio=1.0, steps=800, batch_size=32, lr=3e-3, seed=0,
                time_limit_s=180.0, test_batches=16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m linattn.demo", description=__doc__.split("\n\n")[0])
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for torch")
    args = p.parse_args(argv)

    import torch

    from .models import LMConfig
    from .tasks import make_task
    from .train import TrainConfig, evaluate, train

    torch.set_num_threads(args.threads)
    task = make_task("mqar", pairs=args.pairs, vocab=args.vocab, seq_len=args.seq_len)
    model_cfg = LMConfig(vocab_size=task.vocab_size, d_model=args.d_model, n_layers=args.n_layers,
                         n_heads=args.n_heads, mixer=args.mixer, mlp_ratio=args.mlp_ratio,
                         max_seq_len=task.seq_len)
    model_cfg.validate()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      time_limit_s=args.time_limit_s, device="cpu", dtype="float32",
                      log_every=25, ckpt_every=10**9, eval_batches=4)
    print(f"MQAR: {task.pairs} key-value pairs, vocabulary {task.vocab}, sequence length {task.seq_len} "
          f"(chance {1 / (task.vocab - 1 - task.num_keys):.1%})")
    print(f"model: {model_cfg.mixer}, {model_cfg.n_layers} layers, d_model {model_cfg.d_model}, "
          f"{model_cfg.n_heads} heads; {cfg.steps} steps of {cfg.batch_size} at lr {cfg.lr:g}, "
          f"at most {cfg.time_limit_s:.0f} s of training on {args.threads} CPU thread(s)")
    out = args.out or tempfile.mkdtemp(prefix="linattn-demo-")
    t0 = time.perf_counter()
    result = train(model_cfg, task, cfg, out, progress=True)
    train_s = time.perf_counter() - t0
    held_out_seed = cfg.seed + 1  # a test split never drawn during training
    ev = evaluate(result["model"], task, seed=held_out_seed, batches=args.test_batches,
                  batch_size=cfg.batch_size, device=torch.device("cpu"))
    print(f"trained {result['steps']} steps in {result['wall_s']:.0f} s "
          f"(stopped by {result['stopped_by'].replace('_', ' ')}), {train_s:.0f} s with evaluation")
    print(f"test accuracy on held-out seed {held_out_seed}: {ev['accuracy']:.1%} of "
          f"{ev['answer_tokens']} recalled values ({ev['exact_match']:.1%} of {ev['sequences']} "
          f"sequences fully right); run files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
