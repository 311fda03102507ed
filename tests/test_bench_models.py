"""`linattn bench --models` on a CPU machine: the FLOP and MFU arithmetic against hand counts,
the ratios to attention and to fla's layers, the fla wrapper's contract, a failing row that
records its error while the run goes on, the no-GPU exit, and whole --smoke runs (in-process,
and one case through a worker process) that write the JSON, markdown and PNG."""
import json
import math

import pytest
import torch
from torch import nn

import linattn.bench as bench
from linattn.bench import model_cases as mc
from linattn.bench import models as bm
from linattn.bench import report, runner
from linattn.bench.flops import flops_per_token

TINY = mc.ModelSize(2, 32, 2, vocab=64)      # 2 layers, d_model 32, 2 heads of 16


def test_flops_of_a_tiny_attention_model_by_hand():
    model = mc.build_ours(TINY, 64, "torch", mixer="attention")
    # per layer: q, k, v, o 4 * 32 * 32; two RMSNorms 2 * 32; SwiGLU (hidden 128) gate_up
    # 32 * 256 and down 128 * 32; then the tied embedding 64 * 32 and the final norm 32
    per_layer = 4 * 32 * 32 + 2 * 32 + 32 * 256 + 128 * 32
    n = 2 * per_layer + 64 * 32 + 32
    assert n == 34976
    assert mc.matmul_params(model) == n
    assert mc.mixing_layers(model) == [("softmax", 2, 16, 16)] * 2
    f = mc.model_flops(mc.mixing_layers(model), 64, n)
    # causal softmax: a query attends T / 2 keys on average, Q K^T and P V: T (K + V) per
    # token and head, 2 heads, 2 layers, x3 for forward + backward
    assert f["flops_per_token_mixing"] == 3 * 2 * 2 * (64 * (16 + 16))
    assert f["flops_per_token"] == 6 * 34976 + 3 * 2 * 2 * 2048 == 234432


def test_untied_head_counts_the_head_not_the_embedding():
    from linattn.models import CausalLM, LMConfig
    tied = mc.build_ours(TINY, 64, "torch", mixer="attention")
    untied = CausalLM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mixer="attention",
                               tie_embeddings=False))
    assert sum(p.numel() for p in untied.parameters()) == mc.matmul_params(tied) + 64 * 32
    assert mc.matmul_params(untied) == mc.matmul_params(tied)


def test_chunk_flops_by_hand_with_K_and_V_apart():
    # GLA's K = head_dim / 2: Q K^T 2 L K, A V 2 L V, Q S and K^T V 2 K V each
    assert flops_per_token("gla", 8, 16, 64) == 2 * 64 * 8 + 2 * 64 * 16 + 4 * 8 * 16 == 3584
    assert flops_per_token("delta", 16, 16, 64) == pytest.approx(
        2 * 64 * (3 * 16 + 2 * 16) + 6 * 16 * 16 + 2 * 64 * 64 / 3)
    assert flops_per_token("softmax", 8, 16, 64) == 64 * (8 + 16)
    with pytest.raises(ValueError, match="FLOP model"):
        flops_per_token("nope", 16, 16, 64)
    hybrid = mc.build_ours(TINY, 64, "torch", mixer="gla", hybrid=1)
    assert mc.mixing_layers(hybrid) == [("gla", 2, 8, 16), ("softmax", 2, 16, 16)]   # GLA's K = 16 / 2
    f = mc.model_flops(mc.mixing_layers(hybrid), 64, 1000)
    assert f["flops_per_token_mixing"] == 3 * 2 * (3584 + 64 * 32)
    assert f["flops_per_token"] == 6000 + f["flops_per_token_mixing"]


def _row(case, T, tps, family="ours", peer=None, fpt=1e9):
    return {"case": case, "family": family, "peer": peer, "T": T, "B": 16384 // T,
            "tokens_per_s": tps, "flops_per_token": fpt}


def test_mfu_and_the_ratios_to_attention_and_to_fla():
    rows = [_row("attention", 8192, 200e3, "sdpa"), _row("gated_deltanet", 8192, 300e3),
            _row("fla.GatedDeltaNet", 8192, 250e3, "fla", peer="gated_deltanet"),
            _row("gla", 8192, 100e3), _row("gated_deltanet", 2048, 150e3),
            {"case": "deltanet", "family": "ours", "peer": None, "T": 8192, "B": 2, "error": "x"}]
    bm.add_ratios(rows, 800.0)
    att, ours, fla, gla, other_T, failed = rows
    assert ours["mfu"] == pytest.approx(1e9 * 300e3 / 800e12)
    assert mc.mfu(1e9, 300e3, 800.0) == pytest.approx(0.375)
    assert att["vs_attention"] == 1.0 and ours["vs_attention"] == pytest.approx(1.5)
    assert ours["vs_fla"] == pytest.approx(1.2) and fla["vs_fla"] is None and gla["vs_fla"] is None
    assert other_T["vs_attention"] is None and other_T["vs_fla"] is None     # no attention row at T 2048
    assert "mfu" not in failed and "vs_attention" not in failed
    table = report.models_markdown_table(rows).splitlines()
    assert table[0].startswith("| model | T | B | tokens/s | ms/step | x attention | x fla | MFU % |")
    assert "| gated_deltanet | 8192 | 2 | 300,000 |" in table[3] and "| 1.50 | 1.20 | 37.5 |" in table[3]
    assert table[-1].endswith("| x |")


