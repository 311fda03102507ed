"""Byte-level language modelling on a directory (or a file) of text: the "text" task.

Vocabulary: 257 ids, 0 = BOS (it starts every document, so it also marks where the one
before ended), byte b = b + 1. Byte-level rather than a trained BPE: nothing to train or
ship beside a run, every file (any language, any encoding) is representable with no unknown
token, and bits per byte (loss / ln 2, what the task reports) compares runs and models with
no tokenizer in the way. The cost is sequences ~3-4x longer than BPE's for the same text,
which linear-time mixers are built to afford.

Documents: each text file of a directory (walked in sorted order; a file is text when its
first 8 KiB hold no NUL byte; `exclude` names directories and files to skip, `include` the
file names to keep, both as comma-separated fnmatch patterns), or each `block_bytes` block
of a single file.

Split: a document is held out ("test") when the first 8 bytes of sha256(its key) mod 100 <
test_percent, the key being its path relative to the corpus (or "block:N" for block N of a
single file). So the split is deterministic, disjoint, and stable when files are added.
Each split is one stream: BOS doc BOS doc ... in index order.

Batches: Task.batch(split, seed, index, batch_size), a pure function of its arguments like
every task's (see linattn.tasks.batch): each row is a window of seq_len + 1 tokens starting
at a uniform position of the split's stream (wrapping around at its end), input_ids the
first seq_len, targets the last seq_len, every token scored. Only the index (a path, an
offset and a length per document) is held in memory; windows are read from the files on
demand, so corpora of any size stream.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import Task
from .batch import BOS, Batch, generator_for

TEXT_VOCAB = 257
BYTE_OFFSET = 1  # id of byte b is b + BYTE_OFFSET
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    path: str   # absolute path of the file holding it
    start: int  # byte offset in that file
    length: int  # bytes
    key: str    # what the split hashes: the path relative to the corpus, or "block:N"


def encode(data: bytes) -> list[int]:
    """Bytes -> token ids (no BOS)."""
    return [b + BYTE_OFFSET for b in data]


def decode(ids) -> bytes:
    """Token ids -> bytes; BOS (0) is dropped."""
    return bytes(int(i) - BYTE_OFFSET for i in ids if int(i) != BOS)


def held_out(key: str, test_percent: int) -> bool:
    """Whether the document with this key is in the test split."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return h % 100 < test_percent


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _is_text(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" not in f.read(_SNIFF_BYTES)
    except OSError:
        return False


def corpus_documents(corpus: str, include: str = "*", exclude: str = "", block_bytes: int = 65536) -> list[Document]:
    """The documents of `corpus` (a directory or a file; see the module docstring), in order."""
    root = Path(corpus)
    if root.is_file():
        size = root.stat().st_size
        return [Document(str(root.resolve()), s, min(block_bytes, size - s), f"block:{s // block_bytes}")
                for s in range(0, size, block_bytes)]
    if not root.is_dir():
        raise ValueError(f"task text: corpus {corpus!r} is neither a file nor a directory")
    inc, exc = _patterns(include), _patterns(exclude)
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not any(fnmatch.fnmatch(d, p) for p in exc))
        for name in sorted(filenames):
            if any(fnmatch.fnmatch(name, p) for p in exc) or not any(fnmatch.fnmatch(name, p) for p in inc):
                continue
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path):
                continue
            size = os.path.getsize(path)
            if size == 0 or not _is_text(path):
                continue
            docs.append(Document(os.path.abspath(path), 0, size, os.path.relpath(path, root).replace(os.sep, "/")))
    return docs


class SplitStream:
    """One split's documents as a token stream BOS doc BOS doc ..., read on demand.

    starts: int64 [n_docs + 1], stream position of each document's BOS (and the total length).
    """

    def __init__(self, docs: list[Document]):
        self.docs = docs
        self.starts = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([d.length + 1 for d in docs], out=self.starts[1:])

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    @property
    def bytes(self) -> int:
        return sum(d.length for d in self.docs)

    def read(self, pos: int, n: int) -> list[int]:
        """n tokens from stream position pos, wrapping around at the end."""
        out: list[int] = []
        pos %= self.total
        while len(out) < n:
            j = int(np.searchsorted(self.starts, pos, side="right")) - 1
            off = pos - int(self.starts[j])
            if off == 0:
                out.append(BOS)
                off, pos = 1, pos + 1
            doc = self.docs[j]
            take = min(n - len(out), doc.length - (off - 1))
            with open(doc.path, "rb") as f:
                f.seek(doc.start + off - 1)
                data = f.read(take)
            if len(data) != take:
                raise ValueError(f"task text: {doc.path} changed while in use (wanted {take} bytes "
                                 f"at {doc.start + off - 1}, got {len(data)})")
            out.extend(encode(data))
            pos = (pos + take) % self.total
        return out


@dataclass
class Text(Task):
    """Byte-level LM on a text corpus (see the module docstring). Knobs:

    corpus: a directory or a file.  seq_len: tokens per training sequence.
    test_percent: percent of documents held out (1..99).  block_bytes: document size of a
    single-file corpus.  include / exclude: comma-separated fnmatch patterns of file names to
    keep / of directory and file names to skip.
    """

    name = "text"
    corpus: str = ""
    seq_len: int = 512
    test_percent: int = 5
    block_bytes: int = 65536
    include: str = "*"
    exclude: str = "site-packages,__pycache__,.*"

    @property
    def vocab_size(self) -> int:
        return TEXT_VOCAB

    def check(self) -> None:
        if not self.corpus:
            raise ValueError("task text needs a corpus: --corpus PATH (a directory or a file of text)")
        if self.seq_len < 1:
            raise ValueError(f"task text: seq_len must be >= 1, got {self.seq_len}")
        if not 1 <= self.test_percent <= 99:
            raise ValueError(f"task text: test_percent must be in [1, 99], got {self.test_percent}")
        if self.block_bytes < 1:
            raise ValueError(f"task text: block_bytes must be >= 1, got {self.block_bytes}")
        for split in ("train", "test"):
            if self.stream(split).total == 0:
                raise ValueError(f"task text: the {split} split of {self.corpus} is empty "
                                 f"({len(self._index())} documents, test_percent={self.test_percent}); "
                                 "use a larger corpus, or a smaller block_bytes for a single file")

    def _index(self) -> list[Document]:
        key = (self.corpus, self.include, self.exclude, self.block_bytes)
        cached = self.__dict__.get("_cached_index")
        if cached is None or cached[0] != key:
            cached = (key, corpus_documents(self.corpus, self.include, self.exclude, self.block_bytes), {})
            self.__dict__["_cached_index"] = cached
        return cached[1]

    def stream(self, split: str) -> SplitStream:
        """The SplitStream of "train" or "test"."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        docs = self._index()
        streams = self.__dict__["_cached_index"][2]
        k = (split, self.test_percent)
        if k not in streams:
            streams[k] = SplitStream([d for d in docs if held_out(d.key, self.test_percent) == (split == "test")])
        return streams[k]

    def batch(self, split: str, seed: int, index: int, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen = generator_for(split, seed, index)
        stream = self.stream(split)
        T = self.seq_len
        starts = gen.integers(0, stream.total, size=batch_size)
        rows = torch.tensor([stream.read(int(s), T + 1) for s in starts], dtype=torch.int64)  # [B, T+1]
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(),
                     torch.ones(batch_size, T, dtype=torch.bool))

    def sample(self, batch_size: int, gen: np.random.Generator) -> Batch:
        raise ValueError("task text draws from a split: call batch(split, seed, index, batch_size)")
