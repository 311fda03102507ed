"""linattn.ops.linear_ce: chunked linear + cross-entropy against F.cross_entropy over the full
float64 logits, with the tolerance rule of docs/design.md section 5; CausalLM.loss against its
logits."""
import pytest
import torch
import torch.nn.functional as F

import helpers
from linattn.models import CausalLM, LMConfig
from linattn.ops.linear_ce import default_chunk_tokens, linear_cross_entropy


def ce_oracle(h, weight, targets, mask=None, reduction="mean", ignore_index=-100):
    """Full logits, then F.cross_entropy in float32 (float64 for float64 inputs)."""
    t = targets if mask is None else targets.masked_fill(~mask, ignore_index)
    logits = F.linear(h, weight.to(h.dtype))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), t.flatten(), reduction=reduction,
                           ignore_index=ignore_index)


def _inputs(N_shape=(3, 41), d=24, V=77, seed=0, device="cpu"):
    gen = helpers.seeded(seed)
    h = helpers.randn(*N_shape, d, gen=gen, device=device)
    w = helpers.randn(V, d, gen=gen, scale=0.5, device=device)
    targets = torch.randint(0, V, N_shape, generator=gen).to(device)
    targets[0, :3] = -100
    mask = (torch.rand(N_shape, generator=gen) > 0.3).to(device)
    return h, w, targets, mask


CE_CASES = [(red, use_mask, "torch", dt) for red in ("mean", "sum") for use_mask in (False, True)
            for dt in (torch.float64, torch.float32)] + \
           [("mean", True, "triton", torch.float32), ("sum", False, "triton", torch.float32)]


@pytest.mark.parametrize("reduction,use_mask,backend,dtype", CE_CASES)
def test_linear_ce_matches_full_logits(reduction, use_mask, backend, dtype):
    """Chunks of 10 tokens (not dividing 123); ignore_index and a mask both drop tokens; a
    vocabulary of 77 (the Triton rows' loop over a ragged block)."""
    h, w, targets, mask = _inputs()
    m = mask if use_mask else None

    def fast(q, weight):
        loss = linear_cross_entropy(q, weight, targets, m, reduction=reduction, chunk_tokens=10,
                                    backend=backend)
        return loss * 1.5, None  # a loss cotangent other than 1

    def oracle(q, weight):
        return ce_oracle(q, weight, targets, m, reduction) * 1.5, None

    helpers.check_against_oracle(fast, oracle, dict(q=h, weight=w), dtype=dtype,
                                 grad_names=["q", "weight"], activations=("q", "weight"))


def test_linear_ce_triton_rows_over_several_blocks():
    """A vocabulary of 4200: the Triton rows loop over three 2048-wide blocks, the last ragged."""
    h, w, targets, mask = _inputs((1, 20), 8, 4200, seed=1)

    def fast(q, weight):
        return linear_cross_entropy(q, weight, targets, mask, chunk_tokens=8, backend="triton"), None

    helpers.check_against_oracle(fast, lambda q, weight: (ce_oracle(q, weight, targets, mask), None),
                                 dict(q=h, weight=w), dtype=torch.float32,
                                 grad_names=["q", "weight"], activations=("q", "weight"))


def test_linear_ce_all_ignored_and_no_grad():
    h, w, targets, _ = _inputs()
    none = torch.full_like(targets, -100)
    assert torch.isnan(linear_cross_entropy(h, w, none))  # as F.cross_entropy's mean
    assert linear_cross_entropy(h, w, none, reduction="sum") == 0
    assert linear_cross_entropy(h.float(), w.float(), none, reduction="sum", backend="triton") == 0
    with torch.no_grad():
        loss = linear_cross_entropy(h.requires_grad_(), w, targets)
    helpers.assert_allclose_f64(loss, ce_oracle(h.detach(), w, targets), "no-grad loss")
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, targets[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, targets, reduction="none")
    assert default_chunk_tokens(32000) % 64 == 0 and default_chunk_tokens(10 ** 9) == 64


def test_linear_ce_traces_without_graph_breaks():
    h, w, targets, mask = _inputs(device="cpu")
    h, w = h.float().requires_grad_(), w.float().requires_grad_()

    def f(h, w):
        return linear_cross_entropy(h, w, targets, mask, chunk_tokens=32)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    want, got = f(h, w), compiled(h, w)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(want, [h, w])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tie", [True, False])
def test_causal_lm_loss_equals_loss_of_logits(tie):
    cfg = LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, mixer="gated_deltanet",
                   tie_embeddings=tie, max_seq_len=64)
    model = CausalLM(cfg).double()
    gen = helpers.seeded(5)
    ids = torch.randint(0, 50, (2, 13), generator=gen)
    targets = torch.randint(0, 50, (2, 13), generator=gen)
    mask = torch.rand(2, 13, generator=gen) > 0.5
    loss = model.loss(ids, targets, mask)
    want = F.cross_entropy(model(ids)[mask], targets[mask])
    helpers.assert_allclose_f64(loss, want, "loss")
    params = [p for p in model.parameters()]
    for a, b, p in zip(torch.autograd.grad(loss, params), torch.autograd.grad(want, params),
                       model.named_parameters()):
        helpers.assert_allclose_f64(a, b, f"d{p[0]}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_ce_gpu(dtype):
    """The 12-layer d_model 768 model's head: 16384 tokens, vocab 32000, mean over a mask."""
    h, w, targets, mask = _inputs((8, 2048), 768, 32000, device="cuda")
    helpers.check_against_oracle(
        lambda q, weight: (linear_cross_entropy(q, weight, targets, mask), None),
        lambda q, weight: (ce_oracle(q, weight, targets, mask), None), dict(q=h, weight=w),
        dtype=dtype, grad_names=["q", "weight"], activations=("q", "weight"), device="cuda")


@pytest.mark.gpu
def test_linear_ce_peak_memory_gpu():
    """bf16, 16384 tokens x 32000: the chunked loss + backward stays under half the full
    float32 logits' size above the inputs."""
    h, w, targets, _ = _inputs((8, 2048), 768, 32000, device="cuda")
    h = h.to(torch.bfloat16).requires_grad_()
    w = w.to(torch.bfloat16).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(h, w, targets).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full_logits = 16384 * 32000 * 4
    assert extra < full_logits / 2, f"peak extra {extra / 2**20:.0f} MiB"


def test_linear_ce_under_autocast_takes_autocast_dtype():
    """Under torch.autocast the logits are computed in autocast's dtype, as F.linear's are:
    the loss equals the loss of the inputs cast to bfloat16 (bitwise)."""
    h, w, targets, _ = _inputs()
    h, w = h.float(), w.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, chunk_tokens=16)
    want = linear_cross_entropy(h.bfloat16(), w.bfloat16(), targets, chunk_tokens=16)
    assert loss.dtype == torch.float32 and torch.equal(loss, want)
    assert not torch.equal(loss, linear_cross_entropy(h, w, targets, chunk_tokens=16))
