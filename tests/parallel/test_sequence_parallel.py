"""Sequence parallelism (linattn.parallel) against the single-process ops, in float64.

The distributed cases run in 2 and 4 gloo processes on loopback, spawned here (see
sp_workers.py for what each rank checks): every gate kind of linear_attention, the plain and
gated delta rule (both transition paths), with and without initial/final states, slices of
unequal lengths that are multiples of nothing (one of length 1), causal attention over
gathered K/V, and prev_tokens spanning several ranks. A hang fails after a timeout.
"""
import pytest
import torch

import helpers
import linattn
import linattn.parallel as sp
import sp_workers


@pytest.mark.parametrize("world, lengths", [(2, [37, 13]), (4, [9, 1, 20, 6])])
def test_sequence_parallel_matches_single_process(world, lengths):
    sp_workers.spawn(sp_workers.check_everything, world, lengths)


def test_single_process_is_the_plain_op():
    """Without torch.distributed initialised, the group is this process alone."""
    gen = helpers.seeded(0)
    q, k = helpers.randn(1, 7, 2, 4, gen=gen), helpers.randn(1, 7, 2, 4, gen=gen)
    v, g = helpers.randn(1, 7, 2, 3, gen=gen), helpers.rand_gate("scalar", 1, 7, 2, 4, gen)
    o, st = sp.linear_attention(q, k, v, g, output_final_state=True, backend="torch")
    o_ref, st_ref = linattn.linear_attention(q, k, v, g, output_final_state=True, backend="reference")
    helpers.assert_allclose_f64(o, o_ref, "o")
    helpers.assert_allclose_f64(st, st_ref, "final_state")
    assert sp.SequenceParallelContext().world_size == 1
    assert sp.local_range(10) == (0, 10)


def test_bad_input_is_a_clear_error():
    q = torch.zeros(1, 5, 2, 4, dtype=torch.float64)
    v = torch.zeros(1, 5, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="g must be"):
        sp.linear_attention(q, q, v, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="initial_state"):
        sp.linear_attention(q, q, v, initial_state=torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="g must be"):  # per-key gates are not a delta-rule gate
        sp.delta_rule(q, q, v, torch.full((1, 5, 2), 0.5, dtype=torch.float64),
                      torch.zeros(1, 5, 2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="group"):
        sp.linear_attention(q, q, v, group="world")
    with pytest.raises(ValueError, match="backend"):
        sp.linear_attention(q, q, v, backend="cuda")
    with pytest.raises(ValueError, match="n must be"):
        sp.prev_tokens(q, -1)
