"""The text task: a deterministic, disjoint split by document; windows streamed from files."""
import sysconfig
from pathlib import Path

import pytest
import torch

from linattn.tasks import make_task, task_from_dict
from linattn.tasks.batch import BOS
from linattn.tasks.text import Text, corpus_documents, decode, held_out

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = STDLIB / "json"  # a few small files of real text no one here wrote


def stream_bytes(task, split) -> list[int]:
    """The split's whole token stream, built in memory (the oracle for streamed reads)."""
    out = []
    for d in task.stream(split).docs:
        data = Path(d.path).read_bytes()[d.start:d.start + d.length]
        out += [BOS] + [b + 1 for b in data]
    return out


def test_split_is_deterministic_and_disjoint():
    a = make_task("text", corpus=str(CORPUS), test_percent=30)
    b = make_task("text", corpus=str(CORPUS), test_percent=30)
    keys = lambda t, s: [d.key for d in t.stream(s).docs]  # noqa: E731
    train, test = keys(a, "train"), keys(a, "test")
    assert train and test and not set(train) & set(test)
    assert sorted(train + test) == sorted(d.key for d in corpus_documents(str(CORPUS), exclude=a.exclude))
    assert (train, test) == (keys(b, "train"), keys(b, "test"))
    assert all(held_out(k, 30) for k in test) and not any(held_out(k, 30) for k in train)
    assert not any("__pycache__" in k for k in train + test)  # binary .pyc files are not text


def test_batches_are_pure_and_come_from_their_split():
    task = make_task("text", corpus=str(CORPUS), seq_len=48, test_percent=30)
    b1 = task.batch("test", 7, 3, 4)
    b2 = task_from_dict(task.to_dict()).batch("test", 7, 3, 4)
    assert torch.equal(b1.input_ids, b2.input_ids) and torch.equal(b1.targets, b2.targets)
    assert not torch.equal(task.batch("test", 7, 4, 4).input_ids, b1.input_ids)
    assert b1.input_ids.shape == (4, 48) and b1.answer_mask.all()
    assert torch.equal(b1.input_ids[:, 1:], b1.targets[:, :-1])
    test = stream_bytes(task, "test")
    text = bytes(test).hex()  # windows are substrings of the (cyclic) test stream
    cyclic = bytes(test + test[:49]).hex()
    for row in range(4):
        window = b1.input_ids[row].tolist() + [int(b1.targets[row, -1])]
        assert bytes(window).hex() in cyclic
    assert text


def test_streamed_reads_cross_documents_and_wrap():
    task = make_task("text", corpus=str(CORPUS), test_percent=30)
    s = task.stream("train")
    whole = stream_bytes(task, "train")
    assert s.total == len(whole)
    for pos, n in [(0, 10), (s.starts[1] - 3, 10), (s.total - 5, 12), (s.starts[2], 1)]:
        want = [whole[(int(pos) + i) % len(whole)] for i in range(n)]
        assert s.read(int(pos), n) == want


def test_single_file_is_split_by_blocks(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_bytes(("line of text\n" * 400).encode())
    task = make_task("text", corpus=str(f), block_bytes=256, test_percent=20, seq_len=16)
    train, test = task.stream("train").docs, task.stream("test").docs
    assert train and test and {d.start for d in train}.isdisjoint(d.start for d in test)
    assert sum(d.length for d in train + test) == f.stat().st_size
    assert decode(task.batch("train", 0, 0, 1).targets[0]).replace(b"\n", b"").strip()


def test_bad_corpora_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="corpus"):
        make_task("text")
    with pytest.raises(ValueError, match="neither a file nor a directory"):
        make_task("text", corpus=str(tmp_path / "missing"))
    (tmp_path / "a.txt").write_text("tiny")
    with pytest.raises(ValueError, match="split .* is empty"):
        make_task("text", corpus=str(tmp_path))
    assert Text(corpus=str(tmp_path)).vocab_size == 257
