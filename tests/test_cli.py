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
    (["--pattern", "gla,attention,gla"], "--pattern gla,attention,gla has 3 layers but --n-layers is 2"),
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


def test_train_help_shows_defaults_every_mixer_and_task(capsys):
    from linattn.layers import MIXERS
    from linattn.tasks import TASKS

    assert exit_code(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in (*MIXERS, *TASKS):
        assert name in text, name
    assert f"token mixer of every layer: {', '.join(MIXERS)} (default: gated_deltanet)" in text
    assert "optimizer steps (default: 1000)" in text and "(default: mqar 64, copy 32)" in text
    assert ", ...)" not in text  # no elided list of mixers


def test_no_progress_still_prints_progress_lines(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "mqar gated_deltanet: training steps 1..6" and "step 6/6" in err[-1], err


def test_resuming_a_finished_run_writes_its_final_test_line_once(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--eval-every", "0", "--out", str(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert (out / "metrics.jsonl").read_text() == before
    assert sum(json.loads(line)["split"] == "test" for line in before.splitlines()) == 1
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--no-progress"]) == 2
    assert "steps=4 is fewer than the 6 steps" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_over(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    (out / "checkpoint.pt").unlink()      # as a run killed before its first checkpoint leaves it
    (out / "model.safetensors").unlink()
    (out / "metrics.json").unlink()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "no checkpoint yet; training its run from step 0" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    (out / "checkpoint.pt").unlink()
    (out / "metrics.json").unlink()
    (out / "model.safetensors").unlink()
    assert main(["train", *TINY, "--out", str(out)]) == 0  # nor does it block a rerun


def test_curves_show_the_tasks_chance_accuracy(tmp_path, monkeypatch):
    seen = {}
    real = linattn.train.plot_curves
    monkeypatch.setattr(linattn.train, "plot_curves",
                        lambda records, path, **kw: seen.update(kw) or real(records, path, **kw))
    assert main(["train", *TINY, "--out", str(tmp_path / "r")]) == 0
    assert seen["chance"] == pytest.approx(1 / 5)  # vocab 10: 4 keys, 5 values


def test_heavy_imports_stay_out_of_the_cli_module():
    code = ("import sys, torch; before = set(sys.modules); import linattn.cli, linattn.train, linattn.tasks; "
            "print(sorted(m for m in ('safetensors', 'matplotlib', 'tqdm', 'yaml') "
            "if m in sys.modules and m not in before))")  # (torch itself may import tqdm)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr


# ------------------------------------------------------------------ a user's first hour, through
# the installed command: subprocesses with the exact input, one shared tiny run.

FIRST = ["--task", "mqar", "--pairs", "2", "--seq-len", "12", "--vocab", "10", "--d-model", "16",
         "--n-heads", "2", "--steps", "6", "--batch", "4", "--lr", "1e-2", "--log-every", "2",
         "--ckpt-every", "3", "--eval-batches", "2", "--device", "cpu"]


def cli(*args, cwd=None, env=None):
    """`linattn ARGS` in a fresh interpreter, as a user runs it (stdout/stderr not a terminal,
    umask 022)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "linattn.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=180, preexec_fn=lambda: os.umask(0o022))


def in_process(capsys, *args):
    """`linattn ARGS` through main() in this process (cheaper than cli(): for the variants of a
    case that cli() covers once), as a CompletedProcess."""
    capsys.readouterr()
    code = exit_code(list(map(str, args)))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_one_line_error(proc, *needles):
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and len(err) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in err[0], err[0]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One tiny run trained by `linattn train --pattern gla,attention,gla` (no --n-layers)."""
    out = tmp_path_factory.mktemp("first") / "run"
    proc = cli("train", *FIRST, "--pattern", "gla,attention,gla", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def copy_of(first_run, tmp_path):
    import shutil

    return Path(shutil.copytree(first_run[0], tmp_path / "run"))


def test_a_pattern_run_names_its_pattern_and_infers_its_depth(first_run):
    out, proc = first_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["layers"] == ["gla", "attention", "gla"] and cfg["model"]["n_layers"] == 3
    assert "gla,attention,gla" in proc.stdout and "gated_deltanet" not in proc.stdout + proc.stderr
    assert json.loads((out / "metrics.json").read_text())["mixer"] == "gla,attention,gla"


def test_progress_off_a_terminal_is_plain_lines_and_files_are_readable(first_run):
    out, proc = first_run
    assert "\r" not in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "mqar gla,attention,gla: training steps 1..6", lines
    assert lines[1].startswith("mqar gla,attention,gla: step 1/6  loss ") and "step 6/6" in lines[-1], lines
    # files get 0o666 less the umask (022), as open() would give them
    for name in ("config.json", "metrics.jsonl", "metrics.json", "model.safetensors", "checkpoint.pt",
                 "curves.png"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    # several test evaluations by default (-1: about 10), not one point at the end
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if r["split"] == "test"] == [1, 2, 3, 4, 5, 6]


def test_eval_without_seed_reproduces_trains_test_numbers(first_run):
    out, _ = first_run
    proc = cli("eval", out, "--json")
    assert proc.returncode == 0, proc.stderr
    res, metrics = json.loads(proc.stdout), json.loads((out / "metrics.json").read_text())
    assert res["seed"] == 0 and res["sequences"] == metrics["test_sequences"] == 8
    assert (res["accuracy"], res["exact_match"], res["loss"]) == (
        metrics["accuracy"], metrics["exact_match"], metrics["loss"])
    assert_one_line_error(cli("eval", out, "--batches", "0"), "--batches must be >= 1, got 0")


def test_generate_answers_a_prompt_in_the_tasks_text(first_run):
    out, _ = first_run
    proc = cli("generate", out, "--prompt", "k0 v1 k3 v0 k0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in {f"v{i}" for i in range(5)} | {"_", "k0", "k1", "k2", "k3"}
    assert len(proc.stdout.strip().split()) == 1  # mqar's answer: one token
    assert_one_line_error(cli("generate", out, "--prompt", "k0 v1 k9"),
                          "--prompt: 'k9' is not a token of task mqar")


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if how == "truncated" else b"\x00garbage" * 100)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_eval_on_corrupt_weights_is_one_line(first_run, tmp_path, capsys, how):
    out = copy_of(first_run, tmp_path)
    corrupt(out / "model.safetensors", how)
    proc = cli("eval", out) if how == "truncated" else in_process(capsys, "eval", out)
    assert_one_line_error(proc, f"{out}/model.safetensors is not a readable safetensors file")


def test_eval_on_weights_of_another_run_is_one_line(first_run, tmp_path):
    from safetensors.torch import save_file

    out = copy_of(first_run, tmp_path)
    state = weights(out)
    state["embed.weight"] = torch.zeros(12, 16)
    save_file(state, str(out / "model.safetensors"))
    assert_one_line_error(cli("generate", out, "--prompt", "k0"),
                          f"{out}/model.safetensors does not match the run's config.json: "
                          "embed.weight is [12, 16] in the file, [10, 16] in the model")


@pytest.mark.parametrize("text,needle", [("{not json", "is not valid JSON"),
                                         ('{"model": {}, "train": {}}', "no task section"),
                                         ('{"model": {"vocab_size": 10, "depth": 2}, "task": {"name": "mqar"}, '
                                          '"train": {}}', "is not a valid run config: unknown LMConfig field")])
def test_eval_on_a_bad_config_json_is_one_line(first_run, tmp_path, capsys, text, needle):
    out = copy_of(first_run, tmp_path)
    (out / "config.json").write_text(text)
    proc = cli("eval", out) if text.startswith("{not") else in_process(capsys, "eval", out)
    assert_one_line_error(proc, f"{out}/config.json", needle)


@pytest.mark.parametrize("name,needle", [("checkpoint.pt", "checkpoint.pt is not a readable checkpoint"),
                                         ("metrics.jsonl", "metrics.jsonl line 2 is not a metrics record")])
def test_a_failed_resume_is_one_line_and_keeps_every_file(first_run, tmp_path, name, needle):
    out = copy_of(first_run, tmp_path)
    if name == "checkpoint.pt":
        corrupt(out / name, "truncated")
    else:
        lines = (out / name).read_text().splitlines()
        (out / name).write_text("\n".join([lines[0], lines[1][:20], *lines[2:]]) + "\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(cli("train", "--out", out, "--resume", "--steps", "8"), needle)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("name,text,needle", [("c.yaml", "steps: [1,\n", "is not valid YAML (line 2"),
                                              ("c.json", '{"steps": 3,}', "is not valid JSON")])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, name, text, needle):
    (tmp_path / name).write_text(text)
    args = ("train", "--config", tmp_path / name, "--out", tmp_path / "r")
    proc = cli(*args) if name == "c.yaml" else in_process(capsys, *args)
    assert_one_line_error(proc, f"config file {tmp_path / name} {needle}")
    assert not (tmp_path / "r").exists()


def test_out_that_is_a_file_or_under_one_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert_one_line_error(cli("train", *FIRST, "--out", tmp_path / "f"), "--out", "is a file, not a directory")
    assert_one_line_error(in_process(capsys, "train", *FIRST, "--out", tmp_path / "f" / "run"),
                          "--out", "cannot create the directory (Not a directory)")
    assert (tmp_path / "f").read_text() == "mine"


def test_a_run_failing_at_step_0_leaves_nothing_that_blocks_a_rerun(tmp_path):
    """The Triton backend on CPU tensors without the interpreter fails at the first forward."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "new" / "run"
    proc = subprocess.run([sys.executable, "-m", "linattn.cli", "train", *FIRST, "--backend", "triton",
                           "--out", str(out)], capture_output=True, text=True, timeout=180,
                          env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert err[-1].startswith("linattn train: error: backend='triton' needs CUDA tensors"), err
    assert not (tmp_path / "new").exists()  # the directories it created are gone


def test_resume_with_more_steps_extends_a_finished_run(first_run, tmp_path):
    out = copy_of(first_run, tmp_path)
    proc = cli("train", "--out", out, "--resume", "--steps", "8", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "step 8/8" in proc.stderr
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 8
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if r["split"] == "train"] == [2, 4, 6, 8]
    tests = [r["step"] for r in curve if r["split"] == "test"]
    assert tests == [1, 2, 3, 4, 5, 6, 7, 8]  # every step (8 // 10 -> 1), the old final one once
    from linattn.train import TrainConfig

    eight = TrainConfig(steps=8, lr=1e-2)
    assert curve[-2]["lr"] == pytest.approx(eight.lr_at(7))  # the 8-step schedule's last lr


def test_top_level_help_lists_every_command(capsys):
    """`linattn --help` names every subcommand (the usage line and the list below it)."""
    from linattn.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    usage = out.split("\n\n")[0]  # the usage lines
    for command in ("train", "eval", "generate", "export", "convert", "distill", "sample",
                    "selftest", "bench"):
        assert command in usage, command
