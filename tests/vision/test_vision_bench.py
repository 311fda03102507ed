"""benchmarks/vision_bench.py runs end to end (a CPU smoke run) and computes speed-ups."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("vision_bench", ROOT / "benchmarks" / "vision_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vision_bench_smoke(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--device", "cpu", "--dtype", "float32", "--grids", "4x4", "--heads", "2",
                       "--head-dim", "16", "--d-model", "128", "--reps", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "vision_bench.json").read_text())
    names = {(r["kind"], r["name"]) for r in data["rows"]}
    assert {("op", "linear_attention(causal=False)"), ("op", "sdpa(is_causal=False)"),
            ("layer", "mala"), ("layer", "lit"), ("layer", "attention")} <= names
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in data["rows"])
    sdpa = next(r for r in data["rows"] if r["name"] == "sdpa(is_causal=False)")
    assert sdpa["fwd_speedup"] == 1.0
    assert "| op | linear_attention(causal=False)" in capsys.readouterr().out


def test_speedups_divide_by_the_sdpa_row():
    rows = [{"kind": "op", "name": "sdpa(is_causal=False)", "grid": "2x2", "fwd_ms": 4.0, "fwdbwd_ms": 9.0},
            {"kind": "op", "name": "x", "grid": "2x2", "fwd_ms": 1.0, "fwdbwd_ms": 3.0}]
    _bench().speedups(rows)
    assert rows[1]["fwd_speedup"] == 4.0 and rows[1]["fwdbwd_speedup"] == 3.0
