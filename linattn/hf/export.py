"""`linattn export`: a `linattn train` run directory -> a transformers save_pretrained directory."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .modeling import LinAttnForCausalLM
from .tokenizer import tokenizer_for


def load_run_model(run_dir, device: str | torch.device = "cpu") -> LinAttnForCausalLM:
    """A finished run's model (config.json + model.safetensors) as a LinAttnForCausalLM, in
    eval mode. Its config records the run's task; the text task's model stops at "<bos>"
    (end of document), a synthetic task's never stops early."""
    from ..train import WEIGHTS_FILE, build_model, load_run, load_weights

    model_cfg, task, train_cfg = load_run(run_dir)
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{run_dir} has no {WEIGHTS_FILE} (did training finish?)")
    lm = build_model(model_cfg, torch.device("cpu"), train_cfg.seed)
    load_weights(lm, weights)
    task_dict = task.to_dict()
    eos = 0 if task_dict.get("name") == "text" else None
    hf = LinAttnForCausalLM.from_causal_lm(lm, task=task_dict, eos_token_id=eos)
    hf.generation_config.eos_token_id = eos
    return hf.to(device).eval()


def save_model(model: LinAttnForCausalLM, out_dir, tokenizer=None) -> Path:
    """model.save_pretrained(out_dir) (safetensors) and its tokenizer (default: tokenizer_for
    the model's task) beside it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok = tokenizer if tokenizer is not None else tokenizer_for(model.config.task, model.config.vocab_size)
    tok.save_pretrained(out)
    return out


def export_run(run_dir, out_dir) -> Path:
    """Converts a `linattn train` run directory into out_dir (config.json, model.safetensors,
    generation_config.json, tokenizer files) that AutoModelForCausalLM / AutoTokenizer load
    after `import linattn.hf`. Returns out_dir."""
    return save_model(load_run_model(run_dir), out_dir)


def is_hf_dir(path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    return json.loads(p.read_text()).get("model_type") == "linattn"


def load_any(path, device: str | torch.device = "cpu"):
    """(LinAttnForCausalLM in eval mode, its tokenizer) from a saved model directory or a
    `linattn train` run directory. ValueError for anything else."""
    from transformers import AutoTokenizer

    if is_hf_dir(path):
        model = LinAttnForCausalLM.from_pretrained(path).to(device).eval()
        return model, AutoTokenizer.from_pretrained(path)
    if (Path(path) / "config.json").is_file():
        model = load_run_model(path, device)
        return model, tokenizer_for(model.config.task, model.config.vocab_size)
    raise ValueError(f"{path} is neither a linattn model directory (linattn export) nor a run "
                     "directory (linattn train): no config.json")
