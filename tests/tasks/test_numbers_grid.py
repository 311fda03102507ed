"""benchmarks/numbers_grid.py: the cell order the issue asks for, one cell trained on the CPU
in a child process, records appended and skipped on a second run, the report."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("numbers_grid", ROOT / "benchmarks" / "numbers_grid.py")
grid = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grid)

TINY = ["--device", "cpu", "--d-model", "16", "--layers", "1", "--heads", "2", "--batch", "8",
        "--cell-s", "1", "--eval-every", "5", "--eval-batch-size", "32", "--final-batches", "2", "--workers", "1", "--budget-s", "200"]


def test_cells_run_multiplication_first_then_addition_in_both_orders():
    cells = grid.cells(["mul5", "add3"], list(grid.MIXERS), ["reversed", "forward"])
    first = cells[:5]
    assert [c["mixer"] for c in first] == list(grid.MIXERS)
    assert all(c["task"] == dict(name="arithmetic", digits=5, op="mul", order="reversed") for c in first)
    assert all(c["task"]["order"] == "forward" and c["task"]["op"] == "mul" for c in cells[5:10])
    add = {(c["mixer"], c["task"]["order"]) for c in cells[10:]}
    assert add == {(m, o) for m in grid.MIXERS for o in ("reversed", "forward")}
    assert len({grid.cell_key(c, dict(d_model=1, n_layers=1, n_heads=1, seed=0)) for c in cells}) == 20
    model = dict(d_model=1, n_layers=1, n_heads=1, seed=0, train_lengths="simple", simple_fraction=None, tag="long")
    assert grid.cell_key(cells[0], model).endswith("|train_lengths=simple|long")
    assert grid.cell_key(cells[0], {**model, "simple_fraction": 0.5}).endswith("|train_lengths=simple0.5|long")
    assert grid.run_name(cells[0], "long") == "mul5-mul5_reversed-attention-long"
    by1 = grid.cells(["mul5x1"], ["gla"], ["reversed", "forward"])
    assert [(c["task"]["digits"], c["task"]["digits_b"], c["task"]["order"]) for c in by1] == \
        [(5, 1, "reversed"), (5, 1, "forward")]
    assert grid.run_name(by1[0]) == "mul5x1-mul5x1_reversed-gla"
    tok = grid.cells(["tok"], ["attention", "gla"], ["forward"])
    assert {c["task"]["tokenization"] for c in tok} == {"digit", "l2r3", "r2l3"} and len(tok) == 3


def test_run_cell_in_process_for_the_hybrid(tmp_path):
    hp = dict(save_dir=str(tmp_path), device="cpu", d_model=16, n_layers=4, n_heads=2, batch=8, lr=1e-3, seed=0, cell_s=0.5,
              eval_every=2, stop_at=0.999, train_lengths="uniform", eval_batch=32, final_batches=3)
    cell = dict(phase="mul3", task=dict(name="arithmetic", digits=2, op="mul", order="reversed"), mixer="hybrid")
    rec = grid.run_cell(dict(cell=cell, hp=hp, key="k"))
    assert rec["layers"] == ["gated_deltanet"] * 3 + ["attention"]
    assert rec["train_task"]["lengths"] == "uniform" and rec["task"]["lengths"] == "fixed"
    assert rec["steps"] >= 1 and 0 <= rec["final_exact_match"] <= rec["final_accuracy"] <= 1
    assert rec["final_sequences"] == 3 * 32
    assert all(len(point) == 5 for point in rec["curve"])
    from linattn.train import evaluate_run
    saved = evaluate_run(tmp_path / "mul3-mul2_reversed-hybrid", seed=1, batches=3, batch_size=32)
    assert saved["accuracy"] == rec["final_accuracy"]  # the saved weights are the evaluated ones


def test_grid_appends_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "grid.jsonl"
    args = ["--phases", "add3", "--mixers", "attention", "--orders", "reversed", "--out", str(out), *TINY]
    assert grid.main(args) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["mixer"] == "attention" and recs[0]["task"]["digits"] == 3
    assert grid.main(args) == 0  # the cell is done: nothing runs, nothing is appended
    assert "1 already in" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 1
    assert "| add3 reversed | attention |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


def _toy(**kw):
    """A toy cell's hp that stops at max_steps (stop_at 2: never by exact match)."""
    return {**dict(device="cpu", d_model=16, n_layers=4, n_heads=2, batch=8, lr=1e-2, seed=0, cell_s=600,
                   eval_every=2, stop_at=2.0, train_lengths="simple", eval_batch=32, final_batches=2,
                   max_steps=6), **kw}


