"""`linattn train --task text`, `linattn eval`, `linattn export` and `linattn generate` on
tiny configs, end to end."""
import io
import json
import math
import sysconfig
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linattn.hf as H
from linattn.cli import main
from linattn.hf.generate import generate_cli
from linattn.train import build_model, load_run, load_weights

CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "json"
TINY = ["--d-model", "16", "--layers", "2", "--heads", "2", "--steps", "2", "--batch", "2",
        "--eval-batches", "1", "--no-progress", "--device", "cpu", "--backend", "torch"]


def test_text_run_eval_export_generate(tmp_path, capsys):
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--task", "text", "--corpus", str(CORPUS), "--test-percent", "30",
                 "--seq-len", "24", "--pattern", "gated_deltanet,attention", "--out", str(run), *TINY]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["bits_per_byte"] == metrics["loss"] / math.log(2)
    assert "test bits per byte" in capsys.readouterr().out

    assert main(["eval", str(run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "text" and res["bits_per_byte"] == res["loss"] / math.log(2)

    assert main(["export", str(run), str(hf_dir)]) == 0
    capsys.readouterr()
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model_cfg, _, train_cfg = load_run(run)
    lm = build_model(model_cfg, torch.device("cpu"), train_cfg.seed)
    load_weights(lm, run / "model.safetensors")
    ids = torch.tensor([tok("import json\n").input_ids])
    assert torch.equal(model(ids).logits, lm(ids))
    assert model.config.task["name"] == "text" and model.generation_config.eos_token_id == 0

    # greedy continuation: the run directory and the exported directory agree, streamed or not
    args = ["--prompt", "def load(", "--max-new-tokens", "12", "--device", "cpu"]
    assert main(["generate", str(run), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(hf_dir), *args, "--no-stream"]) == 0
    assert capsys.readouterr().out == from_run
    lm_ids = torch.tensor([tok("def load(").input_ids])
    want = lm.generate(lm_ids, 12)[0, lm_ids.shape[1]:].tolist()
    if 0 in want:  # the text model stops at "<bos>", the end of a document
        want = want[:want.index(0)]
    assert from_run == tok.decode(want, skip_special_tokens=True) + "\n"

    # sampling options reach generate(): top_k 1 is greedy
    out = io.StringIO()
    generate_cli(str(hf_dir), "def load(", device="cpu", out=out, max_new_tokens=12, temperature=0.7,
                 top_k=1, top_p=0.9, seed=0)
    assert out.getvalue() == from_run


def test_synthetic_run_exports_with_an_id_tokenizer(tmp_path, capsys):
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--task", "mqar", "--pairs", "2", "--seq-len", "16", "--vocab", "12",
                 "--mixer", "mlstm_sig", "--out", str(run), *TINY]) == 0
    assert main(["export", str(run), str(hf_dir)]) == 0
    capsys.readouterr()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok("3 4 11").input_ids == [0, 3, 4, 11]
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.generation_config.eos_token_id is None  # a task run never stops early
    assert main(["generate", str(hf_dir), "--prompt", "1 7 2 9 1", "--max-new-tokens", "4", "--no-stream"]) == 0
    words = capsys.readouterr().out.split()
    assert len(words) == 4 and all(w == "<bos>" or (w.isdigit() and int(w) < 12) for w in words)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["train", "--task", "text", "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "corpus" in capsys.readouterr().err
