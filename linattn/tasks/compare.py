"""Which of two decimals is larger ("9.11" vs "9.9": 9.9 is).

Content (left-padded with BOS to a fixed length): `a | b ?` followed by one answer token,
'<' (a < b), '>' (a > b) or '=' (equal in value, e.g. "3.10" and "3.1"). Integer parts have
1..int_digits digits (no leading zeros), fractional parts 1..frac_digits digits. Half of the
pairs share their integer part, so the fractional digits decide, as in the 9.11 vs 9.9 trap
(longer fraction is not larger).

Vocabulary: 0 = BOS/pad, digit d = 1 + d, '.' = 11, '|' = 12, '?' = 13, '<' = 14, '>' = 15,
'=' = 16.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import Task
from .batch import BOS, Batch

DIGIT0, POINT, SEP, QUERY, LT, GT, EQ = 1, 11, 12, 13, 14, 15, 16
CHAR_TOKEN = {**{str(d): DIGIT0 + d for d in range(10)}, ".": POINT}


@dataclass
class Compare(Task):
    name = "compare"
    int_digits: int = 2
    frac_digits: int = 3

    @property
    def vocab_size(self) -> int:
        return 17

    @property
    def number_width(self) -> int:
        return self.int_digits + 1 + self.frac_digits

    @property
    def seq_len(self) -> int:
        return 2 * self.number_width + 3

    @property
    def chance(self) -> float:
        return 1 / 3  # '<', '>' or '='

    @property
    def answer_len(self) -> int:
        return 1

    text_unit = "char"

    def token_names(self) -> list[str]:
        """One character per token: "_" (BOS/pad), the digits, ".", "|", "?", "<", ">", "=".
        A prompt reads "9.11 | 9.9 ?" (spaces ignored), its answer "<", ">" or "="."""
        return ["_", *"0123456789", ".", "|", "?", "<", ">", "="]

    def prompt_ids(self, text: str) -> list[int]:
        """BOS, then the prompt left-padded with BOS as training pads it (the answer is the
        sequence's last token)."""
        tokens = self.encode(text)
        return [BOS] * max(1, self.seq_len - len(tokens)) + tokens

    def check(self) -> None:
        for knob in ("int_digits", "frac_digits"):
            if not (1 <= getattr(self, knob) <= 32):
                raise ValueError(f"compare: {knob} must be in [1, 32], got {getattr(self, knob)}")

    def _draw(self, gen: np.random.Generator, n: int, low: int, high: int) -> list[int]:
        return gen.integers(low, high, size=n).tolist()

    def _integer_part(self, gen: np.random.Generator) -> str:
        (length,) = self._draw(gen, 1, 1, self.int_digits + 1)
        if length == 1:
            return str(self._draw(gen, 1, 0, 10)[0])
        first, *rest = self._draw(gen, length, 0, 10)
        return str(1 + first % 9) + "".join(map(str, rest))

    def _fraction(self, gen: np.random.Generator) -> str:
        (length,) = self._draw(gen, 1, 1, self.frac_digits + 1)
        return "".join(map(str, self._draw(gen, length, 0, 10)))

    def _value(self, integer: str, fraction: str) -> int:
        """The decimal as an int in units of 10**-frac_digits (exact comparison)."""
        return int(integer) * 10**self.frac_digits + int(fraction.ljust(self.frac_digits, "0"))

    def sample(self, batch_size: int, gen: np.random.Generator) -> Batch:
        T = self.seq_len
        content = torch.full((batch_size, T), BOS, dtype=torch.int64)
        for row in range(batch_size):
            ia, fa = self._integer_part(gen), self._fraction(gen)
            same_integer = self._draw(gen, 1, 0, 2)[0] == 1
            ib = ia if same_integer else self._integer_part(gen)
            fb = self._fraction(gen)
            va, vb = self._value(ia, fa), self._value(ib, fb)
            answer = LT if va < vb else GT if va > vb else EQ
            tokens = ([CHAR_TOKEN[ch] for ch in f"{ia}.{fa}"] + [SEP]
                      + [CHAR_TOKEN[ch] for ch in f"{ib}.{fb}"] + [QUERY, answer])
            content[row, T - len(tokens):] = torch.tensor(tokens)
        is_answer = torch.zeros(batch_size, T, dtype=torch.bool)
        is_answer[:, -1] = True
        return Batch.from_content(content, is_answer)
