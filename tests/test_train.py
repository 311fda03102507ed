"""The training loop: answer-only loss and accuracy, the schedule, atomic files, resume that
reproduces an uninterrupted run, the time box, and the GPU benchmark scripts at toy size."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linattn.models import LMConfig
from linattn.tasks import Batch, make_task
from linattn.train import (Interrupted, TrainConfig, _make_optimizer, answer_loss, atomic_write,
                           evaluate_run, model_config_for, train)

ROOT = Path(__file__).resolve().parents[1]
TASK = dict(pairs=2, seq_len=12, vocab=10)
MODEL = dict(d_model=16, n_layers=2, n_heads=2, mixer="gated_deltanet")


def tiny(steps=6, **train_kw):
    task = make_task("mqar", **TASK)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, log_every=2, eval_batches=1, ckpt_every=3,
                      device="cpu", **train_kw)
    return model_config_for(task, **MODEL), task, cfg


def test_answer_loss_counts_answer_tokens_only():
    targets = torch.tensor([[3, 1, 2, 0], [1, 1, 3, 2]])
    mask = torch.tensor([[False, True, True, False], [False, False, True, True]])
    batch = Batch(torch.zeros_like(targets), targets, mask)
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    # right on every answer token, wrong on every other position
    logits[mask] = F.one_hot(targets[mask], 5).float() * 10
    logits[~mask] = F.one_hot((targets[~mask] + 1) % 5, 5).float() * 10
    loss, counts = answer_loss(logits, batch)
    assert counts == {"tokens": 4, "correct": 4, "sequences": 2, "exact": 2}
    torch.testing.assert_close(loss, F.cross_entropy(logits[mask], targets[mask]))
    logits[1, 3] = F.one_hot(torch.tensor(0), 5).float() * 10  # one wrong answer in sequence 1
    _, counts = answer_loss(logits, batch)
    assert counts == {"tokens": 4, "correct": 3, "sequences": 2, "exact": 1}


def test_batch_loss_runs_the_head_at_the_answers_only_with_the_same_result():
    from linattn.models import CausalLM
    from linattn.train import batch_loss

    task = make_task("mqar", layout="zoology", pairs=3, seq_len=20, vocab=40)
    torch.manual_seed(0)
    model = CausalLM(LMConfig(vocab_size=40, d_model=16, n_heads=2, mixer="gla", backend="torch")).double()
    batch = task.batch("train", 0, 0, 5)
    picked = model.answer_logits(batch.input_ids, batch.answer_index)
    full = model(batch.input_ids)
    torch.testing.assert_close(picked, full[batch.answer_mask], rtol=1e-12, atol=1e-12)
    assert torch.equal(model.answer_logits(batch.input_ids, batch.answer_mask), picked)
    loss, stats = batch_loss(model, batch, torch.device("cpu"), torch.float32)  # no autocast
    value, counts = stats.resolve()
    want, want_counts = answer_loss(full, batch)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-9)
    assert counts == want_counts and value == pytest.approx(want.item(), rel=1e-6)


def _reference_step(model, opt, batch, lr, grad_clip, full_logits):
    """The training step in its boolean-mask form: answer rows by boolean indexing, the
    sequence of each answer by mask.nonzero(), each count and the loss read on the host
    before the backward."""
    for group in opt.param_groups:
        group["lr"] = lr
    mask = batch.answer_mask
    if full_logits:
        picked = model(batch.input_ids)[mask]
    else:
        picked = model._logits(model._hidden(batch.input_ids, None)[mask])
    targets = batch.targets[mask]
    loss = F.cross_entropy(picked.float(), targets)
    with torch.no_grad():
        right = picked.argmax(dim=-1) == targets
        rows = mask.nonzero()[:, 0]
        wrong_per_seq = torch.zeros(mask.shape[0], dtype=torch.long).index_add_(0, rows, (~right).long())
        counts = {"tokens": int(mask.sum()), "correct": int(right.sum()), "sequences": mask.shape[0],
                  "exact": int((wrong_per_seq == 0).sum())}
    value = float(loss.detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return value, counts


class _FullLogits(torch.nn.Module):
    """A model that is neither a CausalLM nor a CompiledLM (a wrapper of the full forward):
    batch_loss takes its full logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


@pytest.mark.parametrize("full_logits", [False, True], ids=["head_at_answers", "full_logits"])
def test_train_step_equals_the_boolean_mask_step_bitwise(full_logits):
    """Four steps of _train_step (answer rows gathered at Batch.answer_index, counts read once
    after optimizer.step()) against _reference_step: the same losses, counts and final
    weights, bit for bit, on the CPU; one batch has a sequence without answers."""
    from linattn.models import CausalLM
    from linattn.train import _train_step

    model_cfg, task, cfg = tiny()
    batches = [task.batch("train", 0, i, 6) for i in range(4)]
    mask = batches[2].answer_mask.clone()
    mask[1] = False
    batches[2] = Batch(batches[2].input_ids, batches[2].targets, mask)
    runs = []
    for step in (_train_step, _reference_step):
        torch.manual_seed(0)
        model = CausalLM(model_cfg)
        opt = _make_optimizer(model, cfg)
        run = _FullLogits(model) if full_logits else model
        if step is _train_step:
            out = [step(run, opt, b, 1e-2, 1.0, torch.device("cpu"), torch.float32) for b in batches]
        else:
            out = [step(run, opt, b, 1e-2, 1.0, full_logits) for b in batches]
        runs.append((out, model.state_dict()))
    (got, got_w), (want, want_w) = runs
    assert got == want
    assert all(isinstance(v, float) and all(isinstance(n, int) for n in c.values()) for v, c in got)
    assert got[2][1]["exact"] == want[2][1]["exact"] and got[2][1]["tokens"] < got[1][1]["tokens"]
    assert_same_weights(got_w, want_w)


def test_a_resumed_optimizer_keeps_its_devices_implementation(tmp_path):
    """A checkpoint of a fused (CUDA) optimizer resumes on the CPU with torch's default AdamW:
    load_state_dict would take the saved groups' fused flag."""
    from linattn.models import CausalLM
    from linattn.train import _load_checkpoint, _save_checkpoint

    model_cfg, _, cfg = tiny()
    model = CausalLM(model_cfg)
    opt = _make_optimizer(model, cfg)
    for group in opt.param_groups:
        group["fused"] = True  # as a CUDA run saves it
    _save_checkpoint(tmp_path / "checkpoint.pt", 3, model, opt, 1.0)
    fresh = _make_optimizer(model, cfg)
    assert _load_checkpoint(tmp_path / "checkpoint.pt", model, fresh, torch.device("cpu"))[0] == 3
    assert [g["fused"] for g in fresh.param_groups] == [None, None]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-3, rel=0.01)
    assert TrainConfig(steps=200).warmup == 10  # default: 5% of steps


def test_lr_period_steps_the_cosine_once_per_epoch_as_zoologys_scheduler():
    """Zoology: CosineAnnealingLR(T_max=epochs, eta_min=0) stepped after each epoch, no warmup."""
    epochs, per_epoch, lr = 8, 5, 1e-3
    cfg = TrainConfig(steps=epochs * per_epoch, lr=lr, warmup_steps=0, min_lr_ratio=0.0, lr_period=per_epoch)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    torch_lrs = []
    for _ in range(epochs):
        torch_lrs += [opt.param_groups[0]["lr"]] * per_epoch
        opt.step()
        sched.step()
    assert [cfg.lr_at(s) for s in range(cfg.steps)] == pytest.approx(torch_lrs, rel=1e-12, abs=1e-18)


def test_optimizer_decays_matrices_or_every_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = _make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert [(len(g["params"]), g["weight_decay"], g["betas"]) for g in groups] == [
        (1, 0.1, (0.9, 0.95)), (3, 0.0, (0.9, 0.95))]
    groups = _make_optimizer(model, TrainConfig(weight_decay=0.1, decay_all=True, beta2=0.999)).param_groups
    assert [(len(g["params"]), g["weight_decay"], g["betas"]) for g in groups] == [(4, 0.1, (0.9, 0.999))]
    assert [g["fused"] for g in groups] == [None]  # fused on CUDA only: the CPU keeps torch's default


@pytest.mark.parametrize("bad,match", [(dict(steps=0), "steps"), (dict(lr=0), "lr"),
                                       (dict(beta2=1.0), "beta2"), (dict(lr_period=0), "lr_period"),
                                       (dict(decay_all=1), "decay_all"),
                                       (dict(dtype="float8"), "dtype"), (dict(device="tpu"), "device"),
                                       (dict(seed=-1), "seed")])
def test_bad_training_settings_are_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad).validate()


