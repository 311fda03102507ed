"""LMConfig.save_for_backward: every linear mixer hands it to its op, so "recompute" trains
the same model (bitwise, on the Triton kernels here in the interpreter, the DeltaNet input
projections as separate GEMMs in both modes: helpers.separate_projections) while autograd
keeps less between forward and backward."""
import pytest
import torch

import helpers

from linattn.layers import MIXERS
from linattn.models import CausalLM, LMConfig

# the mixers whose op is a Triton chunk op with a "states" / "recompute" choice
OP_MIXERS = ["gla", "gated_deltanet", "mlstm"]


def _step(mixer, save_for_backward):
    """(loss, gradients by name, bytes autograd saved) of one step of a small model."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, mixer=mixer, mlp_ratio=0,
                   backend="triton", save_for_backward=save_for_backward)
    model = helpers.separate_projections(CausalLM(cfg))
    ids = torch.randint(0, 32, (1, 40), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
    kept = _held_by_nodes(loss.grad_fn)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved) + kept


def _held_by_nodes(root) -> int:
    """Bytes the graph's nodes hold as attributes outside save_for_backward (the delta rule
    keeps its forward's intermediates on its node, which saved-tensor hooks do not see)."""
    seen, stack, total = set(), [root], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in getattr(node, "intermediates", None) or ():
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        stack.extend(fn for fn, _ in node.next_functions)
    return total


@pytest.mark.parametrize("mixer", OP_MIXERS)
def test_recompute_trains_the_same_model_with_less_saved(mixer):
    loss_s, grads_s, saved_s = _step(mixer, "states")
    loss_r, grads_r, saved_r = _step(mixer, "recompute")
    assert torch.equal(loss_s, loss_r)
    for name, g in grads_s.items():
        assert torch.equal(g, grads_r[name]), name
    assert saved_r < saved_s, (saved_r, saved_s)


def test_every_mixer_takes_it_and_the_config_checks_it():
    for name, cls in MIXERS.items():
        assert cls(32, 2, save_for_backward="recompute").save_for_backward == "recompute", name
    with pytest.raises(ValueError, match="save_for_backward"):
        LMConfig(vocab_size=32, save_for_backward="never").validate()
    with pytest.raises(ValueError, match="save_for_backward"):
        MIXERS["gla"](32, 2, save_for_backward="never")
