"""The shape every synthetic task shares: a dataclass of knobs plus a seeded generator.

A task subclass declares its knobs as dataclass fields and implements `vocab_size`,
`seq_len`, `check()` (raise ValueError for knobs that cannot work) and `sample(batch_size,
gen)` drawing only from the numpy generator `gen`. Everything else (seeded batches, serialisation) lives here once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from .batch import BOS, Batch, generator_for


@dataclass
class Task:
    name = "task"  # class attribute, not a knob

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        """T of the generated [B, T] tensors."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise ValueError (one line naming the knob) if the knobs cannot make a task."""
        raise NotImplementedError

    def sample(self, batch_size: int, gen: np.random.Generator) -> Batch:
        """A Batch of `batch_size` examples drawn with the numpy generator `gen`."""
        raise NotImplementedError

    def shortest(self) -> "Task":
        """The same task at its shortest sequence length (for a sequence-length warm-up);
        tasks whose length is fixed by their knobs return themselves."""
        return self

    @property
    def chance(self) -> float | None:
        """Answer-token accuracy of a uniform guess among the values an answer token can take
        (the floor a trained model should beat); None when a task does not say."""
        return None

    @property
    def answer_len(self) -> int | None:
        """How many tokens answer one prompt (what `linattn generate` emits by default);
        None when a task does not say."""
        return None

    # Text form of the tokens, for prompts (`linattn generate`): token_names()[id] is the
    # text of token id; "char" tasks write one character per token and ignore whitespace,
    # "word" tasks separate tokens by whitespace.
    text_unit = "word"

    def token_names(self) -> list[str]:
        """The text of every token id (index = id), vocab_size names, "_" for BOS."""
        raise NotImplementedError(f"task {self.name} has no text form")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` in the task's text form (see token_names); ValueError naming
        the first piece of text that is not a token."""
        names = self.token_names()
        ids = {n: i for i, n in enumerate(names)}
        pieces = list("".join(text.split())) if self.text_unit == "char" else text.split()
        bad = [p for p in pieces if p not in ids]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a token of task {self.name} "
                             f"(its tokens: {_summary(names)})")
        return [ids[p] for p in pieces]

    def decode(self, ids) -> str:
        """Text of token ids (ints or a 1-D tensor); encode(decode(ids)) == ids."""
        names = self.token_names()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(names)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside task {self.name}'s vocabulary "
                             f"[0, {len(names)})")
        return ("" if self.text_unit == "char" else " ").join(names[i] for i in ids)

    def prompt_ids(self, text: str) -> list[int]:
        """The ids a model reads for the prompt `text`, as training laid them out: BOS, then
        the prompt's tokens (tasks that left-pad their sequences pad here too)."""
        return [BOS, *self.encode(text)]

    def answer_text(self, ids) -> str:
        """The text of generated answer ids, as a reader wants it (default: decode(ids))."""
        return self.decode(ids)

    # ------------------------------------------------------------------ shared behaviour

    def validate(self) -> "Task":
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, int) and not isinstance(f.default, bool):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"task {self.name}: {f.name} must be an integer, got {value!r}")
        self.check()
        return self

    def batch(self, split: str, seed: int, index: int, batch_size: int) -> Batch:
        """Batch `index` of `split` ("train"/"test") under run `seed`: a pure function of its
        arguments (see linattn.tasks.batch). Tensors are on the CPU: [B, T] int64/bool."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self.sample(batch_size, generator_for(split, seed, index))

    @classmethod
    def knobs(cls) -> dict:
        """Knob name -> default value."""
        return {f.name: f.default for f in fields(cls)}

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def randint(gen: np.random.Generator, low: int, high: int, shape) -> torch.Tensor:
    """Uniform int64 tensor in [low, high) drawn from `gen`, of `shape`."""
    return torch.from_numpy(gen.integers(low, high, size=tuple(shape), dtype=np.int64))


def random_choice_rows(gen: np.random.Generator, rows: int, population: int, k: int) -> torch.Tensor:
    """[rows, k] int64: each row k distinct values from range(population), in random order."""
    scores = gen.random((rows, population))  # [rows, population]
    return torch.from_numpy(scores.argsort(axis=1)[:, :k].astype(np.int64))


def _summary(names: list[str], limit: int = 24) -> str:
    """The token names for an error message, the middle elided when there are many."""
    if len(names) <= limit:
        return " ".join(names)
    return " ".join(names[:limit // 2]) + " ... " + " ".join(names[-limit // 4:])
