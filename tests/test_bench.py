"""`linattn bench` on a CPU machine: the no-GPU exit, the floor arithmetic, the registries,
the order of the rows, the tables, the worker pool's handling of crashes and hangs (with
fake workers), and whole runs whose machine (runner.Machine) answers with fixed numbers."""
import json
import sys

import pytest
import torch

import linattn.bench as bench
from linattn.bench import model_cases, op_cases, ops, report, runner
from linattn.bench.flops import FLOP_MODELS, FlopModel, floors, flops_per_token, io_bytes
from linattn.bench.op_cases import OPS_BY_NAME, Shape
from linattn.bench.runner import InProcess, Machine

N = 8 * 8192 * 16 * 128                                   # elements of q at B8 T8192 H16 D128
MAIN = Shape(8, 8192, 16, 128)
H200 = dict(gpu_name=lambda: "NVIDIA H200", ceilings=lambda quick=False: {"copy_TBps": 4.0, "matmul_TFLOPs": 800.0})


def _bytes(name, s=MAIN):
    case = OPS_BY_NAME[name]
    return io_bytes(case.gates, case.decode, s.B, s.T, s.H, s.D)


def test_no_gpu_says_so_and_exits_nonzero(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = bench.main(["--quick", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0
    assert "needs a CUDA GPU" in err and "nothing was measured" in err
    assert list(tmp_path.iterdir()) == []


def test_bytes_floor_of_plain_linear_attention():
    spec = OPS_BY_NAME["linattn.linear_attention[none]"]
    b = _bytes(spec.name)
    assert b["fwd"] == 4 * N * 2                            # read q, k, v; write o (bf16)
    assert b["fwdbwd"] == 4 * N * 2 + 4 * N * 2             # + read do; write dq, dk, dv
    assert b["mem"] == 4 * N * 2                            # o, dq, dk, dv
    f = floors(spec, MAIN, copy_TBps=4.0, matmul_TFLOPs=800.0)
    assert f["floor_fwd_ms"] == pytest.approx(2**30 / 4e12 * 1e3)
    assert f["floor_fwd_bound"] == "bytes"
    assert f["floor_fwdbwd_ms"] == pytest.approx(2**31 / 4e12 * 1e3)
    assert f["mem_floor_gib"] == pytest.approx(1.0)
    flops = (4 * 64 * 128 + 4 * 128 * 128) * 8 * 8192 * 16  # 4 L D + 4 D^2 per token and head
    assert f["flops_fwd"] == flops and f["flops_fwdbwd"] == 3 * flops
    slow = floors(spec, MAIN, copy_TBps=4.0, matmul_TFLOPs=50.0)
    assert slow["floor_fwd_bound"] == "flops"
    assert slow["floor_fwd_ms"] == pytest.approx(flops / 50e12 * 1e3)


def test_gate_bytes_and_gradients_enter_the_floors():
    n_bth = 8 * 8192 * 16
    key = _bytes("linattn.linear_attention[key]")
    assert key["fwd"] == 4 * N * 2 + N * 4                  # + the float32 [B,T,H,K] gate
    assert key["mem"] == 4 * N * 2 + N * 4                  # + its gradient
    gdelta = _bytes("fla.chunk_gated_delta_rule")
    assert gdelta["fwdbwd"] == 8 * N * 2 + 2 * (n_bth * 4 + n_bth * 2)
    gamma = _bytes("fla.chunk_simple_gla[g_gamma]")
    assert gamma["mem"] == 4 * N * 2                        # fla returns no gradient for g_gamma
    dec = floors(OPS_BY_NAME["linattn.delta_rule_decode"], Shape(256, 1, 16, 128), 4.0, 800.0)
    state_rw = 2 * 256 * 16 * 128 * 128 * 4
    assert dec["bytes_fwd"] == state_rw + 4 * 256 * 16 * 128 * 2 + 256 * 16 * (4 + 2)
    assert "floor_fwdbwd_ms" not in dec


def test_flop_models():
    assert flops_per_token("delta", 128, 128, 8192) == pytest.approx(10 * 64 * 128 + 6 * 128**2 + 2 * 64**2 / 3)
    assert flops_per_token("softmax", 128, 128, 8192) == 2 * 8192 * 128
    assert flops_per_token("gla", 128, 128, 8192) == 4 * 64 * 128 + 4 * 128**2
    assert flops_per_token("decode", 128, 128, 1) == 4 * 128**2
    f = floors(OPS_BY_NAME["sdpa[default]"], MAIN, 4.0, 800.0)
    assert f["flops_fwdbwd"] == pytest.approx(3.5 * f["flops_fwd"])
    assert f["floor_fwd_bound"] == "flops"                  # 2^20 * 2 T D at 800 TFLOP/s > 0.27 ms
    with pytest.raises(ValueError, match="FLOP model"):
        flops_per_token("nope", 128, 128, 8192)


def test_rows_run_in_order_of_importance():
    specs = ops.select_ops("", no_peers=False, no_decode=False)
    plan = ops.plan_rows(specs, (8192, 2048, 32768), (128, 256), 65536)
    train = [s for s in specs if not s.decode]
    first = plan[:len(train)]
    assert {sh for _, sh in first} == {MAIN}
    assert [sp.name for sp, _ in first][:2] == ["linattn.linear_attention[none]", "linattn.linear_attention[const]"]
    decode = plan[len(train):len(train) + 12]
    assert all(sp.decode and sh.T == 1 for sp, sh in decode)
    assert [sh.D for _, sh in plan].index(256) > [sh.T for _, sh in plan].index(32768)
    assert len(plan) == 6 * len(train) + 12


def test_select_ops_globs_and_no_peers():
    names = [s.name for s in ops.select_ops("linattn.delta*,fla.chunk_gla", False, True)]
    assert names == ["linattn.delta_rule", "linattn.delta_rule[gated]", "fla.chunk_gla"]
    assert not any(s.family in ("fla", "tfla") for s in ops.select_ops("", True, False))


def _row(op, T=8192, **kw):
    spec = OPS_BY_NAME[op]
    sh = Shape(65536 // T, T, 16, 128)
    r = {"op": op, "family": spec.family, "variant": spec.variant, "decode": spec.decode,
         "B": sh.B, "T": T, "H": 16, "D": 128, "shape": sh.label}
    r.update(floors(spec, sh, 4.0, 800.0))
    r.update(kw)
    return r


def test_text_table_puts_each_number_next_to_its_floor():
    rows = [_row("fla.chunk_simple_gla", fwd_ms=0.8156, fwdbwd_ms=4.0875, peak_gib=3.008),
            _row("tfla.mlstmexp", error="compile error: worker died (signal 6): LLVM ERROR " + "x" * 200)]
    lines = report.ops_table(rows).splitlines()
    assert lines[0].split()[:3] == ["op", "shape", "fwd"]
    cells = lines[2].split()
    assert cells[:6] == ["fla.chunk_simple_gla", "B8", "T8192", "H16", "D128", "0.82"]
    assert cells[6:11] == ["0.27", "4.09", "0.54", "3.01", "1.00"]
    assert "compile error: worker died (signal 6)" in lines[3] and "x" * 100 not in lines[3]
    assert lines[3].split()[5:11] == ["-", "0.27", "-", "0.54", "-", "1.00"]


def _result(rows):
    return {"gpu": "NVIDIA H200", "date": "2026-11-28", "command": "linattn bench --quick",
            "versions": {"torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0", "fla": "0.6.0", "mlstm_kernels": None},
            "ceilings": {"copy_TBps": 4.28, "matmul_TFLOPs": 709.1},
            "config": {"tokens": 65536, "H": 16}, "notes": ["a note"], "rows": rows}


def test_markdown_pivots_ops_by_T_and_escapes_errors():
    rows = [_row("fla.chunk_gla", T=2048, fwd_ms=2.6576, fwdbwd_ms=11.618, peak_gib=6.0),
            _row("fla.chunk_gla", T=8192, fwd_ms=2.6731, fwdbwd_ms=11.6335, peak_gib=6.0),
            _row("linattn.linear_attention[key]", T=8192, error="forward: ValueError: a|b"),
            {**_row("fla.fused_recurrent_simple_gla"), "decode": True, "T": 1, "B": 256,
             "shape": "B256 T1 H16 D128", "step_us": 323.4, "state_TBps": 1.66}]
    md = report.ops_markdown(_result(rows))
    assert "| fla.chunk_gla | 2.66 / 11.62 | 2.67 / 11.63 | 6.00 (1.50) |" in md
    assert "| linattn.linear_attention[key] |  | forward: ValueError: a\\|b |  |" in md
    assert "| T=2048 | T=8192 |" in md and "mlstm_kernels -" in md and "4.28 TB/s" in md
    assert "| fla.fused_recurrent_simple_gla | B256 T1 H16 D128 | 323.4 |" in md
    assert "- a note" in md


def test_bind_by_name_maps_state_aliases_and_names_missing_arguments():
    def step(q, k, v, state, g=None, *, scale=None, inplace=False):
        return q, state, g, scale
    call = op_cases.bind_by_name(step, {"q": 1, "k": 2, "v": 3, "g": 4, "state": 5, "scale": 0.5, "beta": 9})
    assert call() == (1, 5, 4, 0.5)
    call = op_cases.bind_by_name(lambda q, k, v, initial_state: initial_state, {"q": 1, "k": 2, "v": 3, "state": 7})
    assert call() == 7

    def needs_beta(q, k, v, beta, state):
        return beta
    with pytest.raises(TypeError, match="'beta'"):
        op_cases.bind_by_name(needs_beta, {"q": 1, "k": 2, "v": 3, "state": 5})


FAKE_WORKER = r"""
import json, os, sys, time
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "crash":
        print("LLVM ERROR: Assertion failed", file=sys.stderr, flush=True)
        os.abort()
    if req["op"] == "hang":
        time.sleep(60)
    print("noise on stderr", file=sys.stderr, flush=True)
    sys.stdout.write(json.dumps({"fwd_ms": 1.5, "T": req["T"]}) + "\n")
    sys.stdout.flush()
"""


def test_worker_pool_survives_crashes_and_hangs():
    log = open("/dev/null", "w")
    pool = runner.WorkerPool([sys.executable, "-c", FAKE_WORKER], log=log)
    try:
        req = {"B": 8, "T": 8192, "H": 16, "D": 128, "seed": 0}
        assert pool.run("ok", req, timeout=30) == {"fwd_ms": 1.5, "T": 8192}
        crash = pool.run("crash", req, timeout=30)
        assert crash["error"].startswith("compile error: worker died (signal 6)")
        assert "LLVM ERROR" in crash["error"] and "crash" in pool.dead
        assert pool.run("crash", req, timeout=30)["error"].startswith("skipped: compile error")
        hang = pool.run("hang", req, timeout=1.0)
        assert hang["error"].startswith("timeout after 1 s") and "hang" in pool.dead
        assert pool.run("ok", {**req, "T": 2048}, timeout=30) == {"fwd_ms": 1.5, "T": 2048}
        pending = {"a": 0.0, "b": 0.0}
        for op in pending:
            pool.send(op, req)
        import time
        pending = {op: time.monotonic() for op in pending}
        got = pool.collect(pending, lambda op, st: st + 30, first_only=True)
        assert len(got) == 1 and len(pending) == 1
        got.update(pool.collect(pending, lambda op, st: st + 30))
        assert set(got) == {"a", "b"} and not pending
    finally:
        pool.close()
        log.close()


def test_closing_idle_workers_keeps_one_and_restarts_the_others_on_demand():
    log = open("/dev/null", "w")
    pool = runner.WorkerPool([sys.executable, "-c", FAKE_WORKER], log=log)
    try:
        req = {"B": 1, "T": 64, "H": 1, "D": 16, "seed": 0}
        for op in ("a", "b", "c"):
            assert pool.run(op, req, timeout=30)["fwd_ms"] == 1.5
        kept = pool.procs["a"]
        assert pool.close(keep="a") == 2
        assert set(pool.procs) == {"a"} and pool.procs["a"] is kept and not pool.dead
        assert pool.run("b", req, timeout=30)["fwd_ms"] == 1.5   # a new worker for b
        assert set(pool.procs) == {"a", "b"}
    finally:
        pool.close()
        log.close()


def test_a_row_out_of_device_memory_runs_again_alone():
    class Pool:
        dead: dict = {}

        def __init__(self):
            self.calls, self.closed = [], []

        def run(self, key, request, timeout):
            self.calls.append(key)
            if key == "big" and not self.closed:
                return {"error": "warm-up steps: OutOfMemoryError: CUDA out of memory"}
            return {"tokens_per_s": 10.0}

        def close(self, keep=None):
            self.closed.append(keep)
            return 3 if keep is not None else 0

    pool, rows = Pool(), []
    plan = [runner.Job(k, {"case": k}, {"case": k}, None) for k in ("small", "big")]
    runner.run_rows(plan, pool, missing={}, timeout=10, deadline=float("inf"), on_row=rows.append,
                    finish=lambda: None)
    assert pool.calls == ["small", "big", "big"] and pool.closed[0] == "big"
    assert rows[1]["tokens_per_s"] == 10.0 and "error" not in rows[1]
    assert rows[1]["retried"].startswith("alone") and "retried" not in rows[0]


def test_exclusive_rows_close_every_other_worker_first():
    class Pool:
        dead: dict = {}

        def __init__(self):
            self.events = []

        def run(self, key, request, timeout):
            self.events.append(("run", key))
            return {"tokens_per_s": 1.0}

        def close(self, keep=None):
            self.events.append(("close", keep))
            return 0

    plan = [runner.Job(k, {"case": k}, {"case": k}, None) for k in ("a", "a", "b")]
    for exclusive, expected in ((True, [("close", "a"), ("run", "a"), ("close", "a"), ("run", "a"),
                                        ("close", "b"), ("run", "b"), ("close", None)]),
                                (False, [("run", "a"), ("run", "a"), ("run", "b"), ("close", None)])):
        pool, rows = Pool(), []
        runner.run_rows(plan, pool, missing={}, timeout=10, deadline=float("inf"), on_row=rows.append,
                        finish=lambda: None, exclusive=exclusive)
        assert pool.events == expected and len(rows) == 3


def test_whole_run_with_fake_measurements(tmp_path, capsys):
    """main() end to end on a CPU: the machine is a value whose GPU-side answers are fixed."""
    seen = []

    def fake_row(req):
        seen.append((req["op"], req["T"], req["D"]))
        if req["op"] == "linattn.mlstm[exp]":
            return {"error": "forward: NotImplementedError: not built yet"}
        return {"fwd_ms": 1.0 + req["T"] / 8192, "fwdbwd_ms": 3.0, "peak_gib": 2.0}

    machine = Machine(**H200, why_missing=lambda m: "mlstm_kernels is not importable" if m == "mlstm_kernels" else None,
                      pool=lambda argv, row_of: InProcess(fake_row))
    rc = bench.main(["--ops", "linattn.mlstm*,tfla.mlstmsig,sdpa[default]", "--T", "8192,2048",
                     "--D", "128", "--inprocess", "--out", str(tmp_path)], machine)
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    stem = "bench-nvidia-h200-" + json.loads((tmp_path / files[0]).read_text())["date"]
    assert files == [stem + ".json", stem + ".md", stem + ".png"]
    result = json.loads((tmp_path / (stem + ".json")).read_text())
    rows = {(r["op"], r["T"]): r for r in result["rows"]}
    assert len(rows) == 8 and seen[0] == ("linattn.mlstm[sig]", 8192, 128)
    assert rows[("tfla.mlstmsig", 8192)]["error"] == "skipped: mlstm_kernels is not importable"
    assert rows[("linattn.mlstm[exp]", 2048)]["error"].startswith("forward: NotImplementedError")
    assert rows[("sdpa[default]", 2048)]["fwd_ms"] == 1.25
    assert all(r["wall_s"] >= 0 for r in result["rows"] if "error" not in r or "forward" in r["error"])
    assert result["ceilings"] == {"copy_TBps": 4.0, "matmul_TFLOPs": 800.0}
    assert result["versions"]["torch"] == torch.__version__ and "--inprocess" in result["command"]
    assert set(result) == {"gpu", "date", "command", "versions", "ceilings", "config", "notes", "rows", "wall_s"}
    assert set(rows[("sdpa[default]", 8192)]) == {
        "op", "family", "variant", "decode", "B", "T", "H", "D", "shape", "bytes_fwd", "flops_fwd",
        "floor_fwd_ms", "floor_fwd_bound", "bytes_fwdbwd", "flops_fwdbwd", "floor_fwdbwd_ms",
        "floor_fwdbwd_bound", "mem_floor_gib", "fwd_ms", "fwdbwd_ms", "peak_gib", "wall_s"}
    out = capsys.readouterr().out
    table = out[out.index("\nop "):].strip().splitlines()               # the short table is last
    assert len(table) == 2 + 8 and table[-1].startswith("tfla.mlstmsig") and "T2048" in table[-1]


def test_every_registered_case_has_a_builder_and_a_flop_model():
    """The registries are data: every op and model case names a callable builder and a FLOP
    model, names are unique, and every op's builder takes (shape, generator)."""
    import inspect
    assert len(OPS_BY_NAME) == len(op_cases.OPS)
    for case in op_cases.OPS:
        assert callable(case.build), case.name
        assert list(inspect.signature(case.build).parameters)[:2] == ["s", "gen"], case.name
        assert isinstance(case.flops, FlopModel) and FLOP_MODELS[case.flops.name] is case.flops, case.name
        assert case.decode == (case.flops.name == "decode"), case.name
        assert case.family in ("ours", "sdpa", "fla", "tfla")
        assert (case.needs is None) == (case.family in ("ours", "sdpa")) or case.decode, case.name
    for case in model_cases.CASES.values():
        assert callable(case.build) and case.flops is model_cases.training_flops, case.name
        assert case.mixer in model_cases.MIXER_ALGO and model_cases.MIXER_ALGO[case.mixer] in FLOP_MODELS
        assert (case.needs is not None) == (case.family == "fla"), case.name


def test_every_importable_op_builder_makes_its_inputs_on_the_cpu():
    """Each op case whose module imports here builds bf16 q, k, v leaves that require grad
    (and its gates) at a tiny shape, or a decoding step's float32 state, and a callable."""
    s = Shape(1, 16, 2, 16)
    built = 0
    for case in op_cases.OPS:
        if case.needs and runner.why_missing(case.needs):
            continue
        gen = torch.Generator().manual_seed(0)
        if case.decode:
            state, step = case.build(Shape(2, 1, 2, 16), gen)
            assert state.dtype == torch.float32 and state.shape == (2, 2, 16, 16) and callable(step)
        else:
            inputs, fn = case.build(s, gen)
            assert callable(fn) and all(x.requires_grad for x in inputs[:3]), case.name
            assert all(x.dtype == torch.bfloat16 and x.numel() == 16 * 2 * 16 for x in inputs[:3]), case.name
            assert len(inputs) == 3 + len(case.gates), case.name         # one tensor per gate input
        built += 1
    assert built >= 13                                                  # ours and SDPA at least


def test_an_unavailable_peer_is_skipped_with_its_reason(tmp_path):
    """A peer whose module does not import is never sent to a worker (not even to warm up);
    each of its rows says why, and ours still run."""
    sent = []

    class Pool(runner.WorkerPool):
        def __init__(self):
            self.dead = {}

        def send(self, op, req):
            sent.append(op)
            return True

        def collect(self, pending, deadline_of, first_only=False):
            op = next(iter(pending))
            del pending[op]
            return {op: {}}

        def run(self, op, req, timeout):
            sent.append(op)
            return {"fwd_ms": 1.0, "fwdbwd_ms": 2.0, "peak_gib": 1.0}

        def close(self):
            pass

    why = "fla is not importable: ImportError: no transformers"
    machine = Machine(**H200, why_missing=lambda m: why if m == "fla" else None, pool=lambda argv, row_of: Pool())
    assert bench.main(["--ops", "linattn.delta_rule,fla.chunk_delta_rule", "--T", "8192", "--D", "128",
                       "--no-decode", "--out", str(tmp_path)], machine) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {r["op"]: r for r in result["rows"]}
    assert rows["fla.chunk_delta_rule"]["error"] == f"skipped: {why}"
    assert rows["linattn.delta_rule"]["fwd_ms"] == 1.0
    assert "fla.chunk_delta_rule" not in sent and "linattn.delta_rule" in sent
    assert not any("TRITON_ABOVE_3_7_1" in n for n in result["notes"])   # no fla note without fla


def test_one_op_through_a_worker_process(monkeypatch, tmp_path):
    """The real worker pool: `python -m linattn.bench --worker` answers the warm-up and the
    timed request of one op; with no CUDA device visible its row records the stage that failed."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    machine = Machine(**H200)
    assert bench.main(["--ops", "sdpa[default]", "--T", "64", "--D", "16", "--tokens", "128", "--jobs", "1",
                       "--timeout", "120", "--out", str(tmp_path)], machine) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    (row,) = result["rows"]
    assert row["op"] == "sdpa[default]" and row["shape"] == "B2 T64 H16 D16" and row["wall_s"] > 0
    assert row["error"].startswith("inputs: RuntimeError"), row["error"]
    assert set(result["warmup_s"]) == {"sdpa[default]@D16"}


def test_warm_up_reports_seconds_and_retries_a_timed_out_op_alone():
    """warm_up returns how long each op's compile warm-up took (the JSON's warmup_s); an op
    that overran the timeout among the others is tried once more alone, a crash is not."""
    class FakePool:
        def __init__(self):
            self.dead, self.alone = {}, []

        def send(self, op, req):
            return True

        def collect(self, pending, deadline_of, first_only=False):
            op = next(iter(pending))
            del pending[op]                       # as WorkerPool.collect does
            if op in ("b", "d"):                  # as WorkerPool._bury does
                self.dead[op] = "timeout after 10 s" if op == "b" else "crash: worker died"
                return {op: {"error": self.dead[op]}}
            return {op: {}}

        def run(self, op, req, timeout):
            self.alone.append(op)
            return {}

    pool = FakePool()
    took = runner.warm_up(pool, ["a", "b", "c", "d"], lambda op: {"op": op, "warm": True}, jobs=2,
                          timeout=10.0, deadline=float("inf"), retry_alone=True)
    assert set(took) == {"a", "b", "c", "d"} and all(t >= 0 for t in took.values())
    assert pool.alone == ["b"] and "b" not in pool.dead           # retried alone, and it worked
    assert pool.dead["d"].startswith("in the compile warm-up: crash")
    # the model bench's way: a timeout is forgiven (its rows start a new worker), errors recorded
    pool = FakePool()
    took = runner.warm_up(pool, ["a", "b", "c", "d"], lambda op: {"op": op, "warm": True}, jobs=2,
                          timeout=10.0, deadline=float("inf"), retry_alone=False)
    assert took["b"] == "timeout after 10 s" and took["d"] == "crash: worker died" and took["a"] >= 0
    assert pool.alone == [] and "b" not in pool.dead and pool.dead["d"].startswith("in the compile warm-up")


def test_clear_autotune_caches_forgets_chosen_configs():
    """clear_autotune_caches empties every Triton autotuner's chosen configs (what a warm-up
    beside other ops picked) and counts the autotuners that had any."""
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"B": 16}), triton.Config({"B": 32})], key=["n"])
    @triton.jit
    def _tuned(x, n, B: tl.constexpr):
        pass

    _tuned.cache[(64,)] = _tuned.configs[1]               # as a tuned launch leaves it
    assert runner.clear_autotune_caches() >= 1
    assert _tuned.cache == {}


def test_first_timed_row_per_op_and_D_tunes_again_after_a_parallel_warm_up(tmp_path):
    """With --jobs > 1 the worker pool's first timed request per (op, D) carries retune (the
    autotuners tune again alone); later rows at that D do not, and --jobs 1 never does."""
    timed = []

    class FakePool:
        def __init__(self):
            self.dead = {}

        def send(self, op, req):
            return True

        def collect(self, pending, deadline_of, first_only=False):
            op = next(iter(pending))
            del pending[op]
            return {op: {}}

        def run(self, op, req, timeout):
            timed.append((op, req["T"], req["D"], req.get("retune", False)))
            return {"fwd_ms": 1.0, "fwdbwd_ms": 3.0, "peak_gib": 2.0}

        def close(self):
            pass

    machine = Machine(**H200, pool=lambda argv, row_of: FakePool())
    for jobs in ("4", "1"):
        timed.clear()
        assert bench.main(["--ops", "linattn.delta_rule,sdpa[default]", "--T", "8192,2048",
                           "--D", "128,256", "--jobs", jobs, "--no-decode", "--out", str(tmp_path)], machine) == 0
        first = {}
        for op, T, D, retune in timed:
            first.setdefault((op, D), T)
            assert retune == (jobs == "4" and first[(op, D)] == T), (jobs, op, T, D, retune)
        assert len(first) == 4 and len(timed) == 8
