"""benchmarks/numbers_grid.py: the cell order the issue asks for, one cell trained on the CPU
in a child process, records appended and skipped on a second run, the report."""
import importlib.util
import json
from pathlib import Path

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
