"""`linattn train --task digits --model vit|dit` and `linattn sample`, at tiny sizes."""
import json

import pytest

from linattn.cli import main

TINY = ["--d-model", "16", "--layers", "1", "--heads", "2", "--patch-size", "2", "--batch", "32",
        "--device", "cpu", "--eval-every", "0"]


def test_train_vit_writes_test_accuracy(tmp_path, capsys):
    out = tmp_path / "vit"
    assert main(["train", "--task", "digits", "--model", "vit", "--mixer", "mala", "--steps", "40",
                 "--lr", "3e-3", *TINY, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["mixer"] == "mala" and m["test_images"] == 360 and m["steps"] == 40
    assert m["accuracy"] > 0.2  # 10 classes: chance is 0.1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["model_type"] == "vit" and cfg["task"] == {"name": "digits"}
    assert (out / "model.safetensors").is_file()
    assert "digits" in capsys.readouterr().out


def test_dit_then_lit_with_inheritance_then_sample(tmp_path, capsys):
    dit, lit = tmp_path / "dit", tmp_path / "lit"
    common = ["--task", "digits", "--model", "dit", "--steps", "3", "--diffusion-steps", "8",
              "--eval-samples", "2", *TINY]
    assert main(["train", *common, "--mixer", "attention", "--out", str(dit)]) == 0
    assert main(["train", *common, "--mixer", "lit", "--inherit-from", str(dit), "--out", str(lit)]) == 0
    m = json.loads((lit / "metrics.json").read_text())
    assert m["distilled"] and m["inherited_tensors"] > 0 and m["samples"] == 20
    assert {"accuracy", "fd", "per_class_accuracy"} <= set(m)
    curve = [json.loads(line) for line in (lit / "metrics.jsonl").read_text().splitlines()]
    assert {"kd_eps", "kd_var", "mse", "vb"} <= set(curve[0])
    assert main(["sample", str(lit), "--class", "3", "--n", "5"]) == 0
    png = lit / "samples_class3.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "samples_class3.png" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--task", "digits"], "task digits is images"),
    (["--task", "mqar", "--patch-size", "2"], "--patch-size apply to --model vit or dit"),
    (["--task", "mqar", "--model", "vit"], "trains on --task digits"),
    (["--task", "digits", "--model", "vit", "--pairs", "4"], "--pairs do not apply to vision runs"),
    (["--task", "digits", "--model", "cnn"], "--model must be lm, vit or dit"),
    (["--task", "digits", "--model", "vit", "--mixer", "gla"], "unknown vision mixer"),
])
def test_vision_setting_errors(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_sample_needs_a_dit_run(tmp_path, capsys):
    out = tmp_path / "vit"
    assert main(["train", "--task", "digits", "--model", "vit", "--mixer", "linear", "--steps", "1",
                 *TINY, "--out", str(out)]) == 0
    assert main(["sample", str(out), "--class", "3"]) == 2
    assert "sample needs a --model dit run" in capsys.readouterr().err
    assert main(["sample", str(out), "--class", "12"]) == 2