def test_atomic_write_gives_files_the_umasks_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0o600


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")

    def failing(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = train(*tiny(), tmp_path / "full", progress=False)
    assert full["steps"] == 6

    # 1) a crash between checkpoints: resume from step 3, redo steps 4..6
    def crash(step, record):
        if step == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train(*tiny(), tmp_path / "crash", progress=False, on_step=crash)
    assert torch.load(tmp_path / "crash" / "checkpoint.pt", weights_only=False)["step"] == 3
    resumed = train(*tiny(), tmp_path / "crash", resume=True, progress=False)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "crash"))
    assert resumed["accuracy"] == full["accuracy"] and resumed["loss"] == full["loss"]
    steps = [r["step"] for r in map(json.loads, (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == [2, 4, 6]  # the lines written after the checkpoint were dropped, not doubled

    # 2) Ctrl-C: the loop finishes the step, checkpoints it and raises Interrupted
    def ctrl_c(step, record):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under a background shell
    with pytest.raises(Interrupted) as exc:
        train(*tiny(), tmp_path / "sigint", progress=False, on_step=ctrl_c)
    assert exc.value.step == 4
    assert signal.getsignal(signal.SIGINT) is before
    train(*tiny(), tmp_path / "sigint", resume=True, progress=False)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "sigint"))


def test_time_limit_stops_training_and_still_evaluates(tmp_path):
    res = train(*tiny(steps=10_000, time_limit_s=1e-9), tmp_path, progress=False)
    assert res["stopped_by"] == "time_limit" and res["steps"] == 0
    assert 0 <= res["accuracy"] <= 1
    ev = evaluate_run(tmp_path, seed=5, batches=2, batch_size=3)
    assert ev["sequences"] == 6 and ev["seed"] == 5


def test_resume_without_a_checkpoint_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        train(*tiny(), tmp_path, resume=True, progress=False)


def test_model_config_for_sizes_the_model_to_the_task():
    task = make_task("arithmetic", digits=2)
    cfg = model_config_for(task, **MODEL)
    assert isinstance(cfg, LMConfig) and cfg.vocab_size == 14 and cfg.max_seq_len >= task.seq_len


@pytest.mark.parametrize("script, extra", [("train_throughput.py", ["--profile", "1"]),
                                           ("mqar_sweep.py", [])])
def test_benchmark_scripts_run_at_toy_size(script, extra, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out),
                           *extra], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["rows"] and all("error" not in r for r in data["rows"]), data["rows"]
    assert f"wrote {out}" in proc.stdout
    if extra:  # the profile: per-step wall time and the ops that took the host's time
        prof = data["rows"][0]["profile"]
        assert prof["wall_ms_per_step_profiled"] > 0 and prof["top_host"][0]["self_host_ms"] > 0


def test_demo_runs_and_reports_held_out_accuracy(tmp_path, capsys, monkeypatch):
    from linattn import demo

    assert demo.DEFAULTS["pairs"] >= 8 and demo.DEFAULTS["vocab"] >= 64  # a real recall problem
    assert demo.DEFAULTS["time_limit_s"] <= 180
    monkeypatch.chdir(tmp_path)  # the default run directory is runs/demo under the working directory
    small = ["--steps", "2", "--d-model", "16", "--n-heads", "2", "--test-batches", "2", "--threads", "1"]
    assert demo.main(small) == 0
    assert demo.main(small) == 0  # replaces its run
    out = capsys.readouterr().out
    assert "test accuracy on the held-out test split" in out and "trained 2 steps" in out
    assert "of 512 recalled values" in out and "eval runs/demo" in out and "generate runs/demo --prompt" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    # the printed numbers are the run's, which `linattn eval runs/demo` reproduces
    metrics = json.loads((tmp_path / "runs" / "demo" / "metrics.json").read_text())
    assert f"{metrics['accuracy']:.1%} of 512" in out
    ev = evaluate_run(tmp_path / "runs" / "demo")
    assert (ev["accuracy"], ev["sequences"]) == (metrics["accuracy"], 64)
    prompt = out.split("--prompt ")[-1].strip().strip('"')
    assert len(prompt.split()) == 2 * demo.DEFAULTS["pairs"] + 1


def test_gated_settings_sweep_runs_in_the_interpreter(tmp_path):
    """benchmarks/sweep_gated.py --smoke: every combination runs and matches the defaults."""
    out = tmp_path / "sweep.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_gated.py"), "--smoke",
                           "--kinds", "scalar", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all("error" not in r for r in rows), rows
    assert all(r["max_diff_vs_default"] < 1e-4 for r in rows), rows


def test_seq_len_warmup_trains_short_first_and_resumes_exactly(tmp_path):
    """A resumed run across the switch from short to full length reaches the same weights,
    and the warm-up changes the run (it is not ignored)."""
    full = train(*tiny(seq_len_warmup=0.5), tmp_path / "full", progress=False)
    assert full["steps"] == 6

    def crash(step, record):
        if step == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train(*tiny(seq_len_warmup=0.5), tmp_path / "crash", progress=False, on_step=crash)
    train(*tiny(seq_len_warmup=0.5), tmp_path / "crash", resume=True, progress=False)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "crash"))
    train(*tiny(), tmp_path / "plain", progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "full").values(),
                                                      weights(tmp_path / "plain").values()))


def test_seq_len_warmup_uses_the_short_task_for_its_steps(monkeypatch):
    from linattn.tasks import mqar

    lengths = []
    original = mqar.MQAR.batch

    def spy(self, split, seed, index, batch_size):
        if split == "train":
            lengths.append(self.seq_len)
        return original(self, split, seed, index, batch_size)

    monkeypatch.setattr(mqar.MQAR, "batch", spy)
    train(*tiny(steps=8, seq_len_warmup=0.25), None, progress=False)
    assert lengths == [8, 8] + [12] * 6     # 2P + 2Q = 8 tokens, then seq_len 12


def test_seq_len_warmup_must_be_a_fraction():
    with pytest.raises(ValueError, match="seq_len_warmup"):
        TrainConfig(seq_len_warmup=1.0).validate()
