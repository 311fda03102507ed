"""The pieces of the Zoology MQAR protocol outside the task: blocks without MLP, the
`zoology` preset and epochs in `linattn train`, early stopping, and auxiliary losses
(Mixture-of-Memories' load balancing) in the training loss."""
import pytest
import torch

from linattn.cli import build_run
from linattn.models import CausalLM, LMConfig
from linattn.tasks import make_task
from linattn.train import TrainConfig, _make_optimizer, _train_step, model_aux_loss, train


def test_mlp_ratio_zero_builds_blocks_without_mlp():
    cfg = LMConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=2, mlp_ratio=0.0, backend="torch")
    model = CausalLM(cfg)
    assert all(b.mlp is None and b.mlp_norm is None for b in model.blocks)
    assert not any("mlp" in name for name, _ in model.named_parameters())
    ids = torch.randint(20, (2, 7))
    logits, state = model.forward_with_state(ids)
    assert torch.allclose(logits, model(ids), atol=1e-6)
    with_mlp = CausalLM(LMConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=2, backend="torch"))
    assert with_mlp.num_parameters() > model.num_parameters()
    for bad in (-1.0, True):
        with pytest.raises(ValueError, match="mlp_ratio"):
            LMConfig(vocab_size=20, mlp_ratio=bad).validate()


def test_zoology_preset_sets_the_protocol_and_flags_win():
    model, task, tr = build_run({"preset": "zoology", "mixer": "attention", "seq_len": 256,
                                 "pairs": 16, "d_model": 64, "lr": 1e-3})
    assert (model.n_layers, model.mlp_ratio, model.n_heads, model.vocab_size) == (2, 0.0, 1, 8192)
    assert (task.layout, task.vocab, task.power_a) == ("zoology", 8192, 0.01)
    assert (task.train_examples, task.test_examples) == (100_000, 3_000)
    assert tr.batch_size == 256 and tr.eval_every == 390 and tr.steps == 64 * 390
    assert tr.eval_batches == 12 and tr.stop_at_accuracy == 0.99 and tr.weight_decay == 0.01
    assert (tr.warmup_steps, tr.min_lr_ratio, tr.grad_clip) == (0, 0.0, 0.0)
    _, _, short = build_run({"preset": "zoology", "seq_len": 64, "pairs": 4, "steps": 50,
                             "batch_size": 100, "epochs": 2.0, "n_heads": 2, "mixer": "mom"})
    assert short.steps == 50 and short.eval_every == 1000 and short.eval_batches == 30
    _, _, by_epochs = build_run({"preset": "zoology", "seq_len": 64, "pairs": 4, "epochs": 0.5})
    assert by_epochs.batch_size == 512 and by_epochs.steps == round(0.5 * (100_000 // 512))
    with pytest.raises(ValueError, match="epochs"):
        build_run({"task": "mqar", "epochs": 2.0})  # no fixed training set
    with pytest.raises(ValueError, match="preset"):
        build_run({"preset": "nope"})
    with pytest.raises(ValueError, match="fixed test set"):
        build_run({"preset": "zoology", "seq_len": 64, "pairs": 4, "eval_batches": 7})


def test_aux_loss_joins_the_training_loss():
    """The gradient a step backpropagates is that of answer loss + coef * sum of aux_loss."""
    cfg = LMConfig(vocab_size=12, d_model=16, n_heads=2, n_layers=2, mixer="mom", backend="torch")
    task = make_task("mqar", pairs=2, seq_len=12, vocab=12)
    batch = task.batch("train", 0, 0, 4)
    grads = {}
    for coef in (0.0, 0.5):
        torch.manual_seed(0)
        model = CausalLM(cfg)
        opt = _make_optimizer(model, TrainConfig(lr=1e-3))
        _train_step(model, opt, batch, 0.0, 0.0, torch.device("cpu"), torch.float32, aux_loss_coef=coef)
        grads[coef] = model.blocks[0].mixer.router.weight.grad.clone()
        aux = model_aux_loss(model)
    assert aux is not None and aux.requires_grad
    torch.manual_seed(0)
    model = CausalLM(cfg)
    model(batch.input_ids)
    (g_aux,) = torch.autograd.grad(model_aux_loss(model), [model.blocks[0].mixer.router.weight])
    torch.testing.assert_close(grads[0.5] - grads[0.0], 0.5 * g_aux, rtol=1e-4, atol=1e-7)
    assert g_aux.abs().max() > 0


def test_training_stops_once_test_accuracy_is_reached():
    task = make_task("mqar", pairs=1, seq_len=4, vocab=5)
    model_cfg = LMConfig(vocab_size=5, d_model=16, n_heads=2, n_layers=1, mixer="attention", backend="torch")
    cfg = TrainConfig(steps=200, batch_size=16, lr=1e-2, eval_every=5, eval_batches=2,
                      stop_at_accuracy=0.9, device="cpu")
    metrics = train(model_cfg, task, cfg, progress=False)
    assert metrics["stopped_by"] == "accuracy" and metrics["steps"] < 200
    assert metrics["steps"] % 5 == 0 and metrics["accuracy"] >= 0.9
