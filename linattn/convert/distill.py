"""`linattn distill`: train a converted model (a `linattn convert` directory) in two stages.

attention  attention transfer: the teacher runs frozen; each linearized layer of the student
           gets the teacher's own input to that attention layer and is trained to reproduce
           the teacher attention's output before o_proj (LoLCATs: MSE_FACTOR times the mean
           squared error over heads, positions and channels, averaged over the layers), or
           with loss="weights" to match its attention weights (Hedgehog's cross-entropy,
           linear recurrence only). Only the method's new parameters train (Hedgehog feature
           maps, LoLCATs' window factors); Liger adds none, so it goes straight to finetune.
finetune   next-token cross-entropy on the corpus, with LoRA adapters (peft) on each layer's
           projections named by the method (lora_setup: Liger q/k/v with alpha = rank,
           LoLCATs and Hedgehog q/k/v/o with alpha = 2 rank, as their code), merged into
           the weights at the end so the directory stays a plain linattn.hf model; or every
           parameter (lora_rank 0).

Both stages train on the text task's windows over `corpus`, checkpoint into
OUT/distill-<stage>/ and resume from there; the trained model replaces the one in OUT when
a stage finishes, and OUT/distill-<stage>/result.json records it (a finished stage is not
run twice).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..tasks.text import Text
from ..train import TrainConfig, autocast, resolve_device, resolve_dtype, write_json
from .loop import fit

STAGES = ("attention", "finetune")
MSE_FACTOR = 1000.0  # LoLCATs' weight of the attention-output MSE


def lora_setup(method: str) -> tuple[list[str], float]:
    """(LoRA target modules, alpha / rank) of a method, as its authors' training code: Liger
    adapts q/k/v with peft's default alpha (= rank 8); LoLCATs (and Hedgehog, which LoLCATs'
    code runs as its no-window case) adapts q/k/v/o with alpha 16 at rank 8."""
    if method.startswith("liger"):
        return ["q_proj", "k_proj", "v_proj"], 1.0
    return ["q_proj", "k_proj", "v_proj", "o_proj"], 2.0


def linearized_layers(model) -> list[int]:
    """Indices of the student's linearized (not kept-attention) layers."""
    return [i for i, b in enumerate(model.model.blocks) if b.mixer_name == "linearized"]


def transfer_mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE_FACTOR * mean((y - target)^2) in float32: one layer's attention-transfer loss on its
    attention outputs before o_proj ([B, T, H * D]), as LoLCATs' trainer weighs it."""
    return MSE_FACTOR * F.mse_loss(y.float(), target.float())


