"""MQAR's zoology layout and fixed example sets, checked against Zoology's definition.

Zoology (HazyResearch/zoology, data/associative_recall.py `multiquery_ar`): keys and values
distinct within an example, keys in [1, V/2), values in [V/2, V); every key queried once in
the region after the pairs, at the first token of a two-token slot; slot i (0-based) drawn
without replacement with probability proportional to (i + 1) ** (a - 1); the value is the
target at the query key's own position; everything else in the query region is 0.
"""
import numpy as np
import pytest
import torch

from linattn.tasks import make_task

ZOO = dict(layout="zoology", pairs=6, seq_len=40, vocab=64)


def test_layout_is_zoologys():
    task = make_task("mqar", **ZOO)
    b = task.batch("train", 0, 3, 200)
    P, T, V = 6, 40, 64
    ids, tgt, mask = b.input_ids, b.targets, b.answer_mask
    assert ids.shape == tgt.shape == mask.shape == (200, T)
    keys, values = ids[:, 0:2 * P:2], ids[:, 1:2 * P:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for row in range(200):
        k, v = keys[row].tolist(), values[row].tolist()
        assert len(set(k)) == P and len(set(v)) == P
        pos = mask[row].nonzero().flatten().tolist()
        assert len(pos) == P and all(p >= 2 * P and (p - 2 * P) % 2 == 0 for p in pos)
        asked = [ids[row, p].item() for p in pos]
        assert sorted(asked) == sorted(k)  # every key queried exactly once
        for p in pos:
            assert tgt[row, p].item() == v[k.index(ids[row, p].item())]  # its value, same position
        rest = [t for t in range(2 * P, T) if t not in pos]
        assert (ids[row, rest] == 0).all()  # the next token after a query stays 0


def test_inputs_and_labels_are_zoologys_construction():
    """Zoology's multiquery_ar (num_passes 1, random_non_queries False) builds an example from
    its keys, values and query slots ("gaps") as below; from ours the same code gives our
    input_ids, and its labels are -100 except at our answer positions, where they are our
    targets (the value is predicted at its key's query position)."""
    n, P, T = 64, 6, 40
    b = make_task("mqar", **ZOO).batch("train", 0, 0, n)
    ids = b.input_ids.numpy()
    keys, values = ids[:, 0:2 * P:2], ids[:, 1:2 * P:2]
    gaps = np.array([[np.flatnonzero(ids[r, 2 * P:] == keys[r, j])[0] // 2 for j in range(P)]
                     for r in range(n)])
    # zoology/data/multiquery_ar.py, from "create sequences" on
    context_size = 2 * P
    kvs = np.zeros((n, context_size), dtype=np.int64)
    kvs[:, 0::2] = keys
    kvs[:, 1::2] = values
    queries = np.zeros((n, T - context_size + 1), dtype=np.int64)
    np.put_along_axis(queries, gaps * 2, values=keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)
    labels = np.full((n, T + 1), -100, dtype=np.int64)
    np.put_along_axis(labels, gaps * 2 + context_size + 1, values=values, axis=1)
    inputs, labels = examples[:, :-1], labels[:, 1:]
    assert (inputs == ids).all()
    assert (labels == np.where(b.answer_mask.numpy(), b.targets.numpy(), -100)).all()


def test_query_slots_follow_the_power_law():
    """The slot of pair 0 (the first draw) has Zoology's distribution p_i ~ (i+1)^(a-1), and
    the slots drawn together are distinct. 20,000 draws: each slot's frequency within 5 sigma."""
    task = make_task("mqar", layout="zoology", pairs=3, seq_len=46, vocab=64, power_a=0.3)
    p = task.slot_probabilities()
    assert p.size == 20 and np.isclose(p.sum(), 1) and (np.diff(p) < 0).all()
    n = 20_000
    b = task.batch("train", 1, 0, n)
    first_key = b.input_ids[:, 0]
    slot = ((b.input_ids[:, 6:] == first_key[:, None]).float().argmax(1) // 2).numpy()
    freq = np.bincount(slot, minlength=20) / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert (np.abs(freq - p) < 5 * sigma + 1e-12).all(), (freq, p)
    uniform = make_task("mqar", layout="zoology", pairs=3, seq_len=46, vocab=64, power_a=1.0)
    assert np.allclose(uniform.slot_probabilities(), 1 / 20)


def test_default_power_law_crowds_queries_near_the_pairs():
    task = make_task("mqar", layout="zoology", pairs=16, seq_len=256, vocab=8192)
    b = task.batch("test", 0, 0, 256)
    offset = (b.answer_mask.nonzero()[:, 1] - 32).float()
    assert offset.median() < 0.25 * (256 - 32)  # a = 0.01: most queries in the first quarter


def test_fixed_sets_are_deterministic_epochs_and_disjoint():
    task = make_task("mqar", **ZOO, train_examples=2500, test_examples=300)
    bs = 100
    assert task.steps_per_epoch(bs) == 25
    again = make_task("mqar", **ZOO, train_examples=2500, test_examples=300)
    for split, index in (("train", 0), ("train", 31), ("test", 2)):
        a, b = task.batch(split, 4, index, bs), again.batch(split, 4, index, bs)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    # one epoch visits every example once; the next epoch in another order
    full = task.examples("train", 4, np.arange(2500)).input_ids
    rows = {tuple(r) for r in full.tolist()}
    assert len(rows) == 2500
    epoch0 = torch.cat([task.batch("train", 4, i, bs).input_ids for i in range(25)])
    epoch1 = torch.cat([task.batch("train", 4, 25 + i, bs).input_ids for i in range(25)])
    assert {tuple(r) for r in epoch0.tolist()} == rows == {tuple(r) for r in epoch1.tolist()}
    assert not torch.equal(epoch0, epoch1)
    # the example at an index is the same whatever the batch it is read in (blocks)
    assert torch.equal(task.examples("train", 4, [1500, 7]).input_ids, full[[1500, 7]])
    # the test set: contiguous batches covering 300 examples, none of them a training example
    test = torch.cat([task.batch("test", 4, i, 128).input_ids for i in range(3)])
    assert test.shape[0] == 300
    assert not any(tuple(r) in rows for r in test.tolist())
    with pytest.raises(ValueError, match="past the fixed test set"):
        task.batch("test", 4, 3, 128)
    other_seed = task.examples("train", 5, np.arange(50)).input_ids
    assert not torch.equal(other_seed, full[:50])
    same_size = make_task("mqar", **ZOO, train_examples=300, test_examples=300)
    train = {tuple(r) for r in same_size.examples("train", 0, np.arange(300)).input_ids.tolist()}
    assert not any(tuple(r) in train for r in same_size.examples("test", 0, np.arange(300)).input_ids.tolist())


def test_linattn_layout_is_unchanged_by_the_new_knobs():
    old = make_task("mqar", pairs=8, seq_len=64, vocab=64)
    assert old.layout == "linattn" and old.train_examples == 0
    b = old.batch("train", 0, 0, 4)
    assert (b.input_ids[:, 0] == 0).all()  # BOS-shifted content
    assert old.shortest().seq_len == 32


@pytest.mark.parametrize("knobs, match", [
    (dict(layout="zoology", pairs=8, seq_len=30, vocab=64), "4 \\* pairs"),
    (dict(layout="zoology", pairs=8, seq_len=33, vocab=64), "even"),
    (dict(layout="zoology", pairs=8, seq_len=64, vocab=16), "keys"),
    (dict(layout="zoology", pairs=8, seq_len=64, vocab=64, queries=3), "queries"),
    (dict(layout="zoology", pairs=8, seq_len=64, vocab=64, power_a=0.0), "power_a"),
    (dict(layout="grid", pairs=8, seq_len=64, vocab=64), "layout"),
    (dict(pairs=8, seq_len=64, vocab=64, train_examples=-1), "train_examples"),
])
def test_bad_knobs_raise(knobs, match):
    with pytest.raises(ValueError, match=match):
        make_task("mqar", **knobs)
