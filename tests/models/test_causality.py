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


def _logits_change(mixer: str, backend: str, dtype, options=None):
    """max |logits(ids) - logits(ids')| [T], ids' changing the token at position CHANGED;
    options: the mixer's constructor options."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=2, mixer=mixer, max_seq_len=T,
                   backend=backend, mixer_options={mixer: options} if options else {})
    m = CausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, V, (2, T))                            # [B, T]
    other = ids.clone()
    other[:, CHANGED] = (other[:, CHANGED] + 7) % V
    with torch.no_grad():
        a, b = m(ids), m(other)
    a, b = (getattr(r, "logits", r[0] if isinstance(r, tuple) else r) for r in (a, b))
    return (a.float() - b.float()).abs().amax(-1).amax(0)      # [T]


# the mixers with an optional short conv, with it (the Triton conv's own masks are checked
# below through the delta mixers, which always have one)
CONV = [(name, {"conv_size": 4}) for name in ("gla", "linear", "lightning", "mlstm", "mlstm_sig")]


@pytest.mark.parametrize("mixer, options", [(m, None) for m in MIXERS] + CONV,
                         ids=list(MIXERS) + [f"{m}-conv_size=4" for m, _ in CONV])
def test_no_later_token_reaches_an_earlier_logit_in_float64(mixer, options):
    d = _logits_change(mixer, "torch", torch.float64, options)
    assert d[:CHANGED].max().item() == 0.0
    assert d[CHANGED].item() > 1e-3                           # the change itself is seen


@pytest.mark.parametrize("mixer", [m for m in MIXERS if m != "attention"])
def test_triton_kernels_keep_causality_up_to_rounding(mixer):
    d = _logits_change(mixer, "triton", torch.float32)
    assert d[:CHANGED].max().item() <= 1e-6, d[:CHANGED].max().item()
    assert d[CHANGED].item() > 1e-3
