"""Multi-query associative recall (MQAR, Zoology): store key-value pairs, answer key queries.

Content layout (T = seq_len tokens):

    k1 v1 k2 v2 ... kP vP | filler ... kq vq ... filler ... kq' vq' ...

The first 2P tokens are P pairs with distinct keys; the rest is cut into 2-token slots, of
which `queries` (default: P) hold a queried key followed by its value, the others hold BOS
filler. Each key is queried at most once, in random order. The scored answer tokens are the
values after queried keys: the model must recall them from the pairs.

Vocabulary: 0 = BOS/filler, keys in [1, 1 + nk), values in [1 + nk, vocab) with
nk = (vocab - 1) // 2.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .base import Task, randint, random_choice_rows
from .batch import BOS, Batch


@dataclass
class MQAR(Task):
    name = "mqar"
    pairs: int = 8
    seq_len: int = 64
    vocab: int = 64
    queries: int = 0  # 0: one query per pair

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def num_keys(self) -> int:
        return (self.vocab - 1) // 2

    @property
    def num_queries(self) -> int:
        return self.queries or self.pairs

    @property
    def chance(self) -> float:
        return 1 / (self.vocab - 1 - self.num_keys)  # one of the value tokens

    @property
    def answer_len(self) -> int:
        return 1  # a prompt ends with a queried key; its value answers it

    def token_names(self) -> list[str]:
        """"_" (BOS/filler), keys "k0".."k{nk-1}", values "v0".."v{vocab-2-nk}": a prompt
        reads "k3 v7 k1 v2 ... k3" and its answer is "v7"."""
        nk = self.num_keys
        return ["_"] + [f"k{i}" for i in range(nk)] + [f"v{i}" for i in range(self.vocab - 1 - nk)]

    def shortest(self) -> "MQAR":
        """The pairs and the queries with no filler between them: T = 2P + 2Q."""
        return replace(self, seq_len=2 * self.pairs + 2 * self.num_queries)

    def check(self) -> None:
        if self.pairs < 1:
            raise ValueError(f"mqar: pairs must be >= 1, got {self.pairs}")
        if self.num_keys < self.pairs:
            raise ValueError(f"mqar: vocab={self.vocab} has {self.num_keys} keys, fewer than "
                             f"pairs={self.pairs} (need vocab >= {2 * self.pairs + 1})")
        if not (0 <= self.queries <= self.pairs):
            raise ValueError(f"mqar: queries must be in [0, pairs={self.pairs}], got {self.queries}")
        need = 2 * self.pairs + 2 * self.num_queries
        if self.seq_len < need:
            raise ValueError(f"mqar: seq_len={self.seq_len} is too short for {self.pairs} pairs "
                             f"and {self.num_queries} queries (need >= {need})")

    def sample(self, batch_size: int, gen: np.random.Generator) -> Batch:
        B, P, Q, T = batch_size, self.pairs, self.num_queries, self.seq_len
        keys = 1 + random_choice_rows(gen, B, self.num_keys, P)  # [B, P] distinct per row
        values = randint(gen, 1 + self.num_keys, self.vocab, (B, P))  # [B, P]
        asked = random_choice_rows(gen, B, P, Q)  # [B, Q] which pairs are queried
        n_slots = (T - 2 * P) // 2
        slots = random_choice_rows(gen, B, n_slots, Q).sort(dim=1).values  # [B, Q]
        pos = 2 * P + 2 * slots  # [B, Q] position of each queried key

        content = torch.full((B, T), BOS, dtype=torch.int64)
        content[:, 0:2 * P:2] = keys
        content[:, 1:2 * P:2] = values
        content.scatter_(1, pos, keys.gather(1, asked))
        content.scatter_(1, pos + 1, values.gather(1, asked))
        is_answer = torch.zeros(B, T, dtype=torch.bool)
        is_answer.scatter_(1, pos + 1, True)
        return Batch.from_content(content, is_answer)
