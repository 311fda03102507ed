"""`linattn train / eval / bench`: end to end on a tiny run, config layering, resume through
the CLI, and one-line errors (exit 2) for settings that cannot work."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linattn.train
from linattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--task", "mqar", "--pairs", "2", "--seq-len", "12", "--vocab", "10", "--d-model", "16",
        "--n-layers", "2", "--n-heads", "2", "--steps", "6", "--batch", "4", "--lr", "1e-2",
        "--log-every", "2", "--ckpt-every", "3", "--eval-batches", "1", "--device", "cpu", "--no-progress"]


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


def test_train_then_eval_writes_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    for name in ("config.json", "metrics.jsonl", "metrics.json", "model.safetensors", "checkpoint.pt", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["mixer"] == "gated_deltanet" and cfg["model"]["d_model"] == 16
    assert cfg["task"] == {"name": "mqar", "pairs": 2, "seq_len": 12, "vocab": 10, "queries": 0}
    assert cfg["train"]["steps"] == 6 and cfg["train"]["lr"] == 1e-2
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "loss", "steps", "tokens_per_s", "parameters"):
        assert key in metrics, key
    assert metrics["steps"] == 6 and metrics["parameters"] > 0 and 0 <= metrics["accuracy"] <= 1
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if r["split"] == "train"] == [2, 4, 6]
    assert curve[-1]["split"] == "test"
    assert "accuracy" in capsys.readouterr().out

    assert main(["eval", str(out), "--batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "mqar" in printed and "test seed" in printed
    assert main(["eval", str(out), "--json", "--seed", "7"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["seed"] == 7 and 0 <= res["accuracy"] <= 1 and res["answer_tokens"] == 4 * 2

    # the reloaded weights are the trained ones: eval on the training run's own test batches
    # gives metrics.json's numbers
    assert main(["eval", str(out), "--json", "--seed", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] == metrics["accuracy"] and res["loss"] == pytest.approx(metrics["loss"], rel=1e-6)


def test_config_file_is_overridden_by_explicit_flags(tmp_path):
    conf = tmp_path / "run.yaml"
    conf.write_text("task: copy\ncopy_len: 2\nseq-len: 12\nvocab: 8\nd_model: 16\nn_heads: 2\n"
                    "steps: 2\nbatch: 2\nlr: 0.5\ndevice: cpu\neval_batches: 1\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(conf), "--lr", "0.002", "--no-progress", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"]["name"] == "copy" and cfg["task"]["copy_len"] == 2
    assert cfg["train"]["lr"] == 0.002 and cfg["train"]["steps"] == 2  # flag beats file; file beats default
    # a run's own config.json is a valid --config
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.json"), "--no-progress", "--out", str(again)]) == 0
    assert json.loads((again / "config.json").read_text()) == cfg


def test_cli_resume_after_ctrl_c_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *TINY, "--out", str(full)]) == 0
    real_train = linattn.train.train

    def interrupted_at_step_4(*args, **kwargs):
        kwargs["on_step"] = lambda step, rec: step == 4 and os.kill(os.getpid(), signal.SIGINT)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(linattn.train, "train", interrupted_at_step_4)
    assert main(["train", *TINY, "--out", str(cut)]) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(linattn.train, "train", real_train)
    assert main(["train", "--out", str(cut), "--no-progress"]) == 2  # exists: needs --resume
    assert main(["train", "--out", str(cut), "--resume", "--no-progress"]) == 0
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,match", [
    (["--mixer", "transformerx"], "unknown mixer 'transformerx'"),
    (["--task", "sorting"], "unknown task 'sorting'"),
    (["--hybrid", "2"], "hybrid=2"),                       # 3-layer blocks do not tile 2 layers
    (["--d-model", "18", "--n-heads", "4"], "divisible"),
    (["--digits", "3"], "--digits does not apply to task mqar"),
    (["--pairs", "9"], "fewer than pairs"),                  # vocab 10 has 4 keys
    (["--steps", "0"], "steps"),
    (["--dtype", "fp8"], "dtype"),
    (["--layers"], "expected one argument"),                 # argparse's own errors: one line too
    (["--bogus-flag"], "unrecognized arguments"),
])
def test_bad_configs_exit_2_with_one_line(tmp_path, capsys, extra, match):
    code = exit_code(["train", *TINY, *extra, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and match in err, err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def exit_code(argv) -> int:
    """main's return value, or the status of the SystemExit that argparse raises."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_bad_config_file_and_resume_mismatch_exit_2(tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("depth: 3\n")
    assert main(["train", "--config", str(conf), "--out", str(tmp_path / "r")]) == 2
    assert "unknown setting 'depth'" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "differs" in err
    assert main(["eval", str(tmp_path / "nothing")]) == 2


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "linattn.cli", "train", "--mixer", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "unknown mixer 'nope'" in proc.stderr


def test_bench_delegates_or_says_it_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "linattn.bench", None)  # as if the module were absent
    assert main(["bench", "--help"]) == 1
    assert "linattn.bench" in capsys.readouterr().err
    seen = {}
    fake = type(sys)("linattn.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "linattn.bench", fake)
    assert main(["bench", "--ops", "gla", "--quick"]) == 0
    assert seen["argv"] == ["--ops", "gla", "--quick"]


def test_heavy_imports_stay_out_of_the_cli_module():
    code = ("import sys, torch; before = set(sys.modules); import linattn.cli, linattn.train, linattn.tasks; "
            "print(sorted(m for m in ('safetensors', 'matplotlib', 'tqdm', 'yaml') "
            "if m in sys.modules and m not in before))")  # (torch itself may import tqdm)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr
