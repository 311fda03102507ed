"""Every task's text form: encode/decode round-trip on its own batches, prompts laid out as
training lays them out, chance accuracy and answer length consistent with the batches."""
import pytest
import torch

from linattn.tasks import TASKS, make_task
from linattn.tasks.batch import BOS

CASES = [
    ("mqar", dict(pairs=8, seq_len=64, vocab=64)),
    ("mqar", dict(pairs=5, seq_len=23, vocab=11, queries=3)),
    ("arithmetic", dict(digits=3, op="mixed", order="reversed")),
    ("compare", dict(int_digits=2, frac_digits=3)),
    ("copy", dict(copy_len=6, seq_len=40, vocab=16)),
    ("arithmetic", dict(digits=4, digits_b=2, op="sub", order="forward")),
    ("arithmetic", dict(digits=5, op="mul", tokenization="r2l3")),
    ("nupa", dict(problem="frac_add", digits=3)),
    ("nupa", dict(problem="int_mul", digits=4, tokenization="l2r3")),
]
# The text task's prompts are bytes, read and written through transformers' tokenizer
# (linattn.hf); its encode / decode are tested in tests/tasks/test_text.py.
WITHOUT_TASK_TEXT = {"text"}


def content_of(batch):
    return torch.cat([batch.input_ids[:, 1:], batch.targets[:, -1:]], dim=1)  # [B, T]


def test_every_registered_task_is_covered():
    assert {name for name, _ in CASES} == set(TASKS) - WITHOUT_TASK_TEXT


@pytest.mark.parametrize("name,knobs", CASES)
def test_encode_decode_round_trip_on_batches(name, knobs):
    task = make_task(name, **knobs)
    assert len(task.token_names()) == task.vocab_size == len(set(task.token_names()))
    for row in content_of(task.batch("test", 0, 0, 8)).tolist():
        text = task.decode(row)
        assert task.encode(text) == row, text
        assert task.decode(task.encode(text)) == text


@pytest.mark.parametrize("name,knobs", CASES)
def test_prompt_ids_are_the_input_ids_before_the_first_answer(name, knobs):
    """A prompt made of a sequence's text up to its first answer token reads exactly the
    model inputs training fed before that answer; answer_len answer tokens follow it."""
    task = make_task(name, **knobs)
    batch = task.batch("test", 1, 2, 4)
    content = content_of(batch)
    for b in range(4):
        first = int(batch.answer_mask[b].nonzero()[0])
        ids = content[b, :first].tolist()
        if name == "compare":
            ids = [i for i in ids if i != BOS]  # the user's text has no padding
        prompt = task.prompt_ids(task.decode(ids))
        assert prompt == batch.input_ids[b, :first + 1].tolist()
        n = task.answer_len  # None: answers of varying length (nupa's end with "$")
        if n is not None:
            assert batch.answer_mask[b, first:first + n].all()
        assert task.chance is None or 0 < task.chance < 1


def test_the_issues_prompts_read_as_expected():
    cmp = make_task("compare")
    assert cmp.decode(cmp.encode("9.11 | 9.9 ?")) == "9.11|9.9?"
    assert cmp.answer_text(cmp.encode("<")) == "<" and cmp.chance == pytest.approx(1 / 3)
    ar = make_task("arithmetic", digits=2, order="reversed")
    assert ar.encode("12+34=") == [2, 3, 11, 4, 5, 13]
    assert ar.answer_text(ar.encode("640")) == "640 (reversed digits of 46)"
    mq = make_task("mqar", pairs=2, seq_len=12, vocab=10)
    assert mq.decode(mq.encode("k0 v1 k3 v0 k0")) == "k0 v1 k3 v0 k0" and mq.chance == 1 / 5


@pytest.mark.parametrize("name,text,bad", [("compare", "9,11 | 9.9 ?", "','"),
                                           ("mqar", "k0 v1 x", "'x'"),
                                           ("copy", "3 4 99", "'99'")])
def test_text_that_is_not_a_token_is_a_value_error(name, text, bad):
    with pytest.raises(ValueError, match=f"{bad} is not a token of task {name}"):
        make_task(name).encode(text)
