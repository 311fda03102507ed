"""Synthetic task generators: seeded, shifted correctly, and their answers right.

Answers are checked independently of the generators: MQAR by looking keys up in the pairs,
arithmetic with Python ints, compare with fractions.Fraction, copy by reading the marks.
"""
from fractions import Fraction

import pytest
import torch

from linattn.tasks import TASKS, batch_seed, make_task, task_from_dict
from linattn.tasks import arithmetic as ar
from linattn.tasks import compare as cmp
from linattn.tasks import copy as cp
from linattn.tasks.batch import BOS

CASES = [
    ("mqar", dict(pairs=8, seq_len=64, vocab=64)),
    ("mqar", dict(pairs=5, seq_len=23, vocab=11, queries=3)),  # odd length, tight vocab
    ("arithmetic", dict(digits=3, op="add", order="reversed")),
    ("arithmetic", dict(digits=4, op="mixed", order="forward")),
    ("compare", dict(int_digits=2, frac_digits=3)),
    ("copy", dict(copy_len=6, seq_len=40, vocab=16)),
]


def content_of(batch):
    """[B, T] the full token stream: input_ids shifted back plus the last target."""
    return torch.cat([batch.input_ids[:, 1:], batch.targets[:, -1:]], dim=1)


@pytest.mark.parametrize("name,knobs", CASES)
def test_batches_are_a_pure_function_of_split_seed_index(name, knobs):
    task = make_task(name, **knobs)
    a = task.batch("train", 3, 17, 6)
    b = task.batch("train", 3, 17, 6)
    for x, y in zip((a.input_ids, a.targets, a.answer_mask), (b.input_ids, b.targets, b.answer_mask)):
        assert torch.equal(x, y)
    other = [task.batch("train", 3, 18, 6), task.batch("train", 4, 17, 6), task.batch("test", 3, 17, 6)]
    for o in other:
        assert not torch.equal(o.input_ids, a.input_ids)


@pytest.mark.parametrize("name,knobs", CASES)
def test_shapes_shift_and_vocabulary(name, knobs):
    task = make_task(name, **knobs)
    b = task.batch("test", 0, 0, 5)
    T = task.seq_len
    assert b.input_ids.shape == b.targets.shape == b.answer_mask.shape == (5, T)
    assert b.input_ids.dtype == b.targets.dtype == torch.int64 and b.answer_mask.dtype == torch.bool
    assert (b.input_ids[:, 0] == BOS).all()
    assert torch.equal(b.input_ids[:, 1:], b.targets[:, :-1])  # next-token targets
    assert int(b.input_ids.min()) >= 0 and int(b.targets.max()) < task.vocab_size
    assert b.answer_mask.any(dim=1).all()
    assert task_from_dict(task.to_dict()) == task


def test_train_and_test_seeds_are_disjoint_and_distinct():
    train = {batch_seed("train", s, i) for s in range(6) for i in list(range(300)) + [2**32 - 1]}
    test = {batch_seed("test", s, i) for s in range(6) for i in list(range(300)) + [2**32 - 1]}
    assert len(train) == len(test) == 6 * 301  # no two (seed, index) pairs share a seed
    assert not train & test
    assert batch_seed("train", 2**30 - 1, 2**32 - 1) < 2**63
    for bad in (dict(split="val", seed=0, index=0), dict(split="train", seed=-1, index=0),
                dict(split="train", seed=0, index=2**32), dict(split="train", seed=2**30, index=0)):
        with pytest.raises(ValueError):
            batch_seed(**bad)


def test_test_split_does_not_repeat_training_sequences():
    task = make_task("mqar", pairs=8, seq_len=32, vocab=64)
    train = {tuple(r) for i in range(20) for r in task.batch("train", 0, i, 32).input_ids.tolist()}
    test = [tuple(r) for r in task.batch("test", 0, 0, 64).input_ids.tolist()]
    assert not any(r in train for r in test)


@pytest.mark.parametrize("knobs", [dict(pairs=8, seq_len=64, vocab=64), dict(pairs=5, seq_len=23, vocab=11, queries=3),
                                   dict(pairs=16, seq_len=64, vocab=40)])
def test_mqar_answers_are_the_values_of_the_queried_keys(knobs):
    task = make_task("mqar", **knobs)
    b = task.batch("train", 1, 2, 16)
    nk = (task.vocab - 1) // 2
    for ids, tgt, mask in zip(b.input_ids.tolist(), b.targets.tolist(), b.answer_mask.tolist()):
        content = ids[1:] + [tgt[-1]]
        keys, values = content[0:2 * task.pairs:2], content[1:2 * task.pairs:2]
        assert len(set(keys)) == task.pairs and all(1 <= k <= nk for k in keys)
        assert all(nk < v < task.vocab for v in values)
        table = dict(zip(keys, values))
        answered = [t for t, m in enumerate(mask) if m]
        assert len(answered) == task.num_queries
        asked = [ids[t] for t in answered]  # the token read when the answer is due: the key
        assert len(set(asked)) == len(asked)
        for t in answered:
            assert t >= 2 * task.pairs and tgt[t] == table[ids[t]]
        assert all(tok == BOS for t, tok in enumerate(content) if t >= 2 * task.pairs
                   and t not in answered and t + 1 not in answered)


@pytest.mark.parametrize("digits,op,order", [(1, "add", "forward"), (3, "add", "reversed"),
                                             (12, "mul", "forward"), (5, "mixed", "reversed")])
