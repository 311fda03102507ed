"""How the number tasks turn text such as "123+45=168" into token ids: digits one per token or
in groups of three, grouped left-to-right or right-to-left.

A task writes its content as a string of decimal digits and single-character symbols; a
`NumberVocab` maps it to ids. Every maximal run of digits is cut into pieces:

    tokenization "digit"  one token per digit                 "12345" -> 1 2 3 4 5
    tokenization "l2r3"   groups of 3 from the left           "12345" -> 123 45
    tokenization "r2l3"   groups of 3 from the right          "12345" -> 12 345

"l2r3" is how GPT-3.5/4-era tokenizers cut numbers; "r2l3" aligns the groups with place value
(thousands), which Singh & Strouse ("Tokenization counts", 2024) found makes frontier models
add far more accurately. A piece is a string of 1-3 digits and "5", "05" and "005" are
different tokens, as in those tokenizers, so a grouped vocabulary has 10 + 100 + 1000 digit
pieces. A run is tokenized as it is written: a reversed answer ("168" written "861") is
grouped after the reversal.

Ids: 0 = BOS/padding, then the digit pieces (digit d = 1 + d in "digit" mode; in grouped
modes piece s = 1 + OFFSET[len(s)] + int(s)), then the symbols in the order given.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TOKENIZATIONS = ("digit", "l2r3", "r2l3")
GROUP = 3
OFFSET = {1: 0, 2: 10, 3: 110}  # grouped modes: first id (less 1) of the pieces of each length
GROUPED_PIECES = 10 + 100 + 1000


def split_run(run: str, tokenization: str) -> list[str]:
    """The pieces of one run of digits under `tokenization` (see the module docstring)."""
    if tokenization == "digit":
        return list(run)
    if tokenization == "l2r3":
        return [run[i:i + GROUP] for i in range(0, len(run), GROUP)]
    head = len(run) % GROUP  # r2l3: the short piece, if any, comes first
    return ([run[:head]] if head else []) + [run[i:i + GROUP] for i in range(head, len(run), GROUP)]


def pieces_in_run(length: int, tokenization: str) -> int:
    """How many tokens a run of `length` digits becomes."""
    return length if tokenization == "digit" else -(-length // GROUP)


@dataclass(frozen=True)
class NumberVocab:
    """Token ids of number text under one tokenization.

    symbols: the non-digit characters the text may hold (each a single character, no digit).
    tokenization: "digit", "l2r3" or "r2l3".
    """

    symbols: tuple[str, ...]
    tokenization: str = "digit"
    _symbol_id: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization must be one of {', '.join(TOKENIZATIONS)}, "
                             f"got {self.tokenization!r}")
        for s in self.symbols:
            if len(s) != 1 or s.isdigit():
                raise ValueError(f"symbols must be single non-digit characters, got {s!r}")
        object.__setattr__(self, "_symbol_id", {s: self.first_symbol + i for i, s in enumerate(self.symbols)})

    @property
    def first_symbol(self) -> int:
        return 1 + (10 if self.tokenization == "digit" else GROUPED_PIECES)

    @property
    def size(self) -> int:
        return self.first_symbol + len(self.symbols)

    def symbol(self, s: str) -> int:
        """The id of symbol s."""
        return self._symbol_id[s]

    def piece_id(self, piece: str) -> int:
        if self.tokenization == "digit":
            return 1 + int(piece)
        return 1 + OFFSET[len(piece)] + int(piece)

    def pieces(self, text: str) -> list[str]:
        """text cut into the strings its tokens stand for."""
        out, i = [], 0
        while i < len(text):
            if text[i].isdigit():
                j = i
                while j < len(text) and text[j].isdigit():
                    j += 1
                out.extend(split_run(text[i:j], self.tokenization))
                i = j
            else:
                out.append(text[i])
                i += 1
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of text (KeyError names a character that is not in the vocabulary)."""
        return [self.piece_id(p) if p[0].isdigit() else self._symbol_id[p] for p in self.pieces(text)]

    def decode(self, ids) -> str:
        """The text that ids stand for; BOS (0) decodes to nothing."""
        out = []
        for t in ids:
            t = int(t)
            if t == 0:
                continue
            if t >= self.first_symbol:
                out.append(self.symbols[t - self.first_symbol])
            elif self.tokenization == "digit":
                out.append(str(t - 1))
            else:
                k = t - 1
                length = 3 if k >= OFFSET[3] else 2 if k >= OFFSET[2] else 1
                out.append(str(k - OFFSET[length]).rjust(length, "0"))
        return "".join(out)


class NumberText:
    """The text form of a task whose tokens come from a NumberVocab (its `vocab` property),
    for prompts (`linattn generate`): the task's text itself, "123+45=" (whitespace ignored,
    "_" for BOS); digits are cut into tokens as the task's tokenization cuts them."""

    def token_names(self) -> list[str]:
        vocab = self.vocab
        return ["_", *(vocab.decode([i]) for i in range(1, vocab.size))]

    def encode(self, text: str) -> list[int]:
        ids = []
        for k, part in enumerate("".join(text.split()).split("_")):
            if k:
                ids.append(0)                                   # "_": BOS
            try:
                ids += self.vocab.encode(part)
            except KeyError as e:
                raise ValueError(f"{e.args[0]!r} is not a token of task {self.name} (its symbols: "
                                 f"digits and {' '.join(self.vocab.symbols)})") from None
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab.size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside task {self.name}'s vocabulary "
                             f"[0, {self.vocab.size})")
        return "".join("_" if i == 0 else self.vocab.decode([i]) for i in ids)
