"""Number understanding and processing (NUPA): a subset of the Number Cookbook's tasks.

Yang et al. ("Number Cookbook: Number Understanding of Language Models and How to Improve It",
2024) define 17 tasks over four representations (integers, floats, fractions, scientific
notation) in four groups: elementary arithmetic, comparison, digit understanding and
conversion. This task takes thirteen of them, chosen so that every group and the first three
representations appear and each problem has one exact answer string:

    problem         question      answer                      why
    int_add         a+b=          a + b                       the base case of the arithmetic group
    int_sub         a-b=          a - b (a >= b, as NUPA)     borrows
    int_mul         a*b=          a * b                       the hard one (carries over all digits)
    int_floordiv    a÷b=          a // b (b >= 1)             division, output length unknown
    int_mod         a%b=          a % b (b >= 1)              needs the whole quotient implicitly
    int_max         aMb=          max(a, b)                   comparison by length, then digits
    int_get_digit   aGi=          digit i of a (0: leftmost)  digit retrieval by index
    int_length      aL=           number of digits of a       counting
    int_to_sci      aS=           d.ddd...eK (trailing zeros  conversion; a often ends in zeros
                                  of the mantissa dropped)
    float_add       x+y=          x + y, fraction digits as   point alignment
                                  many as the longer operand
    float_max       xMy=          max(x, y) as written        the 9.11 vs 9.9 trap: half the pairs
                                                              share their integer part
    frac_add        p/q+r/s=      reduced fraction P/Q        common denominators
    frac_max        p/qMr/s=      the larger, as written      cross multiplication (p < q, as NUPA)

Left out: truediv (fractions out, covered by frac_add's reduction), min / digit_min (mirrors
of max), digit_max / digit_add / count (variations of get_digit), sig. fig. and scientific
notation arithmetic (rounding conventions make the answer string ambiguous), to_float of a
fraction (repeating decimals).

Operands: a length L uniform in 1..digits, then L digits, the first non-zero (L > 1): short and
long numbers are equally likely, as in NUPA's per-length buckets. Floats have an integer part
and a fraction part of 1..digits digits each; fractions a numerator and a denominator of
1..digits digits (denominator >= 1).

Content: the question, the answer, then '$' (end), right-aligned in seq_len tokens with BOS on
the left. The answer tokens and '$' are scored, so an answer one digit too short or too long
is wrong. `tokenization` as in linattn.tasks.number_tokens ("digit", "l2r3", "r2l3").

Vocabulary: 0 = BOS/padding, the digit pieces (digit d = 1 + d under "digit"), then the
symbols + - * ÷ % M G L S . e / = $ in that order (linattn.tasks.number_tokens.NumberVocab).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import numpy as np
import torch

from .base import Task
from .batch import BOS, Batch
from .number_tokens import TOKENIZATIONS, NumberText, NumberVocab, pieces_in_run

SYMBOLS = ("+", "-", "*", "÷", "%", "M", "G", "L", "S", ".", "e", "/", "=", "$")
MAX_DIGITS = 40


def _int(gen: np.random.Generator, n: int, length: int = 0) -> str:
    """An integer of 1..n digits (length uniform; or exactly `length`), no leading zero."""
    length = length or int(gen.integers(1, n + 1))
    digits = gen.integers(0, 10, size=length)
    if length > 1:
        digits[0] = 1 + digits[0] % 9
    return "".join(map(str, digits.tolist()))


def _digits(gen: np.random.Generator, n: int) -> str:
    """1..n digits, leading zeros allowed (a fraction part)."""
    return "".join(map(str, gen.integers(0, 10, size=int(gen.integers(1, n + 1))).tolist()))


def _float(gen: np.random.Generator, n: int, integer: str | None = None) -> str:
    return f"{_int(gen, n) if integer is None else integer}.{_digits(gen, n)}"


def _positive(gen: np.random.Generator, n: int) -> str:
    s = _int(gen, n)
    return s if s != "0" else "1"


def to_sci(a: int) -> str:
    """a > 0 in scientific notation: mantissa d.ddd without trailing zeros ("d" alone when one
    significant digit), 'e', the exponent."""
    s = str(a)
    mantissa = (s[0] + "." + s[1:]).rstrip("0").rstrip(".")
    return f"{mantissa}e{len(s) - 1}"


def _reduced(x: Fraction) -> str:
    return f"{x.numerator}/{x.denominator}"


def _int_add(gen, n):
    a, b = _int(gen, n), _int(gen, n)
    return f"{a}+{b}", str(int(a) + int(b))


def _int_sub(gen, n):
    a, b = sorted((_int(gen, n), _int(gen, n)), key=int, reverse=True)
    return f"{a}-{b}", str(int(a) - int(b))


def _int_mul(gen, n):
    a, b = _int(gen, n), _int(gen, n)
    return f"{a}*{b}", str(int(a) * int(b))


def _int_floordiv(gen, n):
    a, b = _int(gen, n), _positive(gen, n)
    return f"{a}÷{b}", str(int(a) // int(b))


def _int_mod(gen, n):
    a, b = _int(gen, n), _positive(gen, n)
    return f"{a}%{b}", str(int(a) % int(b))


def _int_max(gen, n):
    a = _int(gen, n)
    if gen.integers(0, 2):  # same length: the digits decide
        b = _int(gen, n, len(a))
    else:
        b = _int(gen, n)
    return f"{a}M{b}", max(a, b, key=int)


def _int_get_digit(gen, n):
    a = _int(gen, n)
    i = int(gen.integers(0, len(a)))
    return f"{a}G{i}", a[i]


def _int_length(gen, n):
    a = _int(gen, n)
    return f"{a}L", str(len(a))


def _int_to_sci(gen, n):
    a = _positive(gen, n)
    if gen.integers(0, 2) and len(a) > 1:  # end in zeros half the time (NUPA: "more zero")
        zeros = int(gen.integers(1, len(a)))
        a = a[:-zeros] + "0" * zeros
    return f"{a}S", to_sci(int(a))


def _float_add(gen, n):
    x, y = _float(gen, n), _float(gen, n)
    places = max(len(x.split(".")[1]), len(y.split(".")[1]))
    total = Decimal(x) + Decimal(y)
    return f"{x}+{y}", f"{total:.{places}f}"


def _float_max(gen, n):
    x = _float(gen, n)
    y = _float(gen, n, x.split(".")[0] if gen.integers(0, 2) else None)
    return f"{x}M{y}", x if Decimal(x) >= Decimal(y) else y


def _fraction(gen, n, proper: bool = False) -> str:
    p, q = _int(gen, n), _positive(gen, n)
    if proper and int(p) > int(q):
        p, q = q, p
    return f"{p}/{q}"


def _frac_add(gen, n):
    x, y = _fraction(gen, n), _fraction(gen, n)
    return f"{x}+{y}", _reduced(Fraction(x) + Fraction(y))


def _frac_max(gen, n):
    x, y = _fraction(gen, n, proper=True), _fraction(gen, n, proper=True)
    return f"{x}M{y}", x if Fraction(x) >= Fraction(y) else y


# problem -> (generator(gen, n) -> (question, answer), longest digit runs of (question,
# answer) for n digits, symbols in question + answer + "=$" (a count, or a function of n))
PROBLEMS = {
    "int_add": (_int_add, lambda n: [n, n, n + 1], 3),
    "int_sub": (_int_sub, lambda n: [n, n, n], 3),
    "int_mul": (_int_mul, lambda n: [n, n, 2 * n], 3),
    "int_floordiv": (_int_floordiv, lambda n: [n, n, n], 3),
    "int_mod": (_int_mod, lambda n: [n, n, n], 3),
    "int_max": (_int_max, lambda n: [n, n, n], 3),
    "int_get_digit": (_int_get_digit, lambda n: [n, len(str(n - 1)), 1], 3),
    "int_length": (_int_length, lambda n: [n, len(str(n))], 3),
    "int_to_sci": (_int_to_sci, lambda n: [n, 1, n - 1, len(str(n - 1))], lambda n: 4 + (n > 1)),
    "float_add": (_float_add, lambda n: [n, n, n, n, n + 1, n], 6),
    "float_max": (_float_max, lambda n: [n] * 6, 6),
    "frac_add": (_frac_add, lambda n: [n, n, n, n, 2 * n + 1, 2 * n], 6),
    "frac_max": (_frac_max, lambda n: [n] * 6, 6),
}


@dataclass
class Nupa(NumberText, Task):
    name = "nupa"
    problem: str = "int_add"
    digits: int = 5
    tokenization: str = "digit"

    def answer_text(self, ids) -> str:
        """The generated answer up to its end mark "$" (what the task scores)."""
        text = self.decode(ids)
        return text[:text.index("$") + 1] if "$" in text else text

    @property
    def vocab(self) -> NumberVocab:
        return NumberVocab(SYMBOLS, self.tokenization)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def seq_len(self) -> int:
        _, runs, symbols = PROBLEMS[self.problem]
        n = self.digits
        return (sum(pieces_in_run(r, self.tokenization) for r in runs(n) if r > 0)
                + (symbols(n) if callable(symbols) else symbols))

    def check(self) -> None:
        if self.problem not in PROBLEMS:
            raise ValueError(f"nupa: problem must be one of {', '.join(PROBLEMS)}, got {self.problem!r}")
        if not (1 <= self.digits <= MAX_DIGITS):
            raise ValueError(f"nupa: digits must be in [1, {MAX_DIGITS}], got {self.digits}")
        if self.tokenization not in TOKENIZATIONS:
            raise ValueError(f"nupa: tokenization must be one of {', '.join(TOKENIZATIONS)}, "
                             f"got {self.tokenization!r}")

    def example(self, gen: np.random.Generator) -> tuple[str, str]:
        """One (question, answer) pair as text, drawn with gen."""
        return PROBLEMS[self.problem][0](gen, self.digits)

    def sample(self, batch_size: int, gen: np.random.Generator) -> Batch:
        T, vocab = self.seq_len, self.vocab
        content = torch.full((batch_size, T), BOS, dtype=torch.int64)
        is_answer = torch.zeros(batch_size, T, dtype=torch.bool)
        for row in range(batch_size):
            question, answer = self.example(gen)
            q, a = vocab.encode(question + "="), vocab.encode(answer + "$")
            content[row, T - len(q) - len(a):] = torch.tensor(q + a)
            is_answer[row, T - len(a):] = True
        return Batch.from_content(content, is_answer)