def test_fla_mixer_follows_the_mixer_contract():
    class FakeFlaLayer(nn.Module):                # fla's layers return (o, attentions, cache)
        def forward(self, x, **kw):
            self.kw = kw
            return 2 * x, None, None

    layer = FakeFlaLayer()
    mixer = mc.FlaMixer(layer)
    x = torch.randn(1, 5, 8)
    y, state = mixer(x)
    assert torch.equal(y, 2 * x) and state is None and layer.kw == {}
    cu = torch.tensor([0, 2, 5])
    mixer(x, cu_seqlens=cu)
    assert layer.kw["cu_seqlens"] is cu
    with pytest.raises(ValueError, match="return_state"):
        mixer(x, return_state=True)
    # in a model: counted by the fla layer's own heads and dims, named by its class
    layer.num_heads, layer.head_k_dim, layer.head_v_dim = 4, 8, 4
    model = mc.build_ours(TINY, 64, "torch", mixer="gla")
    model.blocks[0].mixer = mixer
    assert mc.mixing_layers(model) == [("gla", 4, 8, 4), ("gla", 2, 8, 16)]
    assert mc.describe_pattern(model) == "fla.FakeFlaLayer x1, gla x1"
    assert model(torch.randint(0, 64, (1, 6))).shape == (1, 6, 64)


def test_cases_are_ordered_and_select_by_glob():
    names = list(mc.CASES)
    assert names[0] == "attention"
    for c in mc.CASES.values():
        if c.family == "fla":                     # each fla case right after the case it is compared with
            assert names[names.index(c.name) - 1] == c.peer
    picked = [c.name for c in bm.select_cases("attention,*gated_deltanet*", no_fla=True)]
    assert picked == ["attention", "gated_deltanet", "gated_deltanet_recompute", mc.HYBRID]
    # the recompute case builds its ops with save_for_backward="recompute"
    model = mc.CASES["gated_deltanet_recompute"].build(TINY, 64, "torch")
    assert {b.mixer.save_for_backward for b in model.blocks} == {"recompute"}
    plan = bm.plan_rows(bm.select_cases("attention,gla", False), (8192, 2048))
    assert [(c.name, T) for c, T in plan] == [("attention", 8192), ("attention", 2048), ("gla", 8192), ("gla", 2048)]


