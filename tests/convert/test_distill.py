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


def test_attention_transfer_loss_is_lolcats_mse_before_o_proj(teacher_dir, tmp_path):
    """The first step's loss is 1000 * MSE between the student's and the teacher's attention
    outputs before o_proj (LoLCATs' trainer), averaged over the layers."""
    out = convert(teacher_dir, tmp_path / "lol", "lolcats", window=8)
    res = distill(out, str(teacher_dir), CORPUS, "attention", cfg(1, 1e-2), seq_len=32, progress=False)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(convert(teacher_dir, tmp_path / "fresh", "lolcats", window=8),
                                                   dtype=torch.float32)
    ids = Text(corpus=CORPUS, seq_len=32).batch("train", 0, 0, 4).input_ids
    seen = {}
    for i, layer in enumerate(teacher.model.layers):
        layer.self_attn.register_forward_hook(
            lambda m, a, kw, o, i=i: seen.update({("x", i): kw["hidden_states"]}), with_kwargs=True)
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: seen.update({("t", i): a[0]}))
        student.model.blocks[i].mixer.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: seen.update({("s", i): a[0]}))
    with torch.no_grad():
        teacher(input_ids=ids)
        for i, block in enumerate(student.model.blocks):
            block.mixer(seen[("x", i)])
    want = sum(1000 * torch.mean((seen[("s", i)] - seen[("t", i)]) ** 2) for i in range(2)) / 2
    assert res["first_loss"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("method,targets", [("liger-attention", ["q_proj", "k_proj", "v_proj"]),
                                            ("lolcats", ["q_proj", "k_proj", "v_proj", "o_proj"])])
def test_lora_adapts_the_methods_projections(teacher_dir, tmp_path, method, targets):
    """Liger's code adapts q/k/v (alpha = rank), LoLCATs' q/k/v/o (alpha = 2 rank)."""
    out = convert(teacher_dir, tmp_path / method, method, window=8)
    before = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    before = {n: p.detach().clone() for n, p in before.items()}
    res = distill(out, None, CORPUS, "finetune", cfg(3, 1e-2), seq_len=32, lora_rank=2, progress=False)
    after = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    changed = sorted({n.split("mixer.")[1].split(".")[0] for n in before if not torch.equal(before[n], after[n])})
    assert res["lora_targets"] == targets and changed == sorted(targets)
