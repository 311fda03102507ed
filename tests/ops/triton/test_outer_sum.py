"""linattn.ops.triton.outer_sum (the time-split weighted sums of sequence parallelism)
against the float64 PyTorch sums, with the tolerance rule, on the interpreter in float32."""
import pytest
import torch

import helpers
from linattn.ops.triton.outer_sum import weighted_outer_sum as kernel_sum
from linattn.parallel import lasp


def _fast(split, reverse):
    def fn(k, v, g=None):
        return kernel_sum(k, v, g, reverse=reverse, split=split)
    return fn


def _oracle(reverse):
    def fn(k, v, g=None):
        B, T, H, _ = k.shape
        out, total = lasp.weighted_outer_sum(k, v, lasp._log_decay_steps(g, B, T, H),
                                             reverse=reverse, dtype=torch.float64)
        return out, total
    return fn


@pytest.mark.parametrize("gate", ["none", "const", "scalar", "key"])
@pytest.mark.parametrize("reverse", [True, False])
def test_outer_sum_matches_torch_sums(gate, reverse):
    B, T, H, K, V = 2, 53, 2, 20, 36  # ragged K and V blocks, T not a multiple of the tile
    gen = helpers.seeded(5)
    x = dict(k=helpers.randn(B, T, H, K, gen=gen, noncontig=True), v=helpers.randn(B, T, H, V, gen=gen))
    g = helpers.rand_gate(gate, B, T, H, K, gen, low=-0.8, high=-0.01)
    if g is not None:
        x["g"] = g
    helpers.check_against_oracle(_fast(16, reverse), _oracle(reverse), x, dtype=torch.float32)


def test_outer_sum_bad_input_is_a_clear_error():
    k = torch.zeros(1, 5, 2, 16)
    with pytest.raises(ValueError, match="b must be"):
        kernel_sum(k, torch.zeros(1, 4, 2, 16))
    with pytest.raises(ValueError, match="g must be"):
        kernel_sum(k, k, torch.zeros(1, 4, 2))
