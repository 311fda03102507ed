"""Training sequence-parallel: the layers' switch, CausalLM.set_sequence_parallel, and
`linattn train --sequence-parallel` (see sp_training_workers.py for what each rank runs).

The distributed cases run in 2 gloo processes on loopback, spawned here with the variables
torchrun sets (a hang fails after a timeout):
- float64 causal LMs that hold every mixer that can run sequence-parallel (mLSTMexp cannot)
  give, on 2 ranks, the single-process logits (each rank its slice) and parameter gradients
  (after the all-reduce) to ~1e-10; sequences of odd length, so the slices differ;
- a tiny `linattn train --sequence-parallel` run ends with the weights of the same run on one
  process (1e-6), writes the run directory from rank 0 alone, and once.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import sp_training_workers as workers
from linattn.cli import main
from linattn.layers import MIXERS
from linattn.parallel import SequenceParallelContext
from linattn.train import build_model, load_run

VOCAB = 11
BASE = dict(vocab_size=VOCAB, d_model=16, n_heads=2, mlp_ratio=2.0, backend="torch", max_seq_len=64)
# Every sequence-parallel mixer once; the second model has a sliding window wider than rank
# 0's slice (rank 1 reads all of it through prev_tokens) and Hedgehog's trainable map with
# its denominator column, and GLA, Lightning and linear attention with their short convs
# (rank 1 reads rank 0's last inputs).
HYBRID = dict(BASE, n_layers=5, layers=["gated_deltanet", "gla", "attention", "mlstm_sig", "linear"])
OTHERS = dict(BASE, n_layers=6, layers=["lightning", "hgrn2", "deltanet", "attention", "linear", "gla"],
              sliding_window=16, feature_map="hedgehog",
              mixer_options={name: {"conv_size": 4} for name in ("gla", "lightning", "linear")})
TINY = ["--task", "mqar", "--pairs", "2", "--seq-len", "12", "--vocab", "10", "--d-model", "16",
        "--n-layers", "2", "--pattern", "gated_deltanet,attention", "--n-heads", "2", "--steps", "6",
        "--batch", "4", "--lr", "1e-2", "--log-every", "2", "--ckpt-every", "3", "--eval-batches", "1",
        "--eval-every", "0", "--device", "cpu", "--no-progress"]


def test_every_sequence_parallel_mixer_is_covered():
    covered = set(HYBRID["layers"]) | set(OTHERS["layers"])
    assert covered == set(MIXERS) - {"mlstm", "mom", "linearized"}  # mLSTMexp, MoM, linearized: a ValueError (below)


def test_lm_on_two_ranks_matches_one_process():
    workers.spawn_like_torchrun(workers.check_lm_matches_single_process, 2, [HYBRID, OTHERS], 2, 23)


def test_one_rank_context_is_the_plain_model():
    """Without torch.distributed the context is this process alone: same logits as off."""
    model = workers.build_lm(HYBRID)
    ids = torch.randint(VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = model(ids)
    model.set_sequence_parallel(SequenceParallelContext())
    torch.testing.assert_close(model(ids), plain, rtol=1e-12, atol=1e-12)
    model.set_sequence_parallel(None)
    assert all(b.mixer.sequence_parallel is None for b in model.blocks)
    assert torch.equal(model(ids), plain)


def test_what_cannot_run_sequence_parallel_is_a_clear_error():
    sp = SequenceParallelContext()
    model = workers.build_lm(dict(BASE, n_layers=2, layers=["gla", "mlstm"]))
    with pytest.raises(ValueError, match="mLSTMexp"):
        model.set_sequence_parallel(sp)
    assert all(b.mixer.sequence_parallel is None for b in model.blocks)  # nothing half-set
    model = workers.build_lm(dict(BASE, n_layers=2, layers=["gla", "mom"]))
    with pytest.raises(ValueError, match="mom"):
        model.set_sequence_parallel(sp)
    assert all(b.mixer.sequence_parallel is None for b in model.blocks)
    model = workers.build_lm(dict(BASE, n_layers=2, layers=["gla", "linearized"]))
    with pytest.raises(ValueError, match="linearized attention"):
        model.set_sequence_parallel(sp)
    assert all(b.mixer.sequence_parallel is None for b in model.blocks)
    with pytest.raises(TypeError, match="SequenceParallelContext"):
        model.set_sequence_parallel("world")

    model = workers.build_lm(HYBRID)
    model.set_sequence_parallel(sp)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="set_sequence_parallel"):
        model.forward_with_state(ids)
    with pytest.raises(ValueError, match="cu_seqlens=None"):
        model(ids, cu_seqlens=torch.tensor([0, 2, 4]))
    x = torch.zeros(1, 4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="return_state=False"):
        model.blocks[0].mixer(x, return_state=True)


def test_train_on_two_ranks_matches_one_process(tmp_path):
    """float32: the ranks sum in another order, and AdamW turns a rounding difference of a
    gradient into one of about lr times its relative size per step (lr 2e-3: ~3e-7 here)."""
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    argv = ["train", *TINY, "--lr", "2e-3"]
    assert main([*argv, "--out", str(single)]) == 0
    # --overwrite: a rerun after a process lost to a signal starts clean (sp_workers)
    workers.spawn_like_torchrun(workers.train_with_cli, 2,
                                [*argv, "--sequence-parallel", "--out", str(parallel),
                                 "--overwrite"])
    a, b = load_file(str(single / "model.safetensors")), load_file(str(parallel / "model.safetensors"))
    model_cfg, _, cfg = load_run(single)
    init = build_model(model_cfg, torch.device("cpu"), cfg.seed).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # 1000x the tolerance

    curve = [json.loads(line) for line in (parallel / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if r["split"] == "train"] == [2, 4, 6]  # written once
    assert [r["split"] for r in curve].count("test") == 1
    ref = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    for r, s in zip(curve, ref):
        assert r["step"] == s["step"] and r["loss"] == pytest.approx(s["loss"], rel=1e-5)
    metrics = json.loads((parallel / "metrics.json").read_text())
    assert metrics["sequence_parallel"] == 2 and metrics["steps"] == 6
    config = json.loads((parallel / "config.json").read_text())
    assert config == json.loads((single / "config.json").read_text())
    for name in ("checkpoint.pt", "curves.png"):
        assert (parallel / name).is_file(), name


def test_sequence_parallel_outside_torchrun_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", *TINY, "--sequence-parallel", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "torchrun" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--sequence-parallel" in capsys.readouterr().out