MUL2 = dict(phase="mul2", task=dict(name="arithmetic", digits=2, op="mul", order="reversed"), mixer="hybrid")


def test_a_compiled_cell_trains_to_the_eager_losses():
    """--compile default: the training forward/backward as one graph (aot_eager on the CPU,
    see compile_model) gives eager's losses at every periodic evaluation (AOTAutograd sums some
    gradients in its own order: float32 rounding, see tests/test_train_compile.py)."""
    import torch

    torch._dynamo.reset()
    eager = grid.run_cell(dict(cell=MUL2, hp=_toy(compile="none"), key="k"))
    compiled = grid.run_cell(dict(cell=MUL2, hp=_toy(compile="default"), key="k"))
    assert (eager["compile"], compiled["compile"]) == ("none", "default")
    assert eager["steps"] == compiled["steps"] == 6 and compiled["stopped"] == "max_steps"
    assert [c[0] for c in compiled["curve"]] == [2, 4, 6]
    for got, ref in zip(compiled["curve"], eager["curve"]):
        assert got[4] == pytest.approx(ref[4], rel=1e-4), (got, ref)  # train loss
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-4)


def test_a_cell_continues_from_its_checkpoint(tmp_path):
    """A cell stopped by its time box (here segment_steps) keeps its checkpoint; resumed, it
    trains on to the losses of an uninterrupted cell and records cumulative steps and curve."""
    straight = grid.run_cell(dict(cell=MUL2, hp=_toy(compile="none", max_steps=8), key="k"))
    hp = _toy(compile="none", max_steps=8, save_dir=str(tmp_path), segment_steps=4)
    first = grid.run_cell(dict(cell=MUL2, hp=hp, key="k"))
    assert (first["steps"], first["segments"], first["stopped"]) == (4, 1, "time")
    state = grid.saved_state(dict(cell=MUL2, hp=hp, key="k"))
    assert state["step"] == 4 and [c[0] for c in state["curve"]] == [2, 4]
    second = grid.run_cell(dict(cell=MUL2, hp={**hp, "resume": True}, key="k"))
    assert (second["steps"], second["segments"], second["segment_steps"]) == (8, 2, 4)
    assert second["stopped"] == "max_steps" and second["train_s"] >= first["train_s"]
    assert [c[0] for c in second["curve"]] == [2, 4, 6, 8]
    assert [c[4] for c in second["curve"]] == pytest.approx([c[4] for c in straight["curve"]], rel=1e-6)
    assert second["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-6)
    assert grid.saved_state(dict(cell=MUL2, hp=hp, key="another key")) is None
    with pytest.raises(ValueError, match="nothing to resume"):
        grid.run_cell(dict(cell=MUL2, hp={**hp, "resume": True}, key="another key"))


def test_continue_appends_a_cumulative_record(tmp_path, capsys):
    out = tmp_path / "grid.jsonl"
    args = ["--phases", "add3", "--mixers", "attention", "--orders", "reversed", "--out", str(out),
            "--save-dir", str(tmp_path / "runs"), "--tag", "long", *TINY]
    assert grid.main(args) == 0
    assert (tmp_path / "runs" / "add3-add3_reversed-attention-long" / grid.STATE_FILE).is_file()
    assert grid.main(args + ["--continue"]) == 0
    assert "(1 continued from their checkpoints)" in capsys.readouterr().out
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    assert first["key"] == second["key"] and (first["segments"], second["segments"]) == (1, 2)
    assert second["steps"] == first["steps"] + second["segment_steps"] and second["compile"] == "none"
    assert second["curve"][:len(first["curve"])] == first["curve"]
    assert len(grid.load(out)) == 1 and grid.load(out)[0]["segments"] == 2  # the table shows the last
