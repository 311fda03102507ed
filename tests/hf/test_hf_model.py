"""linattn.hf: LinAttnForCausalLM's forward, generate() with the recurrent-state cache, left
padding, save/load and the Auto classes, on tiny models (CPU, chunked PyTorch backend)."""
import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, StoppingCriteria,
                          StoppingCriteriaList, pipeline)

import linattn.hf as H
from linattn.layers import MIXERS

VOCAB = 32


def tiny(seed=0, dtype=torch.float32, **kw):
    """A 2-layer d_model 16 model; kw are LinAttnConfig fields (mixer, hybrid, ...)."""
    kw.setdefault("mixer", "gated_deltanet")
    kw.setdefault("vocab_size", VOCAB)
    cfg = H.LinAttnConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=64,
                          backend="torch", eos_token_id=None, **kw)
    torch.manual_seed(seed)
    model = H.LinAttnForCausalLM(cfg).eval()
    return model if dtype == torch.float32 else model.to(dtype)


ZOOLOGY_BLOCKS = dict(mlp_ratio=0.0, identity_mlp=True, norm="layer", init="gpt2",  # without positions
                      mixer_options={"attention": {"rope": False, "qkv_bias": True, "o_bias": True}})
MODELS = [dict(mixer=m) for m in MIXERS] + [dict(mixer="gated_deltanet", hybrid=1),
                                            dict(mixer="gla", hybrid=1, sliding_window=3),
                                            dict(mixer="deltanet", hybrid=1, **ZOOLOGY_BLOCKS),
                                            # a short conv's cache beside mLSTMexp's (C, n, m)
                                            dict(mixer="mlstm", mixer_options={"mlstm": {"conv_size": 4}})]
IDS = [("hybrid-" if "hybrid" in kw else "") + kw["mixer"] + ("-window" if "sliding_window" in kw else "")
       + ("-zoology" if "identity_mlp" in kw else "")
       + ("-conv" if "conv_size" in kw.get("mixer_options", {}).get(kw["mixer"], {}) else "")
       for kw in MODELS]


def stepwise_argmax(model, ids, n):
    """Greedy continuation by n full forwards of the bare CausalLM (no state): the oracle."""
    seq = ids
    for _ in range(n):
        nxt = model.model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("kw", MODELS, ids=IDS)
def test_generate_equals_stepwise_argmax(kw):
    model = tiny(**kw)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(out, stepwise_argmax(model, ids, 6))


def left_pad(rows, pad=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


@pytest.mark.parametrize("kw", [kw for kw in MODELS if kw["mixer"] != "attention"],
                         ids=[i for i, kw in zip(IDS, MODELS) if kw["mixer"] != "attention"])
def test_left_padded_batch_equals_rows_alone(kw):
    """float64, so a padded row's logits must match the row generated alone to 1e-10 (the
    padding enters no state and no attention softmax). Pure linear models prefill the rows
    packed (cu_seqlens), hybrids one row at a time."""
    model = tiny(dtype=torch.float64, **kw)
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in (3, 7, 5)]
    ids, mask = left_pad(rows)
    opts = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    batch = model.generate(ids, attention_mask=mask, **opts)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **opts)
        assert torch.equal(batch.sequences[i, ids.shape[1]:], alone.sequences[0, len(r):])
        for step_b, step_a in zip(batch.logits, alone.logits):
            assert (step_b[i] - step_a[0]).abs().max() < 1e-10


def test_forward_left_padded_logits_and_labels_loss():
    model = tiny(mixer="gla", hybrid=1)
    ids, mask = left_pad([torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])])
    out = model(ids, attention_mask=mask, use_cache=False)
    assert out.cache is None
    assert torch.equal(out.logits[1, :2], torch.zeros(2, VOCAB))
    assert torch.allclose(out.logits[1, 2:], model.model(torch.tensor([[9, 10]]))[0], atol=0, rtol=0)
    labels = torch.randint(0, VOCAB, (2, 4))
    labels[1, :3] = -100
    lg = model.model(ids)
    want = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    got = model(ids, labels=labels, use_cache=False).loss
    assert torch.equal(got, want)


def test_continuing_with_padding_is_an_error():
    model = tiny()
    out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[4]]), attention_mask=torch.tensor([[1, 1, 1, 0]]), cache=out.cache)


