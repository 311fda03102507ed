"""linattn distill: attention transfer and LoRA fine-tuning lower their losses, resume
continues a stage exactly, a finished stage is not run twice."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
import linattn.hf  # noqa: E402,F401
from transformers import AutoModelForCausalLM  # noqa: E402

from linattn.cli import main  # noqa: E402
from linattn.convert.distill import distill  # noqa: E402
from linattn.convert.llama import convert  # noqa: E402
from linattn.convert.teacher import bits_per_byte  # noqa: E402
from linattn.tasks.text import Text  # noqa: E402
from linattn.train import TrainConfig  # noqa: E402

import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

CORPUS = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


def cfg(steps, lr, **kw):
    return TrainConfig(steps=steps, batch_size=4, lr=lr, weight_decay=0.0, device="cpu", warmup_steps=0,
                       min_lr_ratio=1.0, ckpt_every=100, **kw)


def test_attention_transfer_lowers_the_layer_loss(teacher_dir, tmp_path):
    out = convert(teacher_dir, tmp_path / "hh", "hedgehog")
    before = {n: p.clone() for n, p in AutoModelForCausalLM.from_pretrained(out).named_parameters()}
    res = distill(out, str(teacher_dir), CORPUS, "attention", cfg(12, 3e-2), seq_len=32, progress=False)
    losses = torch.load(out / "distill-attention" / "checkpoint.pt")["losses"]
    assert res["done"] and sum(losses[-3:]) < 0.8 * sum(losses[:3])
    after = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed and all("_map." in n for n in changed)  # only the feature maps trained
    with pytest.raises(ValueError, match="adds no parameters"):
        distill(convert(teacher_dir, tmp_path / "lg", "liger"), str(teacher_dir), CORPUS, "attention",
                cfg(2, 1e-2), seq_len=32, progress=False)


def test_attention_weight_matching(teacher_dir, tmp_path):
    """Hedgehog's loss: the divergence of the linear attention's weights from softmax's falls; LoLCATs' windowed layer has no such weights (one-line error)."""
    out = convert(teacher_dir, tmp_path / "hh", "hedgehog")
    assert main(["distill", str(out), "--teacher", str(teacher_dir), "--corpus", CORPUS, "--stage", "attention",
                 "--loss", "weights", "--steps", "12", "--batch", "4", "--seq-len", "32", "--lr", "5e-2",
                 "--device", "cpu"]) == 0
    losses = torch.load(out / "distill-attention" / "checkpoint.pt")["losses"]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])
    lol = convert(teacher_dir, tmp_path / "lol", "lolcats")
    with pytest.raises(ValueError, match="without a window"):
        distill(lol, str(teacher_dir), CORPUS, "attention", cfg(2, 1e-2), seq_len=32, loss="weights", progress=False)


def test_lora_finetune_lowers_held_out_loss(teacher_dir, tmp_path):
    out = convert(teacher_dir, tmp_path / "lg", "liger")
    task = Text(corpus=CORPUS, seq_len=32)
    bpb = lambda: bits_per_byte(AutoModelForCausalLM.from_pretrained(out), task, batches=2, batch_size=8)
    start = bpb()
    assert main(["distill", str(out), "--corpus", CORPUS, "--stage", "finetune", "--lora-rank", "4",
                 "--steps", "30", "--batch", "4", "--seq-len", "32", "--lr", "2e-2", "--device", "cpu"]) == 0
    assert bpb() < start - 0.03
    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(out).named_parameters()]
    assert not any("lora" in n for n in names)  # merged: still a plain linattn.hf model
    assert json.loads((out / "distill-finetune" / "result.json").read_text())["lora_rank"] == 4


def test_resume_continues_exactly(teacher_dir, tmp_path):
    a = convert(teacher_dir, tmp_path / "a", "lolcats", window=8)
    b = convert(teacher_dir, tmp_path / "b", "lolcats", window=8)
    full = distill(a, str(teacher_dir), CORPUS, "attention", cfg(4, 1e-2), seq_len=32, progress=False)
    cut = distill(b, str(teacher_dir), CORPUS, "attention", cfg(4, 1e-2, time_limit_s=1e-9), seq_len=32,
                  progress=False)
    assert not cut["done"] and cut["steps"] == 1
    rest = distill(b, str(teacher_dir), CORPUS, "attention", cfg(4, 1e-2), seq_len=32, progress=False)
    assert rest["done"] and rest["final_loss"] == full["final_loss"]
    for (n, p), (_, q) in zip(AutoModelForCausalLM.from_pretrained(a).named_parameters(),
                              AutoModelForCausalLM.from_pretrained(b).named_parameters()):
        assert torch.equal(p, q), n
    again = distill(b, str(teacher_dir), CORPUS, "attention", cfg(4, 1e-2), seq_len=32, progress=False)
    assert again == json.loads((b / "distill-attention" / "result.json").read_text())
