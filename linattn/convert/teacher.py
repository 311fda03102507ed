"""A softmax teacher to linearize when no checkpoint can be downloaded: transformers' own
LlamaForCausalLM trained on the byte-level text task (linattn.tasks.text), saved as a
Hugging Face model directory with the byte tokenizer."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..tasks.text import TEXT_VOCAB, Text
from ..train import TrainConfig, autocast, resolve_device, resolve_dtype, write_json
from .loop import fit


def teacher_config(d_model: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int | None = None,
                   intermediate_size: int | None = None, max_len: int = 4096, rope_theta: float = 10000.0):
    """A LlamaConfig over the text task's 257 byte ids (id 0 is BOS, EOS and padding);
    intermediate_size None: Llama's 8/3 d_model rounded up to a multiple of 32; untied head."""
    from transformers import LlamaConfig

    hidden = intermediate_size or 32 * math.ceil(8 * d_model / 3 / 32)
    return LlamaConfig(vocab_size=TEXT_VOCAB, hidden_size=d_model, num_hidden_layers=n_layers,
                       num_attention_heads=n_heads, num_key_value_heads=n_kv_heads or n_heads,
                       intermediate_size=hidden, max_position_embeddings=max_len, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def lm_loss(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32) of any causal LM whose forward returns .logits
    [B, T, vocab]: input_ids and targets [B, T] int64 (targets already shifted)."""
    logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def bits_per_byte(model, task: Text, *, batches: int, batch_size: int, seed: int = 0) -> float:
    """Held-out bits per byte (mean cross-entropy / ln 2 on the test split's windows) of a
    causal LM with .logits, on its own device; the same windows for every model."""
    dev = next(model.parameters()).device
    total = 0.0
    for i in range(batches):
        b = task.batch("test", seed, i, batch_size)
        total += float(lm_loss(model, b.input_ids.to(dev), b.targets.to(dev)))
    return total / batches / math.log(2)


def save_teacher(model, out) -> Path:
    """model.save_pretrained(out) with the byte tokenizer and a generation config (BOS 0)."""
    from ..hf.tokenizer import byte_tokenizer

    out = Path(out)
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def train_teacher(corpus: str, out, config, cfg: TrainConfig, seq_len: int = 512, progress=True) -> dict:
    """Trains LlamaForCausalLM(config) on the text task over `corpus` for cfg.steps steps and
    saves it to out (a Hugging Face model directory) once finished; checkpoints in
    out/train, so a call cut short (cfg.time_limit_s) resumes. Returns {"done", "step",
    "tokens", "losses"}."""
    from transformers import LlamaForCausalLM

    device = resolve_device(cfg.device)
    amp = resolve_dtype(cfg.dtype, device)
    task = Text(corpus=corpus, seq_len=seq_len)
    task.check()
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).to(device)

    def loss_at(step):
        b = task.batch("train", cfg.seed, step, cfg.batch_size)
        with autocast(device, amp):
            return lm_loss(model, b.input_ids.to(device), b.targets.to(device))

    res = fit(dict(model.named_parameters()), loss_at, cfg, Path(out) / "train", "teacher", progress)
    res["tokens"] = res["step"] * cfg.batch_size * seq_len
    if res["done"]:
        save_teacher(model.eval(), out)
        write_json(Path(out) / "train" / "result.json",
                   {"steps": res["step"], "tokens": res["tokens"], "final_loss": res["losses"][-1]})
    return res