def test_no_gpu_says_so_and_exits_nonzero(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = bench.main(["--models", "--out", str(tmp_path)])
    assert rc == runner.EXIT_NO_GPU
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_failing_row_records_its_error_and_the_run_goes_on(tmp_path, capsys):
    def boom(size, T, backend):
        raise RuntimeError("boom at build")

    cases = [mc.Case("broken", "ours", "gla", boom), mc.CASES["lightning"],
             mc.Case("needs_absent", "fla", "gla", boom, needs="no_such_module_here", peer="lightning")]
    args = bm.parse_args(["--smoke", "--inprocess", "--out", str(tmp_path)])
    s = dict(bm.SETTINGS["smoke"], steps=1, warmup=1)
    result = bm.run(args, cases, bm.SIZES["smoke"], s)
    broken, lightning, absent = result["rows"]
    assert broken["error"] == "build: RuntimeError: boom at build" and "tokens_per_s" not in broken
    assert lightning["tokens_per_s"] > 0 and "error" not in lightning
    assert absent["error"] == "skipped: no_such_module_here is not importable"
    saved = json.loads(next(tmp_path.glob("bench-models-cpu-*-smoke.json")).read_text())
    assert [r.get("error") for r in saved["rows"]] == [r.get("error") for r in result["rows"]]
    assert "boom at build" in capsys.readouterr().out.splitlines()[-3]


def test_why_missing_names_the_cause(tmp_path, monkeypatch):
    pkg = tmp_path / "brokenpkg_for_bench_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from transformers_too_old import PreTrainedConfig\n")
    (pkg / "layers.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    why = runner.why_missing("brokenpkg_for_bench_models.layers")
    assert why.startswith("brokenpkg_for_bench_models.layers is not importable: ModuleNotFoundError")
    assert "transformers_too_old" in why
    assert runner.why_missing("no_such_module_here") == "no_such_module_here is not importable"
    assert runner.why_missing("json") is None


ROW_KEYS = {"case", "family", "peer", "T", "B", "tokens_per_step", "parameters", "matmul_parameters",
            "layers", "flops_per_token_dense", "flops_per_token_mixing", "flops_per_token", "warmup_s",
            "ms_per_step", "ms_per_step_min", "ms_per_step_max", "wall_ms_per_step", "tokens_per_s",
            "loss", "wall_s", "mfu", "vs_attention", "vs_fla"}


def test_smoke_run_end_to_end(tmp_path, capsys):
    rc = bench.main(["--models", "--smoke", "--inprocess", "--out", str(tmp_path)])
    assert rc == 0
    stems = {p.name for p in tmp_path.iterdir()}
    stem = next(p.stem for p in tmp_path.glob("*.json"))
    assert stem.startswith("bench-models-cpu-") and stem.endswith("-smoke")
    assert stems == {stem + ext for ext in (".json", ".md", ".png")}
    result = json.loads((tmp_path / (stem + ".json")).read_text())
    assert {"benchmark", "gpu", "date", "command", "versions", "ceilings", "config", "notes", "rows",
            "wall_s"} <= set(result)
    assert result["command"] == f"linattn bench --models --smoke --inprocess --out {tmp_path}"
    cfg = result["config"]
    assert (cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["vocab"], cfg["T"]) == (4, 32, 2, 64, [64])
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == list(mc.CASES)
    peak = result["ceilings"]["matmul_TFLOPs"]
    for name, r in rows.items():
        if mc.CASES[name].family == "fla":           # fla is absent on CPU CI, or has no CPU kernels
            assert r["error"] and "tokens_per_s" not in r
            continue
        assert ROW_KEYS <= set(r), name
        assert "error" not in r and math.isfinite(r["loss"])
        assert r["tokens_per_s"] == pytest.approx(r["B"] * r["T"] / (r["ms_per_step"] * 1e-3))
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / (peak * 1e12))
        assert r["vs_attention"] == pytest.approx(r["tokens_per_s"] / rows["attention"]["tokens_per_s"])
    assert rows[mc.HYBRID]["layers"] == "gated_deltanet x3, attention x1"
    out = capsys.readouterr().out.rstrip().splitlines()
    table = out[-len(rows) - 2:]                  # the markdown table is printed last
    assert table[0].startswith("| model |") and table[2].startswith("| attention | 64 | 2 |")
    md = (tmp_path / (stem + ".md")).read_text()
    assert "## linattn bench --models: smoke" in md and "| mlstm | 64 | 2 |" in md


