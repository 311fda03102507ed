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
    assert tr.eval_batches == 12 and tr.stop_at_accuracy == 0.99 and tr.weight_decay == 0.1
    assert (tr.warmup_steps, tr.min_lr_ratio, tr.grad_clip) == (0, 0.0, 0.0)
    _, _, short = build_run({"preset": "zoology", "seq_len": 64, "pairs": 4, "steps": 50,
                             "batch_size": 100, "epochs": 2.0, "n_heads": 2, "mixer": "mom"})
    assert short.steps == 50 and short.eval_every == 1000 and short.eval_batches == 30
    assert short.lr_period == 1000  # one learning rate per epoch of the batch asked for
    _, _, by_epochs = build_run({"preset": "zoology", "seq_len": 64, "pairs": 4, "epochs": 0.5})
    assert by_epochs.batch_size == 512 and by_epochs.steps == round(0.5 * (100_000 // 512))
    _, _, flags = build_run({"preset": "zoology", "seq_len": 64, "pairs": 4, "beta2": 0.95,
                             "decay_all": False, "lr_period": 1, "dtype": "bfloat16"})
    assert (flags.beta2, flags.decay_all, flags.lr_period, flags.dtype) == (0.95, False, 1, "bfloat16")
    with pytest.raises(ValueError, match="epochs"):
        build_run({"task": "mqar", "epochs": 2.0})  # no fixed training set
    with pytest.raises(ValueError, match="lr-period epoch"):
        build_run({"task": "mqar", "lr_period": "epoch"})
    with pytest.raises(ValueError, match="preset"):
        build_run({"preset": "nope"})
    with pytest.raises(ValueError, match="fixed test set"):
        build_run({"preset": "zoology", "seq_len": 64, "pairs": 4, "eval_batches": 7})


# Zoology's figure-2 recipe (iclr24_zoology_figure2/configs.py, config.py, model.py, train.py):
# batch by T, a model of LayerNorm blocks with an identity state mixer, GPT-2 init, tied
# embeddings, embedding dropout 0.1, learned positions for attention only, MHA with biases and
# attention dropout 0.1; AdamW(lr, weight_decay=0.1) with torch's betas on every parameter,
# CosineAnnealingLR(T_max=epochs) stepped per epoch, float32, no clipping.
ZOOLOGY_BATCH = {64: 512, 128: 512, 256: 256, 512: 128, 1024: 64}


@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet", "gla"])
def test_zoology_preset_is_zoologys_recipe(mixer):
    for T, batch in ZOOLOGY_BATCH.items():
        _, _, tr = build_run({"preset": "zoology", "mixer": mixer, "seq_len": T, "pairs": 4})
        assert tr.batch_size == batch
        assert tr.lr_period == 100_000 // batch == tr.eval_every and tr.steps == 64 * tr.lr_period
    model, task, tr = build_run({"preset": "zoology", "mixer": mixer, "seq_len": 256, "pairs": 16})
    assert (model.norm, model.norm_eps, model.identity_mlp, model.tie_embeddings) == ("layer", 1e-5, True, True)
    assert (model.init, model.init_std, model.embed_dropout) == ("gpt2", 0.02, 0.1)
    assert model.pos_embed == ("learned" if mixer == "attention" else "none")
    attention = {"qkv_bias": True, "o_bias": True, "rope": False, "dropout": 0.1}
    # GLA gets a short conv where Zoology's GLA models put a BaseConv layer (the key-to-value shift)
    expected = {"attention": {"attention": attention}, "gla": {"gla": {"conv_size": 4}}}.get(mixer, {})
    assert model.mixer_options == expected
    assert (tr.beta2, tr.decay_all, tr.weight_decay, tr.dtype) == (0.999, True, 0.1, "float32")
    assert (tr.warmup_steps, tr.min_lr_ratio, tr.grad_clip) == (0, 0.0, 0.0)
    hybrid, _, _ = build_run({"preset": "zoology", "mixer": "gated_deltanet", "hybrid": 1, "seq_len": 64,
                              "pairs": 4})
    assert hybrid.pos_embed == "none" and hybrid.mixer_options == {"attention": attention}


@pytest.mark.parametrize("mixer", ["linear", "lightning", "mlstm", "mlstm_sig"])
def test_zoology_preset_gives_the_mixers_without_a_conv_one(mixer):
    """Linear attention, Lightning and mLSTM get GLA's short conv on q, k, v (kernel 4), where
    Zoology's attention-free models have a conv before the mixer; settings given win."""
    cfg, _, _ = build_run({"preset": "zoology", "mixer": mixer, "seq_len": 64, "pairs": 4,
                           "d_model": 32, "backend": "torch"})
    assert cfg.mixer_options == {mixer: {"conv_size": 4}}
    assert all(b.mixer.conv.kernel_size == 4 for b in CausalLM(cfg).blocks)
    hybrid, _, _ = build_run({"preset": "zoology", "mixer": mixer, "hybrid": 1, "seq_len": 64, "pairs": 4})
    assert hybrid.mixer_options[mixer] == {"conv_size": 4} and "attention" in hybrid.mixer_options
    off, _, _ = build_run({"preset": "zoology", "mixer": mixer, "seq_len": 64, "pairs": 4,
                           "mixer_options": {mixer: {"conv_size": 0}}})
    assert off.mixer_options == {mixer: {"conv_size": 0}}


def test_zoology_preset_builds_zoologys_model():
    """The attention model has Zoology's parameters (LanguageModel with MHA, Identity state
    mixer): token and position embeddings (tied head), per block two LayerNorms and MHA's
    Wqkv and out_proj with biases, a final LayerNorm -- and no others."""
    cfg, _, _ = build_run({"preset": "zoology", "mixer": "attention", "seq_len": 64, "pairs": 4,
                           "d_model": 32, "backend": "torch"})
    model = CausalLM(cfg)
    d, V, T = 32, 8192, 64
    zoology = V * d + T * d + 2 * (2 * 2 * d + 3 * (d * d + d) + d * d + d) + 2 * d
    assert model.num_parameters() == zoology
    assert all(isinstance(b.mixer_norm, torch.nn.LayerNorm) for b in model.blocks)
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.lm_head is None
    assert model.embed_dropout.p == 0.1 and model.blocks[0].mixer.dropout == 0.1


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
