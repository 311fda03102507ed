"""The training loop of the teacher and of the distillation stages: a fixed list of trainable
parameters, a loss per step, AdamW on linattn.train's schedule, checkpoints and resume."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..train import TrainConfig, _progress_bar, atomic_write

CHECKPOINT = "checkpoint.pt"


def fit(params: dict[str, torch.nn.Parameter], loss_at, cfg: TrainConfig, ckpt_dir, desc: str,
        progress=True) -> dict:
    """Trains `params` (name -> parameter) for cfg.steps steps of loss_at(step) (a 0-d tensor).

    AdamW (betas 0.9, 0.95; weight decay cfg.weight_decay on matrices), lr cfg.lr_at(step),
    gradient clipping cfg.grad_clip. Every cfg.ckpt_every steps, at the end and at
    cfg.time_limit_s, ckpt_dir/checkpoint.pt holds {"step", "params", "optimizer", "losses"};
    a later call with the same params resumes from it. Returns {"step": steps done, "done":
    bool, "losses": [loss of each step done]}.
    """
    ckpt = Path(ckpt_dir) / CHECKPOINT
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    names = sorted(params)
    decay = [params[n] for n in names if params[n].dim() >= 2]
    rest = [params[n] for n in names if params[n].dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    step, losses = 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if sorted(state["params"]) != names:
            raise ValueError(f"{ckpt} holds other parameters than this run trains; remove it to start over")
        with torch.no_grad():
            for n in names:
                params[n].copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        step, losses = int(state["step"]), list(state["losses"])

    def save():
        blob = {"step": step, "params": {n: params[n].detach().cpu() for n in names},
                "optimizer": opt.state_dict(), "losses": losses}
        atomic_write(ckpt, lambda tmp: torch.save(blob, tmp))

    bar = _progress_bar(cfg.steps, step, "lines" if progress else False, desc, every_s=5.0)
    t0 = time.perf_counter()
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([params[n] for n in names], cfg.grad_clip)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{cfg.lr_at(step - 1):.2e}")
            bar.step_done(step)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save()
        if cfg.time_limit_s and time.perf_counter() - t0 > cfg.time_limit_s and step < cfg.steps:
            save()
            break
    if bar is not None:
        bar.close()
    return {"step": step, "done": step >= cfg.steps, "losses": losses}
