"""benchmarks/linearize.py end to end on the tiny teacher: a methods command out of time
leaves the work for the next one, which finishes it; the speed stage appends its rows to the
same results; the table prints."""
import importlib.util
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("peft")

CORPUS = str(Path(sysconfig.get_paths()["stdlib"]) / "json")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "linearize.py"


def bench():
    spec = importlib.util.spec_from_file_location("linearize_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_methods_resume_and_speed(teacher_dir, tmp_path, capsys):
    mod = bench()
    work = tmp_path / "work"
    shutil.copytree(teacher_dir, work / "teacher")
    common = ["--work", str(work), "--device", "cpu", "--corpus", CORPUS, "--seq-len", "32", "--no-progress",
              "--out", str(tmp_path / "out.json")]
    methods = common + ["--methods", "liger-attention", "lolcats", "--distill-batch", "2", "--eval-batches", "1",
                        "--budget-percent", "5", "--eval-reserve", "0"]
    assert mod.main(["methods", *methods, "--time-budget", "0"]) == 0
    assert "run the same command again for liger-attention, lolcats" in capsys.readouterr().out
    assert json.loads((work / "results.json").read_text())["methods"] == {}
    assert mod.main(["methods", *methods]) == 0
    out = capsys.readouterr().out
    assert "methods: all done" in out and "recovered" in out
    res = json.loads((tmp_path / "out.json").read_text())
    assert sorted(res["methods"]) == ["liger-attention", "lolcats"]
    lol = res["methods"]["lolcats"]
    assert sorted(lol["stages"]) == ["attention", "finetune"] and lol["tokens"] <= lol["budget_tokens"]
    assert lol["stages"]["finetune"]["lr"] == 1e-4 and lol["stages"]["attention"]["lr"] == 1e-2
    assert res["unigram_bpb"] > 0 and res["teacher_bpb"] > 0  # the fixture teacher is barely trained
    assert mod.main(["speed", *common, "--gen-batch", "1", "--prompt", "16", "--new-tokens", "2"]) == 0
    res = json.loads((tmp_path / "out.json").read_text())
    assert {r["model"] for r in res["speed"]} == {"teacher", *mod.METHODS} and sorted(res["methods"]) == [
        "liger-attention", "lolcats"]
    assert all("tokens_per_s" in r for r in res["speed"]), [r.get("error") for r in res["speed"]]
