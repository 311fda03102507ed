"""Training on the digits: a ViT classifier or a DiT generator (`linattn train --task digits
--model vit|dit`).

A run is (VisionConfig, TrainConfig), TrainConfig the LM runs' (steps, batch_size, lr and
its warmup + cosine schedule, weight_decay, grad_clip, seed, device, dtype, log_every,
eval_every). Batch `step` is a pure function of (seed, step): batch_size training images
drawn with a generator seeded by both. Files in the run directory: config.json ({"model":
VisionConfig, "task": {"name": "digits"}, "train": TrainConfig}), metrics.jsonl (train
lines every log_every steps, test lines at each evaluation), metrics.json, model.safetensors.

vit: cross-entropy; "accuracy" is the test split's (360 images, fixed split).
dit: DDPM loss (linattn.vision.diffusion); with inherit_from (a trained DiT run) the model
starts from that run's weights except its mixers' (LiT's weight inheritance) and adds the
hybrid distillation terms against it. Evaluation draws eval_samples images per class by the
full reverse chain and reports the judge's ("accuracy", per class) and the Frechet
distance "fd" to the real test images in the judge's features (linattn.vision.quality).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..train import (CONFIG_FILE, CURVE_FILE, METRICS_FILE, WEIGHTS_FILE, TrainConfig, autocast,
                     load_weights, resolve_device, resolve_dtype, save_weights, write_json)
from .data import NUM_CLASSES, digits_split
from .models import VisionConfig, build_vision_model, inherit_weights


def _batch_indices(n: int, seed: int, step: int, batch_size: int) -> torch.Tensor:
    """batch_size indices into the n training images for `step` of run `seed` (without
    replacement inside a batch)."""
    rng = np.random.Generator(np.random.PCG64([seed, step, 0x766974]))
    return torch.from_numpy(rng.choice(n, size=min(batch_size, n), replace=False).astype(np.int64))


def _config_dict(vcfg: VisionConfig, tcfg: TrainConfig) -> dict:
    return {"model": vcfg.to_dict(), "task": {"name": "digits"}, "train": asdict(tcfg)}


def load_vision_run(run_dir, device: str | None = None):
    """(model in eval mode, VisionConfig, TrainConfig, torch.device) of a finished run."""
    run = Path(run_dir)
    path = run / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    d = json.loads(path.read_text())
    if not isinstance(d.get("model"), dict) or d["model"].get("model_type") not in ("vit", "dit"):
        raise ValueError(f"{run_dir} is not a vision run (its model has no model_type vit or dit)")
    vcfg, tcfg = VisionConfig.from_dict(d["model"]), TrainConfig.from_dict(d["train"])
    if not (run / WEIGHTS_FILE).is_file():
        raise ValueError(f"{run_dir} has no {WEIGHTS_FILE} (did training finish?)")
    dev = resolve_device(device or tcfg.device)
    model = build_vision_model(vcfg, dev, tcfg.seed)
    load_weights(model, run / WEIGHTS_FILE)
    return model.eval(), vcfg, tcfg, dev


@torch.no_grad()
def evaluate_vit(model, device, dtype, batch_size: int = 512) -> dict:
    """{"accuracy", "loss"} of a ViT on the whole test split."""
    x, y = digits_split("test")
    was = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with autocast(device, dtype):
            logits = model(xb)
        total_loss += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
    model.train(was)
    return {"accuracy": correct / len(y), "loss": total_loss / len(y), "test_images": len(y)}


@torch.no_grad()
def generate(model, vcfg: VisionConfig, labels: torch.Tensor, *, seed: int, device, dtype,
             batch_size: int = 500) -> torch.Tensor:
    """Images [len(labels), ch, S, S] in [-1, 1] sampled by a DiT for labels [N] (int64)."""
    from .diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion(vcfg.diffusion_steps)
    gen = torch.Generator(device=device).manual_seed(seed)
    was = model.training
    model.eval()
    shape = (vcfg.channels, vcfg.image_size, vcfg.image_size)
    out = [diffusion.sample(model, labels[i:i + batch_size].to(device), shape, generator=gen,
                            autocast_ctx=autocast(device, dtype))
           for i in range(0, len(labels), batch_size)]
    model.train(was)
    return torch.cat(out).cpu()


def evaluate_dit(model, vcfg, judge, *, seed, device, dtype) -> dict:
    """{"accuracy" (the judge's on eval_samples per class), "per_class_accuracy", "fd" (to the
    real test images), "fd_real" (the real training images' FD to them: the floor)}."""
    from .quality import frechet_distance, sample_quality

    labels = torch.arange(NUM_CLASSES).repeat_interleave(vcfg.eval_samples)
    samples = generate(model, vcfg, labels, seed=seed + 1, device=device, dtype=dtype)
    test_images = digits_split("test")[0]
    q = sample_quality(judge.cpu(), samples, labels, test_images)
    with torch.no_grad():
        fd_real = frechet_distance(judge.features(digits_split("train")[0]), judge.features(test_images))
    return {"accuracy": q["sample_accuracy"], "per_class_accuracy": q["per_class_accuracy"], "fd": q["fd"],
            "fd_real": fd_real, "samples": len(labels)}


def train_vision(vcfg: VisionConfig, tcfg: TrainConfig, out_dir=None, *, progress: bool = True) -> dict:
    """Train a ViT / DiT of vcfg on the digits under tcfg; write the run files into out_dir
    (None: nothing). Returns metrics.json's dict plus "model"."""
    vcfg.validate()
    tcfg.validate()
    if tcfg.compile != "none":
        raise ValueError("vision runs do not compile: use --compile none")
    device = resolve_device(tcfg.device)
    dtype = resolve_dtype(tcfg.dtype, device)
    out = Path(out_dir) if out_dir is not None else None
    model = build_vision_model(vcfg, device, tcfg.seed)
    teacher, inherited = None, 0
    if vcfg.model_type == "dit" and vcfg.inherit_from:
        teacher, tv, _, _ = load_vision_run(vcfg.inherit_from, str(device))
        if tv.model_type != "dit":
            raise ValueError(f"inherit_from {vcfg.inherit_from} is a {tv.model_type} run, not a dit run")
        with torch.no_grad():
            inherited = len(inherit_weights(model, teacher.state_dict()))
        teacher.requires_grad_(False)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=tcfg.lr, betas=(0.9, 0.95))
    x_train, y_train = digits_split("train")
    x_train, y_train = x_train.to(device), y_train.to(device)
    judge = None
    if vcfg.model_type == "dit":
        from .diffusion import GaussianDiffusion, distillation_terms
        from .quality import train_judge

        diffusion = GaussianDiffusion(vcfg.diffusion_steps)
        judge = train_judge(seed=0)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_FILE, _config_dict(vcfg, tcfg))
        (out / CURVE_FILE).write_text("")
    records = []

    def log(rec):
        records.append(rec)
        if out is not None:
            with open(out / CURVE_FILE, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def evaluate():
        if vcfg.model_type == "vit":
            return evaluate_vit(model, device, dtype)
        return evaluate_dit(model, vcfg, judge, seed=tcfg.seed, device=device, dtype=dtype)

    t0 = time.perf_counter()
    window, n_win, step = {}, 0, 0
    model.train()
    for step in range(1, tcfg.steps + 1):
        if tcfg.time_limit_s and time.perf_counter() - t0 >= tcfg.time_limit_s:
            step -= 1
            break
        lr = tcfg.lr_at(step - 1)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = _batch_indices(len(y_train), tcfg.seed, step, tcfg.batch_size).to(device)
        xb, yb = x_train[idx], y_train[idx]
        with autocast(device, dtype):
            if vcfg.model_type == "vit":
                logits = model(xb)
                terms = {"ce": F.cross_entropy(logits.float(), yb)}
                loss = terms["ce"]
            else:
                g = torch.Generator(device="cpu").manual_seed(tcfg.seed * 1_000_003 + step)
                t = torch.randint(0, vcfg.diffusion_steps, (len(yb),), generator=g).to(device)
                noise = torch.randn(xb.shape, generator=g).to(device)
                xt = diffusion.q_sample(xb, t, noise)
                pred = model(xt, t, yb)
                terms = diffusion.losses(pred, xb, xt, t, noise)
                loss = terms["mse"] + terms["vb"]
                if teacher is not None:
                    with torch.no_grad():
                        teacher_out = teacher(xt, t, yb)
                    terms.update(distillation_terms(pred, teacher_out, vcfg.channels))
                    loss = loss + vcfg.distill_eps * terms["kd_eps"] + vcfg.distill_var * terms["kd_var"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        for k, v in {"loss": loss, **terms}.items():
            window[k] = window.get(k, 0.0) + float(v.detach())
        n_win += 1
        if not math.isfinite(float(loss.detach())):
            raise ValueError(f"training diverged at step {step} (loss {float(loss.detach())}): lower --lr")
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            log({"step": step, "split": "train", **{k: v / n_win for k, v in window.items()}, "lr": lr})
            if progress:
                print(f"{vcfg.model_type} {vcfg.mixer}: step {step}/{tcfg.steps} loss {window['loss'] / n_win:.4f} "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            window, n_win = {}, 0
        if tcfg.eval_interval and step % tcfg.eval_interval == 0 and step < tcfg.steps:
            log({"step": step, "split": "test", **evaluate()})
    wall = time.perf_counter() - t0
    ev = evaluate()
    log({"step": step, "split": "test", **ev})
    metrics = {**ev, "steps": step, "parameters": sum(p.numel() for p in model.parameters()),
               "wall_s": wall, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "task": "digits", "model": vcfg.model_type, "mixer": vcfg.mixer,
               "inherited_tensors": inherited, "distilled": teacher is not None,
               "train_loss": next((r["loss"] for r in reversed(records) if r["split"] == "train"), None)}
    if out is not None:
        write_json(out / METRICS_FILE, metrics)
        save_weights(model, out / WEIGHTS_FILE)
    return {**metrics, "model": model}
