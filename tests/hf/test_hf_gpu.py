"""On the GPU: generation through the decode step kernels equals the chunked path, and the
CUDA-graph greedy decoder equals transformers' generate()."""
from unittest import mock

import pytest
import torch

import linattn.hf as H
import linattn.ops.decode as decode
from linattn.hf.greedy import greedy_generate
from linattn.layers import MIXERS

pytestmark = pytest.mark.gpu

MODELS = [dict(mixer=m) for m in MIXERS if m != "attention"] + [dict(mixer="gated_deltanet", hybrid=1)]
IDS = [("hybrid-" if "hybrid" in kw else "") + kw["mixer"] for kw in MODELS]


def build(backend, dtype=torch.float32, **kw):
    cfg = H.LinAttnConfig(vocab_size=128, d_model=128, n_layers=2, n_heads=2, max_seq_len=512,
                          backend=backend, init_std=0.5, eos_token_id=None, **kw)
    torch.manual_seed(0)
    return H.LinAttnForCausalLM(cfg).to("cuda", dtype).eval()


def left_padded(lengths, vocab=128):
    g = torch.Generator().manual_seed(1)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("kw", MODELS, ids=IDS)
def test_step_kernels_equal_the_chunked_path(kw):
    chunked = build("torch", **kw)
    fast = build("triton", **kw)
    fast.load_state_dict(chunked.state_dict())
    oracle = build("torch", torch.float64, **kw)
    oracle.load_state_dict(chunked.state_dict())
    ids, mask = left_padded([100, 37, 64, 1])
    opts = dict(max_new_tokens=32, do_sample=False, output_logits=True, return_dict_in_generate=True)
    spies = {name: mock.patch.object(decode, name, wraps=getattr(decode, name))
             for name in ("linear_attention_decode", "delta_rule_decode", "mlstm_decode")}
    with spies["linear_attention_decode"] as la, spies["delta_rule_decode"] as dr, spies["mlstm_decode"] as ml:
        got = fast.generate(ids, attention_mask=mask, **opts)
    step_calls = la.call_count + dr.call_count + ml.call_count
    want = chunked.generate(ids, attention_mask=mask, **opts)
    assert torch.equal(got.sequences, want.sequences)
    # per-step logits against the float64 chunked path, by the tolerance rule: the step
    # kernels' error at most 3x the float32 chunked path's, plus 1e-6 at the logits' scale
    ref = oracle.generate(ids, attention_mask=mask, **opts)
    assert torch.equal(ref.sequences, want.sequences)
    for g_, w_, r_ in zip(got.logits, want.logits, ref.logits):
        r_ = r_.float()
        base = (w_ - r_).abs().max()
        assert (g_ - r_).abs().max() <= 3 * base + 1e-6 * max(1.0, float(r_.abs().max()))
    assert step_calls >= 31  # every new token (a step kernel each)


@pytest.mark.parametrize("mixer", ["gated_deltanet", "mlstm", "gla"])
def test_cuda_graph_greedy_equals_generate(mixer):
    model = build("auto", torch.bfloat16, mixer=mixer)
    ids, mask = left_padded([80, 80, 80, 80])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    assert torch.equal(greedy_generate(model, ids, 40), want)
    assert torch.equal(greedy_generate(model, ids, 40, cuda_graph=True), want)