def test_arithmetic_answers_are_right(digits, op, order):
    task = make_task("arithmetic", digits=digits, op=op, order=order)
    b = task.batch("train", 0, 5, 64)
    n, W = digits, task.answer_width
    ops_seen = set()
    for ids, tgt, mask in zip(b.input_ids.tolist(), b.targets.tolist(), b.answer_mask.tolist()):
        content = ids[1:] + [tgt[-1]]
        a = int("".join(str(t - ar.DIGIT0) for t in content[:n]))
        sym = content[n]
        b_ = int("".join(str(t - ar.DIGIT0) for t in content[n + 1:2 * n + 1]))
        assert content[2 * n + 1] == ar.EQUALS
        expected = a * b_ if sym == ar.TIMES else a + b_
        assert sym in ({ar.PLUS} if op == "add" else {ar.TIMES} if op == "mul" else {ar.PLUS, ar.TIMES})
        ops_seen.add(sym)
        answer = [t for t, m in zip(tgt, mask) if m]
        assert len(answer) == W
        s = "".join(str(t - ar.DIGIT0) for t in answer)
        assert int(s[::-1] if order == "reversed" else s) == expected
        assert ar.decode_number(answer, order) == expected
    if op == "mixed":
        assert ops_seen == {ar.PLUS, ar.TIMES}


def test_compare_answers_match_exact_decimal_comparison():
    task = make_task("compare", int_digits=2, frac_digits=3)
    b = task.batch("test", 0, 0, 400)
    inv = {v: k for k, v in cmp.CHAR_TOKEN.items()}
    seen, traps = set(), 0
    for ids, tgt in zip(b.input_ids.tolist(), b.targets.tolist()):
        tokens = [t for t in ids if t != BOS]
        sep, query = tokens.index(cmp.SEP), tokens.index(cmp.QUERY)
        a = "".join(inv[t] for t in tokens[:sep])
        c = "".join(inv[t] for t in tokens[sep + 1:query])
        assert query == len(tokens) - 1
        for s in (a, c):
            ip, fp = s.split(".")
            assert 1 <= len(ip) <= 2 and 1 <= len(fp) <= 3 and (len(ip) == 1 or ip[0] != "0")
        fa, fc = Fraction(a), Fraction(c)
        expected = cmp.LT if fa < fc else cmp.GT if fa > fc else cmp.EQ
        assert tgt[-1] == expected
        seen.add(expected)
        ia, fra = a.split(".")
        ic, frc = c.split(".")
        traps += ia == ic and len(fra) > len(frc) and fa < fc  # like 9.11 < 9.9
    assert seen == {cmp.LT, cmp.GT, cmp.EQ}
    assert traps >= 10


def test_compare_the_example_from_the_issue():
    t = make_task("compare", int_digits=1, frac_digits=2)
    assert t._value("9", "11") < t._value("9", "9")


def test_copy_answers_are_the_marked_tokens_in_order():
    task = make_task("copy", copy_len=6, seq_len=40, vocab=16)
    b = task.batch("train", 2, 0, 32)
    for ids, tgt, mask in zip(b.input_ids.tolist(), b.targets.tolist(), b.answer_mask.tolist()):
        content = ids[1:] + [tgt[-1]]
        C = task.context_len
        context = content[:C]
        assert content[C] == cp.SEP
        marked = [context[i + 1] for i in range(C - 1) if context[i] == cp.MARK]
        assert context.count(cp.MARK) == task.copy_len == len(marked)
        assert [t for t, m in zip(tgt, mask) if m] == marked
        assert all(t >= cp.FIRST_DATA for i, t in enumerate(context) if context[i] != cp.MARK)


@pytest.mark.parametrize("name,knobs,match", [
    ("mqar", dict(pairs=40, vocab=64), "fewer than pairs"),
    ("mqar", dict(pairs=8, seq_len=31), "too short"),
    ("mqar", dict(pairs=4, queries=5), "queries"),
    ("mqar", dict(pairs=0), "pairs"),
    ("arithmetic", dict(op="div"), "op"),
    ("arithmetic", dict(order="sideways"), "order"),
    ("arithmetic", dict(digits=0), "digits"),
    ("arithmetic", dict(digits=2.5), "integer"),
    ("compare", dict(frac_digits=0), "frac_digits"),
    ("copy", dict(copy_len=10, seq_len=30), "too short"),
    ("copy", dict(vocab=4), "vocab"),
    ("mqar", dict(digits=3), "no knob digits"),
    ("sorting", dict(), "unknown task"),
])
def test_bad_knobs_are_a_value_error(name, knobs, match):
    with pytest.raises(ValueError, match=match):
        make_task(name, **knobs)


def test_registry_lists_the_tasks():
    assert set(TASKS) == {"mqar", "arithmetic", "compare", "copy", "nupa", "text"}


@pytest.mark.parametrize("name,knobs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_shortest_is_the_same_task_at_its_least_valid_length(name, knobs):
    """Task.shortest() (the sequence-length warm-up): same knobs but the length, still valid,
    no longer than the task, and not shortenable further by one token where it has a length."""
    task = make_task(name, **knobs)
    short = task.shortest().validate()
    assert short.vocab_size == task.vocab_size and short.seq_len <= task.seq_len
    assert {k: v for k, v in short.to_dict().items() if k != "seq_len"} == \
        {k: v for k, v in task.to_dict().items() if k != "seq_len"}
    batch = short.batch("train", 0, 0, 3)
    assert batch.input_ids.shape == (3, short.seq_len) and batch.answer_mask.any()
    if "seq_len" in knobs:
        with pytest.raises(ValueError):
            make_task(name, **{**knobs, "seq_len": short.seq_len - 1})


def test_mqar_shortest_has_no_filler():
    task = make_task("mqar", pairs=16, seq_len=256, vocab=256)
    assert task.shortest().seq_len == 64
