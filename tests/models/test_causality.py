"""A CausalLM's logits at a position depend on no later token, for every mixer, on the
PyTorch path (float64: exactly) and on the Triton kernels (float32, in the interpreter on the
CPU: up to the rounding of chunk-level sums, whose order a later token in the same chunk can
change). The kernels' masks are what causality rests on, and the interpreter runs the same
kernels the GPU compiles."""
import pytest
import torch

from linattn.layers import MIXERS
from linattn.models import CausalLM, LMConfig

V, T, CHANGED = 64, 80, 50   # vocabulary, length, the position whose token is changed


def _logits_change(mixer: str, backend: str, dtype):
    """max |logits(ids) - logits(ids')| [T], ids' changing the token at position CHANGED."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=2, mixer=mixer, max_seq_len=T,
                   backend=backend)
    m = CausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, V, (2, T))                            # [B, T]
    other = ids.clone()
    other[:, CHANGED] = (other[:, CHANGED] + 7) % V
    with torch.no_grad():
        a, b = m(ids), m(other)
    a, b = (getattr(r, "logits", r[0] if isinstance(r, tuple) else r) for r in (a, b))
    return (a.float() - b.float()).abs().amax(-1).amax(0)      # [T]


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_no_later_token_reaches_an_earlier_logit_in_float64(mixer):
    d = _logits_change(mixer, "torch", torch.float64)
    assert d[:CHANGED].max().item() == 0.0
    assert d[CHANGED].item() > 1e-3                           # the change itself is seen


@pytest.mark.parametrize("mixer", [m for m in MIXERS if m != "attention"])
def test_triton_kernels_keep_causality_up_to_rounding(mixer):
    d = _logits_change(mixer, "triton", torch.float32)
    assert d[:CHANGED].max().item() <= 1e-6, d[:CHANGED].max().item()
    assert d[CHANGED].item() > 1e-3
