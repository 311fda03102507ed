"""CausalLM: every mixer and a hybrid train on CPU; state dicts, decoding and packing."""
import copy

import pytest
import torch

import helpers
from linattn.layers import MIXERS
from linattn.models import CausalLM, LMConfig

V = 23


def _cfg(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, backend="torch", mlp_ratio=2.0)
    return LMConfig(**{**base, **kw})


def _ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=helpers.seeded(seed))


CONFIGS = [pytest.param(dict(mixer=n), id=n) for n in MIXERS] + [
    pytest.param(dict(mixer="gated_deltanet", hybrid=1, sliding_window=5), id="hybrid-gdn-swa"),
    pytest.param(dict(n_layers=3, layers=["linear", "attention", "mlstm"], feature_map="hedgehog"),
                 id="explicit-pattern"),
    pytest.param(dict(mixer="gla", tie_embeddings=False), id="untied"),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_forward_backward_every_mixer(kw):
    torch.manual_seed(0)
    model = CausalLM(_cfg(**kw))
    ids = _ids(2, 16)
    logits = model(ids)
    assert logits.shape == (2, 16, V) and logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no finite gradient"
        assert p.grad.abs().max() > 0, f"{name}: zero gradient"
    assert [b.mixer_name for b in model.blocks] == model.config.layer_pattern()


def test_tied_head_and_parameter_count():
    tied, untied = CausalLM(_cfg()), CausalLM(_cfg(tie_embeddings=False))
    assert untied.num_parameters() - tied.num_parameters() == V * 32
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - V * 32
    assert tied.num_parameters() == sum(p.numel() for p in tied.parameters())


def test_learns_to_copy_quickly():
    """A 2-layer GDN LM fits a fixed batch within 20 steps (sane defaults)."""
    torch.manual_seed(0)
    model = CausalLM(_cfg())
    ids = _ids(4, 24, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0], losses


def test_state_dict_and_config_round_trip(tmp_path):
    cfg = _cfg(mixer="lightning", hybrid=1, sliding_window=4)
    model = CausalLM(cfg)
    cfg.save_json(tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(123)  # a different init, overwritten by the load
    back = CausalLM(LMConfig.load_json(tmp_path / "config.json"))
    back.load_state_dict(torch.load(tmp_path / "model.pt"), strict=True)
    ids = _ids(2, 9)
    assert torch.equal(model(ids), back(ids))


@pytest.mark.parametrize("kw", [pytest.param(dict(mixer=n), id=n) for n in ("gated_deltanet", "mlstm", "linear")]
                         + [pytest.param(dict(mixer="gla", hybrid=1, sliding_window=3), id="hybrid-swa")])
def test_decoding_with_state_matches_forward(kw):
    model = CausalLM(_cfg(**kw)).double()
    ids = _ids(2, 12)
    with torch.no_grad():
        full = model(ids)
        l1, st = model.forward_with_state(ids[:, :7])
        steps = [l1]
        for t in range(7, 12):
            lt, st = model.forward_with_state(ids[:, t : t + 1], st)
            steps.append(lt)
    helpers.assert_allclose_f64(torch.cat(steps, 1), full, "decoded logits", rel=1e-9)


def test_generate_greedy_matches_recomputation():
    model = CausalLM(_cfg(mixer="gated_deltanet", hybrid=1)).double()
    prompt = _ids(2, 5)
    out = model.generate(prompt, 6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_packed_forward_matches_separate():
    model = CausalLM(_cfg(mixer="deltanet", hybrid=1)).double()
    lengths = [4, 1, 7]
    cu = helpers.cu_seqlens_from_lengths(lengths)
    ids = _ids(1, sum(lengths))
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu)
        sep = torch.cat([model(ids[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    helpers.assert_allclose_f64(packed, sep, "packed logits", rel=1e-9)


def test_backends_agree_in_float64():
    model = CausalLM(_cfg(mixer="gla", n_layers=2)).double()
    ref = copy.deepcopy(model)
    for b in ref.blocks:
        b.mixer.backend = "reference"
    ids = _ids(2, 10)
    helpers.assert_allclose_f64(model(ids), ref(ids), "logits", rel=1e-9)


def test_bad_inputs_raise():
    model = CausalLM(_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_ids(1, 9))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        CausalLM(LMConfig(vocab_size=5, d_model=30, n_heads=4))


# ------------------------------------------------- Zoology's blocks, positions and init

def _zoology_cfg(**kw):
    return _cfg(**{**dict(mlp_ratio=0.0, identity_mlp=True, norm="layer", norm_eps=1e-5,
                          pos_embed="learned", n_heads=1, mixer="attention",
                          mixer_options={"attention": {"rope": False, "qkv_bias": True, "o_bias": True}}),
                   **kw})


def test_identity_mlp_blocks_add_their_norm_as_zoologys():
    """Zoology's TransformerBlock with an Identity state mixer returns norm2(r) and the next
    block adds it to the residual r: x_next = r + norm2(r), r = x + mixer(norm1(x)); the model
    output is ln_f(r + norm2(r)) of the last block."""
    model = CausalLM(_zoology_cfg()).double().eval()
    for p in model.parameters():  # norms' scales and biases away from their 1 / 0 init
        torch.nn.init.normal_(p, std=0.3)
    ids = _ids(2, 9)
    with torch.no_grad():
        h = model.embed(ids) + model.pos_embed.weight[:9]
        for b in model.blocks:
            r = h + b.mixer(b.mixer_norm(h))[0]
            h = r + torch.nn.functional.layer_norm(r, (32,), b.mlp_norm.weight, b.mlp_norm.bias, 1e-5)
        want = model.norm(h) @ model.embed.weight.T
        helpers.assert_allclose_f64(model(ids), want, "zoology block logits", rel=1e-12)
    assert all(b.mlp is None and isinstance(b.mlp_norm, torch.nn.LayerNorm) for b in model.blocks)


def test_learned_positions_pack_generate_and_refuse_a_state():
    model = CausalLM(_zoology_cfg(mixer_options={"attention": {"rope": False}})).double().eval()
    ids = _ids(1, 12)
    with torch.no_grad():  # without RoPE the positions come from pos_embed alone
        moved = CausalLM(_zoology_cfg(mixer_options={"attention": {"rope": False}})).double().eval()
        moved.load_state_dict(model.state_dict())
        moved.pos_embed.weight.copy_(torch.roll(model.pos_embed.weight, 1, 0))
        assert not torch.allclose(model(ids), moved(ids))
        lengths = [4, 1, 7]
        cu = helpers.cu_seqlens_from_lengths(lengths)
        packed = model(ids, cu_seqlens=cu)
        sep = torch.cat([model(ids[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    helpers.assert_allclose_f64(packed, sep, "packed logits", rel=1e-9)
    logits, state = model.forward_with_state(ids[:, :5])
    with pytest.raises(ValueError, match="learned positions"):
        model.forward_with_state(ids[:, 5:6], state)
    out = model.generate(ids[:, :5], 4)
    with torch.no_grad():
        seq = ids[:, :5]
        for _ in range(4):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_embed_dropout_only_while_training():
    model = CausalLM(_zoology_cfg(embed_dropout=0.5)).double()
    ids = _ids(2, 6)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(ids), model(ids))
        model.train()
        torch.manual_seed(0)
        a = model(ids)
        assert not torch.allclose(a, model(ids))


def test_gpt2_init_is_zoologys():
    """Zoology's _init_weights: Linear and Embedding weights normal(0.02), Linear biases 0,
    `out_proj` (MHA's output projection) normal(0.02 / sqrt(2 n_layers)); the norms 1 and 0.
    A mixer's init_kept parameters (mLSTM's forget-gate bias) keep their constructor init."""
    torch.manual_seed(0)
    model = CausalLM(_zoology_cfg(d_model=256, n_layers=2, init="gpt2", vocab_size=512))
    for name, p in model.named_parameters():
        if name.endswith("o_proj.weight"):
            assert abs(p.std().item() - 0.01) < 5e-4, name
        elif p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 1e-3 and abs(p.mean().item()) < 1e-3, name
        elif name.endswith("proj.bias") or name.endswith("norm.bias"):
            assert torch.all(p == 0), name
        else:
            assert torch.all(p == 1), name
    torch.manual_seed(0)
    mlstm = CausalLM(_cfg(mixer="mlstm", init="gpt2", d_model=32, n_heads=4))
    fresh = MIXERS["mlstm"](32, 4, backend="torch")
    for b in mlstm.blocks:
        torch.testing.assert_close(b.mixer.f_proj.bias, fresh.f_proj.bias)
        assert torch.all(b.mixer.i_proj.bias == 0)
        assert abs(b.mixer.q_proj.weight.std().item() - 0.02) < 4e-3


@pytest.mark.parametrize("bad,match", [(dict(norm="batch"), "norm"), (dict(pos_embed="rope"), "pos_embed"),
                                       (dict(init="xavier"), "init"), (dict(embed_dropout=1.0), "embed_dropout"),
                                       (dict(identity_mlp=True, mlp_ratio=2.0), "identity_mlp"),
                                       (dict(identity_mlp=1), "identity_mlp")])
def test_bad_zoology_fields_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**bad).validate()
