"""Batch.answer_index: the answer positions as flat indices, made on the host with the batch.

The trainer gathers the answer rows at answer_index (N = answer_count known on the host), so
the index must list exactly the mask's True positions in mask.nonzero()'s order.
"""
import pytest
import torch

from linattn.tasks import Batch, make_task
from linattn.tasks.batch import answer_positions


def nonzero_flat(mask: torch.Tensor) -> torch.Tensor:
    """The reference: mask.nonzero()'s (b, t) rows as b * T + t."""
    rows = mask.nonzero()
    return rows[:, 0] * mask.shape[1] + rows[:, 1]


def batch_of(mask: torch.Tensor) -> Batch:
    ids = torch.zeros(mask.shape, dtype=torch.int64)
    return Batch(ids, ids.clone(), mask)


@pytest.mark.parametrize("B,T,p", [(1, 1, 0.5), (3, 7, 0.3), (8, 33, 0.1), (5, 16, 0.9), (4, 12, 1.0)])
def test_answer_index_follows_the_masks_nonzero_order(B, T, p):
    gen = torch.Generator().manual_seed(B * 100 + T)
    mask = torch.rand(B, T, generator=gen) < p
    mask[B // 2] = False  # an all-False row
    b = batch_of(mask)
    assert b.answer_index.dtype == torch.int64 and b.answer_index.shape == (int(mask.sum()),)
    assert torch.equal(b.answer_index, nonzero_flat(mask))
    assert b.answer_count == int(mask.sum()) and isinstance(b.answer_count, int)
    moved = b.to("cpu")
    assert torch.equal(moved.answer_index, b.answer_index) and moved.answer_count == b.answer_count


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (4, 6)])
def test_answer_index_of_an_empty_batch_or_a_batch_without_answers_is_empty(shape):
    b = batch_of(torch.zeros(shape, dtype=torch.bool))
    assert b.answer_index.shape == (0,) and b.answer_index.dtype == torch.int64
    assert b.answer_count == 0
    assert b.to("cpu").answer_count == 0


def test_a_given_answer_index_is_kept_and_a_mask_must_be_two_dimensional():
    mask = torch.tensor([[True, False], [False, True]])
    given = torch.tensor([0, 3])
    b = Batch(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64), mask, given)
    assert b.answer_index is given
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        answer_positions(torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("name,knobs", [
    ("mqar", dict(pairs=5, seq_len=23, vocab=11, queries=3)),
    ("mqar", dict(layout="zoology", pairs=6, seq_len=40, vocab=64)),
    ("mqar", dict(layout="zoology", pairs=3, seq_len=20, vocab=40, train_examples=40, test_examples=10)),
    ("arithmetic", dict(digits=3, op="add", order="reversed")),
    ("compare", dict(int_digits=2, frac_digits=3)),
    ("copy", dict(copy_len=6, seq_len=40, vocab=16)),
])
def test_every_task_builds_batches_whose_index_matches_their_mask(name, knobs):
    task = make_task(name, **knobs)
    for split in ("train", "test"):
        b = task.batch(split, 1, 1, 5)
        assert torch.equal(b.answer_index, nonzero_flat(b.answer_mask))
