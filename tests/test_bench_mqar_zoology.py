"""benchmarks/mqar_zoology.py at toy size on the CPU: rows with the promised keys, resumable,
concurrent runs, and the plots."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mqar_zoology.py"
KEYS = {"mixer", "d_model", "seq_len", "num_kv_pairs", "lr", "steps", "accuracy", "state_size", "complete"}


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_smoke_grid_resumes_and_plots(tmp_path):
    out = tmp_path / "zoo.json"
    printed = run("--smoke", "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["mixer"] for r in rows} == {"attention", "mom", "hybrid"}
    for r in rows:
        assert "error" not in r, r
        assert KEYS <= set(r) and r["complete"] and r["steps"] == 3 and 0 <= r["accuracy"] <= 1
    sizes = {r["mixer"]: r["state_size"] for r in rows}
    assert sizes["attention"] == 2 * 2 * 16 * 16  # 2 layers x (K and V) x T x d_model
    assert "| attention |" in printed and f"wrote {out}" in printed
    assert "0 runs to do (3 complete" in run("--smoke", "--out", str(out))  # resumable
    # another lr runs only where no lr solved the cell yet ("solved" at >= 0: every cell)
    assert "0 runs to do (3 complete in" in run("--smoke", "--out", str(out), "--lrs", "1e-2,3e-3",
                                                "--solved-at", "0")
    printed = run("--plot", str(out))
    for png in (tmp_path / "zoo.png", tmp_path / "zoo-state.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in printed


def test_grid_order_and_per_mixer_lrs():
    """The bar's cells first in the given order, then d_model, mixer, lr; --mixer-lrs replaces
    the lr list of the mixers it names; heads only where the head-dim limit needs them."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mqar_zoology as z

    a = argparse.Namespace(cells="512:64,256:16", d_models="128,64", mixers="attention,mom",
                           lrs="2.2e-3,1e-2", mixer_lrs="attention=4.6e-4")
    got = [(s["seq_len"], s["d_model"], s["mixer"], s["lr"]) for s in z.grid(a)]
    assert got == [(512, 128, "attention", 4.6e-4), (512, 128, "mom", 2.2e-3), (512, 128, "mom", 1e-2),
                   (512, 64, "attention", 4.6e-4), (512, 64, "mom", 2.2e-3), (512, 64, "mom", 1e-2),
                   (256, 128, "attention", 4.6e-4), (256, 128, "mom", 2.2e-3), (256, 128, "mom", 1e-2),
                   (256, 64, "attention", 4.6e-4), (256, 64, "mom", 2.2e-3), (256, 64, "mom", 1e-2)]
    assert [z.heads_for("linear", 256), z.heads_for("gla", 256), z.heads_for("mom", 512)] == [2, 1, 2]


def test_a_run_stopped_by_its_time_limit_runs_again_only_with_more_time():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mqar_zoology as z

    timed = {"complete": True, "stopped_by": "run_time_limit", "run_time_limit_s": 420.0}
    assert z.run_is_final(timed, 420.0) and z.run_is_final(timed, 300.0) and not z.run_is_final(timed, 600.0)
    assert z.run_is_final({"complete": True, "stopped_by": "accuracy", "run_time_limit_s": 60.0}, 600.0)
    assert z.run_is_final({"complete": True, "stopped_by": "run_time_limit"}, 600.0)  # no limit recorded
    assert not z.run_is_final({"complete": False, "stopped_by": "budget"}, 60.0)
