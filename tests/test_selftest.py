"""`linattn selftest`: the table, the exit status, and that a failure is reported."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from linattn import selftest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "linattn.cli", "selftest", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_passes_and_prints_the_table():
    r = _cli("--device", "cpu", "--quick", "--ops", "delta_rule,mlstm_decode")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "worst error / bound" in r.stdout
    for op in ("delta_rule", "mlstm_decode"):
        assert any(line.startswith(op) and line.rstrip().endswith("ok")
                   for line in r.stdout.splitlines()), r.stdout
    assert "bitwise equal" in r.stdout
    assert " 0 of" not in r.stdout and "passed in" in r.stdout


def test_cli_exits_1_on_a_failure():
    # a zero tolerance fails every inexact result: the planted failure must reach the exit status
    r = _cli("--device", "cpu", "--quick", "--ops", "delta_rule_decode", "--tolerance-scale", "0")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout


def test_cli_rejects_unknown_ops():
    r = _cli("--ops", "softmax")
    assert r.returncode == 2 and "unknown --ops" in r.stderr
    r = _cli("--jobs", "0")
    assert r.returncode == 2 and "--jobs must be >= 1" in r.stderr


def test_worker_processes_give_the_same_rows_in_the_same_order():
    """--jobs 2 (spawned workers; on CUDA they compile Triton kernels side by side) prints the
    rows of the plan in its order with the verdicts and worst ratios of one process."""
    cases = (selftest.Case("delta_rule", "scalar"), selftest.Case("mlstm_decode", "exp"))
    one = selftest.run("cpu", quick=True, cases=cases, out=open(os.devnull, "w"))
    two = selftest.run("cpu", quick=True, cases=cases, out=open(os.devnull, "w"), jobs=2)
    assert len(one) == len(selftest.plan("cpu", quick=True, cases=cases)) >= 8  # 2 rows x 2 cases x targets
    assert one == two
    assert selftest.default_jobs("cpu") == 1 and 1 <= selftest.default_jobs("cuda") <= 16


def test_cuda_plan_shares_specialisations_within_groups():
    """On CUDA every op, gate kind and dtype is still planned; the shapes share their head
    dims, so that one group's rows (one op's kernels in one dtype: a constant decay runs the
    scalar gate's) reuse the kernels its first row compiles; float32 groups come first."""
    todo = selftest.plan("cuda")
    covered = {(case.op, case.gate, target.dtype) for _, case, _, target in todo}
    assert covered == {(c.op, c.gate, dt) for c in selftest.CASES
                       for dt in (torch.float32, torch.bfloat16, torch.float16)}
    assert {(s.K, s.V) for s in selftest.SHAPES + selftest.DECODE_SHAPES} == {(24, 40)}
    groups = {selftest.group_of(case, target) for _, case, _, target in todo}
    assert len(groups) == 12 * 3                     # const and scalar share one per dtype
    la = selftest.Target("triton", torch.float32, "cuda")
    assert (selftest.group_of(selftest.Case("linear_attention", "const"), la)
            == selftest.group_of(selftest.Case("linear_attention", "scalar"), la))
    bf = selftest.Target("triton", torch.bfloat16, "cuda")
    delta = selftest.Case("delta_rule", "scalar")
    assert selftest.compile_seconds(delta, la) > selftest.compile_seconds(delta, bf)


def test_a_wrong_fast_path_fails_its_row():
    """A fast path that is off by a small relative amount fails the rule (the row's verdict
    comes from the checks, not from the absence of an exception)."""
    case = selftest.Case("linear_attention", "scalar")
    shape = selftest.SHAPES[1]
    target = selftest.Target("torch", torch.float32, "cpu")
    assert selftest.check_case(case, shape, target).ok
    honest = selftest.fast_fn(case, "torch")

    def wrong(**kw):
        o, s = honest(**kw)
        return o * (1 + 1e-4), s
    row = selftest.check_case(case, shape, target, fn=wrong)
    assert not row.ok and "o: error" in row.detail


def test_determinism_row_detects_a_nondeterministic_path():
    case = selftest.Case("delta_rule", "none")
    target = selftest.Target("torch", torch.float32, "cpu")
    assert selftest.check_determinism(case, selftest.DETERMINISM_SHAPE, target).ok
    honest = selftest.fast_fn(case, "torch")

    def noisy(**kw):
        o, s = honest(**kw)
        return o + 1e-3 * torch.rand_like(o), s
    assert not selftest.check_determinism(case, selftest.DETERMINISM_SHAPE, target, fn=noisy).ok
