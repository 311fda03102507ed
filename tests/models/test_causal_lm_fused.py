"""CausalLM on the GPU, where its layers take the fused Triton pieces (short conv, L2 norm,
gated output norm, RMSNorm, SwiGLU, chunked cross-entropy) and the Triton ops: model.loss and
every parameter's gradient against the float64 model on the PyTorch paths, with the tolerance
rule of docs/design.md section 5 (base: the float32 model on the PyTorch paths, on the CPU)."""
import copy

import pytest
import torch

import helpers
from linattn.models import CausalLM, LMConfig


def _loss_and_grads(model, ids, targets, mask, cu=None):
    loss = model.loss(ids, targets, mask, cu_seqlens=cu)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), [g.detach() for g in grads]


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mixer", ["gated_deltanet", "lightning"])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_model_matches_float64_gpu(mixer, packed):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=300, d_model=128, n_layers=2, n_heads=2, mixer=mixer,
                   backend="torch", mlp_ratio=2.0, max_seq_len=512)
    ref_model = CausalLM(cfg).double()
    low_model = copy.deepcopy(ref_model).float()                     # float32, PyTorch paths
    fast_model = copy.deepcopy(low_model).cuda()
    for block in fast_model.blocks:
        block.mixer.backend = "auto"                                 # Triton ops on CUDA
    gen = helpers.seeded(1)
    B, T = (1, 300) if packed else (2, 150)
    ids = torch.randint(0, 300, (B, T), generator=gen)
    targets = torch.randint(0, 300, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.4
    cu = helpers.cu_seqlens_from_lengths([100, 1, 0, 199]) if packed else None
    ref = _loss_and_grads(ref_model, ids, targets, mask, cu)
    low = _loss_and_grads(low_model, ids, targets, mask, cu)
    fast = _loss_and_grads(fast_model, ids.cuda(), targets.cuda(), mask.cuda(),
                           cu.cuda() if cu is not None else None)
    helpers._assert_within("loss", fast[0].cpu(), ref[0], (low[0],), helpers.OUT_FACTOR,
                           torch.float32)
    for (name, _), f, r, lo in zip(ref_model.named_parameters(), fast[1], ref[1], low[1]):
        helpers._assert_within(f"d{name}", f.cpu(), r, (lo,), helpers.GRAD_FACTOR, torch.float32)