def test_one_case_through_a_worker_process(tmp_path):
    rc = bm.main(["--smoke", "--cases", "mlstm_sig", "--steps", "1", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(result["warmup_s"]) == {"mlstm_sig"} and isinstance(result["warmup_s"]["mlstm_sig"], float)
    (row,) = result["rows"]
    assert row["case"] == "mlstm_sig" and row["tokens_per_s"] > 0 and "error" not in row


class FakePool(runner.WorkerPool):
    """Answers every request at once and records it: no processes."""

    def __init__(self, timeouts=()):
        self.dead, self.requests, self.timeouts = {}, [], set(timeouts)

    def send(self, op, request):
        self.requests.append(request)
        return True

    def collect(self, pending, deadline_of, first_only=False):
        op = next(iter(pending))
        del pending[op]
        if op in self.timeouts:                   # as WorkerPool does: the worker is killed
            self.dead[op] = "timeout after 240 s"
            return {op: {"error": "timeout after 240 s"}}
        return {op: {}}

    def run(self, op, request, timeout):
        self.requests.append(request)
        return {"tokens_per_s": 1000.0, "ms_per_step": 1.0, "flops_per_token": 1e6}

    def close(self):
        pass


def _with(pool):
    """A machine whose rows go to `pool` (the CPU's: --smoke runs on the CPU)."""
    return runner.Machine(pool=lambda argv, row_of: pool)


def test_after_the_shared_warm_up_each_cases_first_row_tunes_again(tmp_path):
    pool = FakePool()
    args = bm.parse_args(["--smoke", "--jobs", "2", "--out", str(tmp_path)])
    cases = bm.select_cases("attention,gla", False)
    result = bm.run(args, cases, bm.SIZES["smoke"], dict(bm.SETTINGS["smoke"], T=(128, 64)), _with(pool))
    warm = [r for r in pool.requests if r.get("warm")]
    timed = [r for r in pool.requests if not r.get("warm")]
    assert [(r["case"], r["B"], r["T"]) for r in warm] == [("attention", 1, 64), ("gla", 1, 64)]
    assert [(r["case"], r["T"], r["retune"]) for r in timed] == [
        ("attention", 128, True), ("attention", 64, False), ("gla", 128, True), ("gla", 64, False)]
    assert set(result["warmup_s"]) == {"attention", "gla"}


def test_compiled_warm_up_runs_at_the_first_rows_shape(tmp_path):
    """--compile: one static graph per shape, so the warm-up compiles the first row's [B, T],
    not [1, min T]."""
    pool = FakePool()
    args = bm.parse_args(["--smoke", "--compile", "--jobs", "8", "--out", str(tmp_path)])
    settings = dict(bm.SETTINGS["smoke"], T=(64, 32))
    bm.run(args, bm.select_cases("attention,gla", False), bm.SIZES["smoke"], settings, _with(pool))
    warm = [r for r in pool.requests if r.get("warm")]
    B = settings["tokens"] // 64
    assert [(r["case"], r["B"], r["T"], r["compile"]) for r in warm] == [
        ("attention", B, 64, True), ("gla", B, 64, True)]


def test_a_warm_up_timeout_beside_the_others_does_not_cost_the_rows(tmp_path):
    pool = FakePool(timeouts={"gla"})
    args = bm.parse_args(["--smoke", "--jobs", "2", "--out", str(tmp_path)])
    result = bm.run(args, bm.select_cases("attention,gla", False), bm.SIZES["smoke"],
                    dict(bm.SETTINGS["smoke"]), _with(pool))
    assert result["warmup_s"]["gla"] == "timeout after 240 s"
    assert [r["case"] for r in result["rows"] if r.get("tokens_per_s")] == ["attention", "gla"]


@pytest.mark.gpu
def test_smoke_size_on_the_gpu(tmp_path):
    """The CUDA path: bf16 autocast, our Triton kernels, CUDA-event timing, peak memory and
    the measured matmul rate, at the toy size (head dim 16; not GLA, whose K would be 8)."""
    rc = bm.main(["--smoke", "--device", "cuda", "--inprocess", "--out", str(tmp_path),
                  "--cases", "attention,gated_deltanet,gated_deltanet_3:1_attention,mlstm,mlstm_sig,lightning"])
    assert rc == 0
    result = json.loads(next(tmp_path.glob("bench-models-*-smoke.json")).read_text())
    assert result["ceilings"]["matmul_TFLOPs"] > 50 and result["ceilings"]["copy_TBps"] > 0.5
    for r in result["rows"]:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_gib"] > r["static_mem_gib"] > 0


def test_save_for_backward_applies_to_our_linear_models_only(tmp_path):
    """--save-for-backward recompute builds our linear cases with it (not attention's, not a
    case's own choice when absent), names the files and records it."""
    built = {}
    real = dict(mc.CASES)
    for name in ("attention", "gated_deltanet"):
        case = real[name]

        def spy(size, T, backend, _case=case, **kw):
            model = _case.build(size, T, backend, **kw)
            built[_case.name] = {m.save_for_backward for m in model.modules()
                                 if hasattr(m, "save_for_backward") and isinstance(m, nn.Module)}
            return model
        real[name] = mc.Case(case.name, case.family, case.mixer, spy, case.hybrid)
    row = bm.measure_row(real["gated_deltanet"], bm.SIZES["smoke"], 64, 1, steps=1, warmup=1,
                         device="cpu", save_for_backward="recompute")
    assert "error" not in row and built["gated_deltanet"] == {"recompute"}
    row = bm.measure_row(real["attention"], bm.SIZES["smoke"], 64, 1, steps=1, warmup=1,
                         device="cpu", save_for_backward="recompute")
    assert "error" not in row and "recompute" not in built["attention"]
    row = bm.measure_row(real["gated_deltanet"], bm.SIZES["smoke"], 64, 1, steps=1, warmup=1,
                         device="cpu")
    assert built["gated_deltanet"] == {"states"}
    rc = bm.main(["--smoke", "--inprocess", "--cases", "gated_deltanet", "--steps", "1",
                  "--save-for-backward", "recompute", "--out", str(tmp_path)])
    assert rc == 0
    path = next(tmp_path.glob("*.json"))
    assert path.stem.endswith("-smoke-recompute")
    result = json.loads(path.read_text())
    assert result["config"]["save_for_backward"] == "recompute"
    assert any("--save-for-backward recompute" in n for n in result["notes"])
    with pytest.raises(SystemExit):
        bm.parse_args(["--save-for-backward", "all"])