def test_sampling_options_and_stopping():
    model = tiny(mixer="gla", hybrid=1)
    ids = torch.tensor([[3, 4, 5, 6]])
    mask = torch.ones_like(ids)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    # top_k=1 sampling is greedy, whatever the temperature
    torch.manual_seed(0)
    top1 = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=1, temperature=2.0)
    assert torch.equal(top1, greedy)
    # sampling is reproducible under a seed, and top_p / temperature are accepted
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True,
                                   top_p=0.9, temperature=1.5))
    assert torch.equal(runs[0], runs[1])
    # a huge repetition penalty forbids every token already in the sequence
    rep = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, repetition_penalty=1e9)
    assert len(set(rep[0].tolist())) == rep.shape[1]
    # eos stops, and so does a custom stopping criterion
    first = int(greedy[0, 4])
    stopped = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=first,
                             pad_token_id=0)
    assert stopped.shape[1] == 5 and int(stopped[0, 4]) == first

    class AtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 7, dtype=torch.bool)

    short = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           stopping_criteria=StoppingCriteriaList([AtLength()]))
    assert torch.equal(short, greedy[:, :7])


def test_beam_search_scores_its_sequences():
    """Beam search reorders the cache rows; the returned beam's score must be the log-prob a
    plain forward gives its tokens (length_penalty 0: the sum)."""
    model = tiny(dtype=torch.float64, mixer="gated_deltanet", hybrid=1)
    ids = torch.tensor([[3, 4, 5]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=3,
                         do_sample=False, length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    seq = out.sequences
    with torch.no_grad():
        logp = torch.log_softmax(model.model(seq[:, :-1]), -1)[0, 2:]        # predicts seq[3:]
    want = float(logp.gather(-1, seq[0, 3:, None]).sum())
    # transformers keeps beam scores in float32: a few float32 ulps of the sum
    assert abs(float(out.sequences_scores[0]) - want) <= 8 * torch.finfo(torch.float32).eps * abs(want)


@pytest.mark.parametrize("kw", [dict(mixer="lightning", hybrid=1), dict(mixer="mlstm", tie_embeddings=False)],
                         ids=["lightning-hybrid", "mlstm-untied"])
def test_save_load_bitwise_and_auto_classes(tmp_path, kw):
    model = tiny(**kw)
    H.save_model(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "linattn"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, H.LinAttnForCausalLM)
    assert loaded.config.to_lm_config() == model.config.to_lm_config()
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for a, b in zip(model.buffers(), loaded.buffers()):  # Lightning's fixed decays too
        assert torch.equal(a, b)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_learned_positions_are_refused():
    with pytest.raises(ValueError, match="learned positions"):
        tiny(mixer="attention", pos_embed="learned")


def test_config_aliases_and_validation():
    cfg = H.LinAttnConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=3)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == (24, 3, 3)
    assert cfg.hidden_size == 24 and cfg.num_hidden_layers == 3
    with pytest.raises(ValueError, match="mixer"):
        H.LinAttnConfig(mixer="nope")


def test_pipeline_with_byte_tokenizer(tmp_path):
    model = tiny(vocab_size=257, mixer="gated_deltanet")
    H.save_model(model, tmp_path, H.byte_tokenizer())
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "héllo\tworld\n"
    enc = tok(text).input_ids
    assert enc == [0] + [b + 1 for b in text.encode()]
    assert tok.decode(enc, skip_special_tokens=True) == text
    gen = pipeline("text-generation", model=str(tmp_path), tokenizer=tok)
    res = gen("def f(", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    ids = torch.tensor([tok("def f(").input_ids])
    want = tok.decode(stepwise_argmax(model, ids, 5)[0], skip_special_tokens=True)
    assert res == want


@pytest.mark.parametrize("kw", [dict(mixer="mlstm"), MODELS[-2]], ids=["mlstm", "hybrid"])
def test_greedy_generate_equals_transformers_generate(kw):
    from linattn.hf.greedy import greedy_generate

    model = tiny(**kw)
    ids, mask = left_pad([torch.tensor([5, 6, 7, 8, 9]), torch.tensor([9, 10])])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy_generate(model, ids, 6, attention_mask=mask), want)
    with pytest.raises(ValueError, match="CUDA"):
        greedy_generate(model, ids, 6, cuda_graph=True)
