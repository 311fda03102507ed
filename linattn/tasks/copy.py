"""Selective copying: copy the marked tokens out of noise, in order.

Content (T = seq_len tokens): a context of C = seq_len - copy_len - 1 tokens cut into
2-token slots; `copy_len` random slots hold (MARK, data token), every other slot holds two
random noise tokens drawn from the same range as the data, so only the MARK before a token
tells data from noise. Then SEP, then the copy_len data tokens in their order of appearance:
those are scored.

Vocabulary: 0 = BOS, 1 = MARK, 2 = SEP, data and noise tokens in [3, vocab).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .base import Task, randint, random_choice_rows
from .batch import Batch

MARK, SEP, FIRST_DATA = 1, 2, 3


@dataclass
class SelectiveCopy(Task):
    name = "copy"
    copy_len: int = 8
    seq_len: int = 64
    vocab: int = 32

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def context_len(self) -> int:
        return self.seq_len - self.copy_len - 1

    @property
    def chance(self) -> float:
        return 1 / (self.vocab - FIRST_DATA)  # one of the data tokens

    @property
    def answer_len(self) -> int:
        return self.copy_len

    def token_names(self) -> list[str]:
        """"_" (BOS), "*" (MARK), "|" (SEP), data and noise tokens as their ids "3".."vocab-1":
        a prompt reads "5 9 * 12 7 3 * 8 ... |", its answer the marked tokens "12 8 ..."."""
        return ["_", "*", "|", *(str(i) for i in range(FIRST_DATA, self.vocab))]

    def shortest(self) -> "SelectiveCopy":
        """The least noise that still hides copy_len marked tokens: T = 3 copy_len + 1."""
        return replace(self, seq_len=3 * self.copy_len + 1)

    def check(self) -> None:
        if self.copy_len < 1:
            raise ValueError(f"copy: copy_len must be >= 1, got {self.copy_len}")
        if self.vocab < FIRST_DATA + 2:
            raise ValueError(f"copy: vocab must be >= {FIRST_DATA + 2}, got {self.vocab}")
        need = 3 * self.copy_len + 1
        if self.seq_len < need:
            raise ValueError(f"copy: seq_len={self.seq_len} is too short to hide copy_len="
                             f"{self.copy_len} marked tokens (need >= {need})")

    def sample(self, batch_size: int, gen: np.random.Generator) -> Batch:
        B, M, C = batch_size, self.copy_len, self.context_len
        context = randint(gen, FIRST_DATA, self.vocab, (B, C))  # [B, C] noise
        slots = random_choice_rows(gen, B, C // 2, M).sort(dim=1).values  # [B, M]
        data = randint(gen, FIRST_DATA, self.vocab, (B, M))  # [B, M]
        context.scatter_(1, 2 * slots, MARK)
        context.scatter_(1, 2 * slots + 1, data)
        content = torch.cat([context, torch.full((B, 1), SEP), data], dim=1)  # [B, T]
        is_answer = torch.zeros_like(content, dtype=torch.bool)
        is_answer[:, -M:] = True
        return Batch.from_content(content, is_answer)
