"""benchmarks/flag_diff.py: kernel options against the defaults, one process per setting. On
the CPU (interpreter, float16) the tool runs one small case: the flag must reach the child
process (gated.chunk = 32 cuts the sequences into other chunks, so its row differs from the
base's, by little), and an unknown flag must stop its child without stopping the others."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flag_reaches_child_and_bad_flag_is_reported(tmp_path):
    out = tmp_path / "diff.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "flag_diff.py"), "--device", "cpu",
         "--op", "mlstm_exp", "--json", str(out), "--timeout", "300", "--settings",
         "off=;on=gated.chunk=32;bad=gated_fwd.NO_SUCH=1"],
        env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "no gated_fwd.NO_SUCH" in run.stderr
    diff = json.load(open(out))["diff"]
    assert diff["bad tiny_pack"] == "not run"
    row = diff["on tiny_pack"]
    assert {"o", "dq", "dk", "dv", "di", "df"} <= set(row)
    assert all(0.0 <= x < 1e-2 for x in row.values()), row     # finite, small
    assert max(row.values()) > 0.0, row                         # the flag took effect


def test_delta_config_field_reaches_child(tmp_path):
    """A DeltaConfig field (U' stored in float32 for the float16 inputs) changes the delta
    rule's results a little; an unknown field stops its child."""
    out = tmp_path / "diff.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "flag_diff.py"), "--device", "cpu",
         "--op", "delta", "--json", str(out), "--timeout", "300", "--settings",
         "off=;on=delta.vnew_in_input_dtype=0;bad=delta.no_such=1"],
        env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "no delta.no_such" in run.stderr
    diff = json.load(open(out))["diff"]
    assert diff["bad tiny_pack"] == "not run"
    row = diff["on tiny_pack"]
    assert {"o", "dq", "dk", "dv", "dbeta", "dg"} <= set(row)
    assert all(0.0 <= x < 1e-2 for x in row.values()), row
    assert max(row.values()) > 0.0, row
