"""benchmarks/numbers_probe.py on a tiny gated_deltanet + attention model trained on the CPU:
the attention weights it reads reproduce the layer's output, and its three measurements have
the shapes and ranges they claim."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("numbers_probe", ROOT / "benchmarks" / "numbers_probe.py")
probe_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe_mod)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return probe_mod.train_tiny(120)


def test_attention_weights_reproduce_the_attention_layer(tiny):
    model, task = tiny
    block = model.blocks[1]
    assert block.mixer_name == "attention"
    x = torch.randn(3, task.seq_len, 32)
    p = probe_mod.attention_probs(block, x)  # [B, H, T, T]
    assert torch.allclose(p.sum(-1), torch.ones(3, 2, task.seq_len), atol=1e-6)
    assert (p.triu(1) == 0).all()  # causal
    mixer = block.mixer
    v = mixer.heads(mixer.v_proj(x), mixer.head_dim)  # [B, T, H, D]
    o = torch.einsum("bhts,bshd->bthd", p, v).flatten(-2)
    y, _ = mixer(x)
    torch.testing.assert_close(mixer.o_proj(o), y, rtol=1e-4, atol=1e-5)


def test_probe_measurements(tiny):
    model, task = tiny
    res = probe_mod.probe(model, task, batches=1, batch_size=64)
    assert res["layers"] == ["gated_deltanet", "attention"]
    for grid in (res["ablation"]["exact_match_drop"], res["ablation"]["loss_rise"],
                 res["dependence"]["a"], res["dependence"]["b"]):
        assert len(grid) == 2 and all(len(row) == 2 for row in grid)
    assert all(-1 <= d <= 1 for row in res["ablation"]["exact_match_drop"] for d in row)
    assert max(r for row in res["ablation"]["loss_rise"] for r in row) > 0  # zeroing a head matters
    assert all(d > 0 for key in "ab" for row in res["dependence"][key] for d in row)
    assert list(res["attention_mass"]) == ["1"]
    m = res["attention_mass"]["1"]
    for h in range(2):
        assert m["a"][h] + m["b"][h] + m["rest"][h] == pytest.approx(1, abs=1e-5)
        assert 0 <= m["a"][h] <= 1 and 0 <= m["b"][h] <= 1


def test_dependence_is_causal(tiny):
    """Zeroing the last input position changes no answer output before it."""
    model, task = tiny
    b = task.batch("test", 0, 0, 8)
    T = task.seq_len
    for layer in range(2):
        clean = probe_mod.head_outputs(model, b, layer)
        cut = probe_mod.head_outputs(model, b, layer, zero_at=slice(T - 1, T))
        per_pos = (clean - cut).abs().amax(dim=(1, 2)).view(8, -1)  # [B, answer tokens]
        assert (per_pos[:, :-1] == 0).all() and (per_pos[:, -1] > 0).all()


def test_script_writes_json_and_png(tmp_path):
    assert probe_mod.main(["--train-steps", "10", "--out", str(tmp_path / "p"), "--batches", "1",
                           "--batch-size", "16"]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert set(res) == {"task", "layers", "ablation", "dependence", "attention_mass"}
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_probe_needs_an_arithmetic_layout():
    from linattn.tasks import make_task

    with pytest.raises(ValueError, match="arithmetic"):
        probe_mod.operand_slices(make_task("nupa"))
    sa, sb = probe_mod.operand_slices(make_task("arithmetic", digits=5, digits_b=2, tokenization="r2l3"))
    assert (sa, sb) == (slice(1, 3), slice(4, 5))
