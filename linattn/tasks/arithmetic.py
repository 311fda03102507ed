"""n-digit by m-digit addition, subtraction and multiplication, the answer forward or reversed.

Content: `a op b = c`. The operands are written most significant first and zero-padded to a
fixed width, a to `digits` and b to `digits_b` (0: the same as a), as Qiu et al. ("Dissecting
Multiplication in Transformers", 2024) pad them: every digit keeps its position. The answer c
is zero-padded to the answer width W and written in `order`: "forward" (most significant
first) or "reversed" (least significant first, the order in which carries are produced).

    op     answer                                   W (digits)
    add    a + b                                    max(n, m) + 1
    sub    a sign token then |a - b|: "+" for       max(n, m)   (plus the sign token)
           a >= b, "-" for a < b, first in both
           orders (writing |a - b| least
           significant first needs the sign,
           i.e. which operand is larger, first)
    mul    a * b                                    n + m
    mixed  add or mul, half each                    n + m

`lengths` (the training data's mix; evaluate on "fixed"): "fixed" draws every digit of the
padded operands uniformly (so most operands use their full width); "uniform" first draws each
operand's significant length uniformly in 1..width and zero-fills the rest, so short, easy
products are as common as long ones; "simple" is Qiu et al.'s mix: a fraction
`simple_fraction` of the samples are "simple", their second operand b zero but for one digit
at a position uniform in 0..m-1 (a full-width a times one shifted digit: one partial product
of long multiplication), the rest drawn as "fixed".

Only the answer tokens (sign included) are scored. `tokenization` picks how digits become
tokens (see linattn.tasks.number_tokens): "digit" (one per digit), "l2r3" or "r2l3" (groups of
three from the left or from the right; a reversed answer is grouped as written).

Vocabulary ("digit"): 0 = BOS, digit d = 1 + d, '+' = 11, '*' = 12, '=' = 13, and for op
"sub" '-' = 14. Grouped tokenizations put their 1110 digit pieces where the ten digits are
and the symbols after them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import Task, randint
from .batch import Batch
from .number_tokens import TOKENIZATIONS, NumberText, NumberVocab, pieces_in_run

DIGIT0, PLUS, TIMES, EQUALS, MINUS = 1, 11, 12, 13, 14  # the ids under tokenization "digit"
OPS = ("add", "sub", "mul", "mixed")
ORDERS = ("forward", "reversed")
LENGTHS = ("fixed", "uniform", "simple")
MAX_DIGITS = 64
FAST_WIDTH = 18  # answers of up to 18 digits fit int64: computed on tensors


@dataclass
class Arithmetic(NumberText, Task):
    name = "arithmetic"
    digits: int = 3
    op: str = "add"
    order: str = "reversed"
    digits_b: int = 0  # 0: as many as digits
    tokenization: str = "digit"
    lengths: str = "fixed"
    simple_fraction: float = 0.3  # lengths "simple": the fraction of simple samples

    @property
    def m(self) -> int:
        """Digits of the second operand."""
        return self.digits_b or self.digits

    @property
    def vocab(self) -> NumberVocab:
        symbols = ("+", "*", "=") + (("-",) if self.op == "sub" else ())
        return NumberVocab(symbols, self.tokenization)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def answer_width(self) -> int:
        """Digits of the answer (the sign of "sub" not counted)."""
        n, m = self.digits, self.m
        return {"add": max(n, m) + 1, "sub": max(n, m)}.get(self.op, n + m)

    @property
    def answer_tokens(self) -> int:
        return (self.op == "sub") + pieces_in_run(self.answer_width, self.tokenization)

    @property
    def seq_len(self) -> int:
        t = self.tokenization
        return pieces_in_run(self.digits, t) + pieces_in_run(self.m, t) + 2 + self.answer_tokens

    @property
    def chance(self) -> float:
        return 0.1  # one of ten digits

    @property
    def answer_len(self) -> int:
        return self.answer_tokens

    def answer_text(self, ids) -> str:
        """The answer digits as generated, and for reversed answers the number they write."""
        text = self.decode(ids)
        if self.order == "reversed" and text.isdigit():
            return f"{text} (reversed digits of {int(text[::-1])})"
        return text

    def check(self) -> None:
        if not (1 <= self.digits <= MAX_DIGITS):
            raise ValueError(f"arithmetic: digits must be in [1, {MAX_DIGITS}], got {self.digits}")
        if not (0 <= self.digits_b <= MAX_DIGITS):
            raise ValueError(f"arithmetic: digits_b must be in [0, {MAX_DIGITS}] (0: as digits), got {self.digits_b}")
        if self.op not in OPS:
            raise ValueError(f"arithmetic: op must be one of {', '.join(OPS)}, got {self.op!r}")
        if self.order not in ORDERS:
            raise ValueError(f"arithmetic: order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.lengths not in LENGTHS:
            raise ValueError(f"arithmetic: lengths must be one of {', '.join(LENGTHS)}, got {self.lengths!r}")
        if not (isinstance(self.simple_fraction, (int, float)) and 0 <= self.simple_fraction <= 1):
            raise ValueError(f"arithmetic: simple_fraction must be in [0, 1], got {self.simple_fraction!r}")
        if self.tokenization not in TOKENIZATIONS:
            raise ValueError(f"arithmetic: tokenization must be one of {', '.join(TOKENIZATIONS)}, "
                             f"got {self.tokenization!r}")

    def answer_string(self, a: int, b: int, is_mul: bool) -> str:
        """The answer as written: sign (sub), digits zero-padded to answer_width, in order."""
        if self.op == "sub":
            sign, c = ("+" if a >= b else "-"), abs(a - b)
        else:
            sign, c = "", (a * b if is_mul else a + b)
        s = str(c).rjust(self.answer_width, "0")
        return sign + (s[::-1] if self.order == "reversed" else s)

    def sample(self, batch_size: int, gen: np.random.Generator) -> Batch:
        B, n, m = batch_size, self.digits, self.m
        a_digits = randint(gen, 0, 10, (B, n))  # [B, n] most significant first
        b_digits = randint(gen, 0, 10, (B, m))  # [B, m]
        if self.op == "mixed":
            is_mul = randint(gen, 0, 2, (B,)).bool()
        else:
            is_mul = torch.full((B,), self.op == "mul")
        if self.lengths == "uniform":  # keep the last L digits of each operand, L uniform in 1..width
            for d in (a_digits, b_digits):
                keep = randint(gen, 1, d.shape[1] + 1, (B, 1))  # [B, 1]
                d.masked_fill_(torch.arange(d.shape[1]) < d.shape[1] - keep, 0)
        elif self.lengths == "simple":  # b of a simple sample keeps the one digit at `pos`
            simple = torch.from_numpy(gen.random(B) < self.simple_fraction)  # [B] bool
            pos = randint(gen, 0, m, (B, 1))  # [B, 1]
            b_digits.masked_fill_(simple[:, None] & (torch.arange(m) != pos), 0)
        if self.tokenization == "digit" and self.answer_width <= FAST_WIDTH:
            content = self._content_digits(a_digits, b_digits, is_mul)
        else:
            content = self._content_text(a_digits, b_digits, is_mul.tolist())
        is_answer = torch.zeros_like(content, dtype=torch.bool)
        is_answer[:, -self.answer_tokens:] = True
        return Batch.from_content(content, is_answer)

    def _content_text(self, a_digits: torch.Tensor, b_digits: torch.Tensor, is_mul: list) -> torch.Tensor:
        """[B, seq_len] ids: each example written as text and encoded (any tokenization)."""
        vocab, rows = self.vocab, []
        for da, db, mul in zip(a_digits.tolist(), b_digits.tolist(), is_mul):
            a_s, b_s = "".join(map(str, da)), "".join(map(str, db))
            sym = "*" if mul else "-" if self.op == "sub" else "+"
            rows.append(vocab.encode(f"{a_s}{sym}{b_s}=" + self.answer_string(int(a_s), int(b_s), mul)))
        return torch.tensor(rows, dtype=torch.int64)

    def _content_digits(self, a_digits: torch.Tensor, b_digits: torch.Tensor,
                        is_mul: torch.Tensor) -> torch.Tensor:
        """[B, seq_len] ids, the same as _content_text's, computed on int64 tensors (tokenization
        "digit", answers below 10**FAST_WIDTH). a_digits [B, n], b_digits [B, m] int64; is_mul [B] bool."""
        B, W = a_digits.shape[0], self.answer_width
        a = a_digits @ (10 ** torch.arange(self.digits - 1, -1, -1))  # [B] int64
        b = b_digits @ (10 ** torch.arange(self.m - 1, -1, -1))
        parts = [a_digits + DIGIT0]
        if self.op == "sub":
            c = (a - b).abs()
            parts.append(torch.full((B, 1), MINUS))
            sign = torch.where(a >= b, PLUS, MINUS).view(B, 1)
        else:
            c = torch.where(is_mul, a * b, a + b)
            parts.append(torch.where(is_mul, TIMES, PLUS).view(B, 1))
        c_digits = c[:, None] // 10 ** torch.arange(W - 1, -1, -1) % 10  # [B, W] most significant first
        if self.order == "reversed":
            c_digits = c_digits.flip(1)
        parts += [b_digits + DIGIT0, torch.full((B, 1), EQUALS)]
        if self.op == "sub":
            parts.append(sign)
        return torch.cat(parts + [c_digits + DIGIT0], dim=1)


def decode_number(tokens, order: str) -> int:
    """Digit tokens (1 + d, tokenization "digit") of one unsigned answer, in `order`, back to
    the int they write."""
    s = "".join(str(t - DIGIT0) for t in tokens)
    return int(s[::-1] if order == "reversed" else s)