def _attention_inputs_outputs(teacher, layers: list[int]) -> tuple[dict, dict, list]:
    """Hooks on the teacher's attention modules of `layers`: (inputs, outputs, handles); after
    a teacher forward, inputs[i] is layer i's attention input (after its norm, [B, T,
    d_model]) and outputs[i] its attention output before o_proj ([B, T, H * D])."""
    ins, outs, handles = {}, {}, []
    for i in layers:
        attn = teacher.model.layers[i].self_attn

        def hook(module, args, kwargs, output, i=i):
            ins[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def pre_o(module, args, i=i):
            outs[i] = args[0]
        handles.append(attn.register_forward_hook(hook, with_kwargs=True))
        handles.append(attn.o_proj.register_forward_pre_hook(pre_o))
    return ins, outs, handles


def mixer_attention_output(mixer, x: torch.Tensor) -> torch.Tensor:
    """The student mixer's output on x before its o_proj ([B, T, H * D])."""
    seen = {}
    handle = mixer.o_proj.register_forward_pre_hook(lambda module, args: seen.update(y=args[0]))
    try:
        mixer(x)
    finally:
        handle.remove()
    return seen["y"]


def weights_divergence(soft: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """Hedgehog's attention-weight loss: the cross-entropy -sum_s A_ts log Â_ts of the linear
    weights Â against the softmax weights A (both [B, H, T, T], rows summing to 1 over
    s <= t), less A's own entropy (so 0 is a perfect match: KL(A || Â)), averaged over queries."""
    log_ratio = soft.clamp_min(1e-12).log() - lin.clamp_min(1e-12).log()
    return (soft * log_ratio).sum(-1).mean()


def distill(out, teacher: str | None, corpus: str, stage: str, cfg: TrainConfig, *, seq_len: int = 512,
            lora_rank: int = 8, lora_alpha: float | None = None, loss: str = "output", progress=True) -> dict:
    """Runs one stage on the converted model directory `out` (see the module docstring).
    teacher: the source model directory (needed by the attention stage). loss (attention
    stage): "output" (each layer's attention output before o_proj, transfer_mse) or
    "weights" (Hedgehog's cross-entropy between the softmax and the linear attention
    weights; recurrence "linear" without a window). lora_alpha None: the method's
    (lora_setup). Returns the stage's result {"stage", "steps", "tokens", "first_loss",
    "final_loss", "trained_parameters", "lora_rank", "lora_targets", "done"}."""
    import linattn.hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if loss not in ("output", "weights"):
        raise ValueError(f"loss must be 'output' or 'weights', got {loss!r}")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an int >= 0 (0: full fine-tuning), got {lora_rank!r}")
    out = Path(out)
    work = out / f"distill-{stage}"
    if (work / "result.json").is_file():
        result = json.loads((work / "result.json").read_text())
        if progress:
            print(f"distill {stage}: already done ({result['steps']} steps); remove {work} to run it again")
        return result
    device = resolve_device(cfg.device)
    amp = resolve_dtype(cfg.dtype, device)
    task = Text(corpus=corpus, seq_len=seq_len)
    task.check()
    saved_dtype = _saved_dtype(out)
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    if getattr(student.config, "model_type", None) != "linattn" or not hasattr(student.config, "linearization"):
        raise ValueError(f"{out} is not a `linattn convert` directory (no linearization record in its config)")
    layers = linearized_layers(student)
    student.requires_grad_(False)
    lora, targets = None, None
    if stage == "attention":
        if teacher is None:
            raise ValueError("the attention stage needs --teacher SRC (the model that was converted)")
        new = [n for n in student.config.linearization["new_parameters"]]
        if not new:
            raise ValueError(f"method {student.config.linearization['method']} adds no parameters to transfer "
                             "attention into: run --stage finetune")
        named = dict(student.named_parameters())
        params = {n: named[n].requires_grad_(True) for n in new}
        teach = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).to(device).eval()
        teach.requires_grad_(False)
        ins, outs, _ = _attention_inputs_outputs(teach, layers)
        if loss == "weights":
            student.model.blocks[layers[0]].mixer.attention_weights(torch.zeros(1, 1, student.config.d_model,
                                                                                device=device))  # checks the mixer

        def loss_at(step):
            b = task.batch("train", cfg.seed, step, cfg.batch_size)
            with torch.no_grad(), autocast(device, amp):
                teach(input_ids=b.input_ids.to(device))
            with autocast(device, amp):
                mixers = [student.model.blocks[i].mixer for i in layers]
                if loss == "weights":
                    losses = [weights_divergence(*m.attention_weights(ins[i])) for m, i in zip(mixers, layers)]
                else:
                    losses = [transfer_mse(mixer_attention_output(m, ins[i]), outs[i])
                              for m, i in zip(mixers, layers)]
            return torch.stack(losses).mean()
    else:
        if lora_rank:
            from peft import LoraConfig, get_peft_model

            targets, ratio = lora_setup(student.config.linearization["method"])
            lora = get_peft_model(student, LoraConfig(r=lora_rank, lora_alpha=lora_alpha or ratio * lora_rank,
                                                      lora_dropout=0.0, target_modules=targets))
            params = {n: p for n, p in lora.named_parameters() if p.requires_grad}
        else:
            student.requires_grad_(True)
            params = dict(student.named_parameters())

        def loss_at(step):
            b = task.batch("train", cfg.seed, step, cfg.batch_size)
            with autocast(device, amp):
                return student.model.loss(b.input_ids.to(device), b.targets.to(device))

    res = fit(params, loss_at, cfg, work, f"distill {stage}", progress)
    result = {"stage": stage, "steps": res["step"], "tokens": res["step"] * cfg.batch_size * seq_len,
              "first_loss": res["losses"][0] if res["losses"] else None,
              "final_loss": res["losses"][-1] if res["losses"] else None,
              "trained_parameters": sum(p.numel() for p in params.values()),
              "lora_rank": lora_rank if stage == "finetune" else None, "lora_targets": targets}
    if not res["done"]:
        return dict(result, done=False)
    model = lora.merge_and_unload() if lora is not None else student
    _replace_model(model.to(saved_dtype), out)
    write_json(work / "result.json", result)
    return dict(result, done=True)


def _saved_dtype(out: Path) -> torch.dtype:
    """The dtype the model in out was saved in (training runs in float32 and saves back in it)."""
    dtype = json.loads((out / "config.json").read_text()).get("dtype", "float32")
    return getattr(torch, dtype) if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype) \
        else torch.float32


def _replace_model(model, out: Path) -> None:
    """Saves model over the one in out: save_pretrained into a temporary directory beside
    it, then each file moved into place (the tokenizer files are left as they are)."""
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".save-"))
    try:
        model.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
