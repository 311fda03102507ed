"""n-digit addition and multiplication, with the answer's digits forward or reversed.

Content: `a op b = c` with a and b written with exactly `digits` digits (leading zeros) most
significant first, and c zero-padded to the answer width (digits + 1 for add, 2 * digits for
mul and for mixed) in `order`: "forward" (most significant first) or "reversed" (least
significant first, the order in which carries are produced). The answer digits are scored.

Vocabulary: 0 = BOS, digit d = 1 + d, '+' = 11, '*' = 12, '=' = 13.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import Task, randint
from .batch import Batch, digits_of

DIGIT0, PLUS, TIMES, EQUALS = 1, 11, 12, 13
OPS = ("add", "mul", "mixed")
ORDERS = ("forward", "reversed")


@dataclass
class Arithmetic(Task):
    name = "arithmetic"
    digits: int = 3
    op: str = "add"
    order: str = "reversed"

    @property
    def vocab_size(self) -> int:
        return 14

    @property
    def answer_width(self) -> int:
        return self.digits + 1 if self.op == "add" else 2 * self.digits

    @property
    def seq_len(self) -> int:
        return 2 * self.digits + 2 + self.answer_width

    @property
    def chance(self) -> float:
        return 0.1  # one of ten digits

    @property
    def answer_len(self) -> int:
        return self.answer_width

    text_unit = "char"

    def token_names(self) -> list[str]:
        """One character per token: "_" (BOS), the digits, "+", "*", "=". A prompt reads
        "123+456=" (operands with exactly `digits` digits), its answer the answer_width digits
        in `order`."""
        return ["_", *"0123456789", "+", "*", "="]

    def answer_text(self, ids) -> str:
        """The answer digits as generated, and for reversed answers the number they write."""
        text = self.decode(ids)
        if self.order == "reversed" and text.isdigit():
            return f"{text} (reversed digits of {int(text[::-1])})"
        return text

    def check(self) -> None:
        if not (1 <= self.digits <= 64):
            raise ValueError(f"arithmetic: digits must be in [1, 64], got {self.digits}")
        if self.op not in OPS:
            raise ValueError(f"arithmetic: op must be one of {', '.join(OPS)}, got {self.op!r}")
        if self.order not in ORDERS:
            raise ValueError(f"arithmetic: order must be one of {', '.join(ORDERS)}, got {self.order!r}")

    def sample(self, batch_size: int, gen: np.random.Generator) -> Batch:
        B, n, W = batch_size, self.digits, self.answer_width
        a_digits = randint(gen, 0, 10, (B, n))  # [B, n] most significant first
        b_digits = randint(gen, 0, 10, (B, n))
        if self.op == "mixed":
            is_mul = randint(gen, 0, 2, (B,)).bool()
        else:
            is_mul = torch.full((B,), self.op == "mul")
        a = [int("".join(map(str, row))) for row in a_digits.tolist()]
        b = [int("".join(map(str, row))) for row in b_digits.tolist()]
        c = [x * y if m else x + y for x, y, m in zip(a, b, is_mul.tolist())]
        answer = torch.tensor(digits_of(c, W, reverse=self.order == "reversed")).view(B, W)

        op_tok = torch.where(is_mul, TIMES, PLUS).view(B, 1)
        eq_tok = torch.full((B, 1), EQUALS)
        content = torch.cat([a_digits + DIGIT0, op_tok, b_digits + DIGIT0, eq_tok,
                             answer + DIGIT0], dim=1)  # [B, 2n + 2 + W]
        is_answer = torch.zeros_like(content, dtype=torch.bool)
        is_answer[:, -W:] = True
        return Batch.from_content(content, is_answer)


def decode_number(tokens, order: str) -> int:
    """Digit tokens (1 + d) of one answer, in `order`, back to the int they write."""
    s = "".join(str(t - DIGIT0) for t in tokens)
    return int(s[::-1] if order == "reversed" else s)
