"""What every task generator returns, and how batches are seeded.

A task builds `content` [B, T] (the tokens a model should read and emit) and a boolean
`is_answer` [B, T] marking the tokens it is scored on. `Batch.from_content` turns that into
next-token form: input_ids = [BOS, content[:-1]] and targets = content, so the logits at
position t predict targets[t] and loss/accuracy count only where answer_mask is True.

A Batch also carries `answer_index`, the answer positions as flat indices into B * T,
computed from the mask where the batch is built (on the CPU) and moved with it: the trainer
gathers the answer rows with them, N = answer_count known on the host, so a step on the GPU
never waits for the device to count the mask.

Seeding: a batch is a pure function of (split, seed, index) -- no generator state carries
over from one batch to the next, so a resumed run sees exactly the data an uninterrupted run
would. Train and test batches come from disjoint seed sets by construction: the batch seed
is ((seed * 2**32 + index) * 2 + split_bit), even for "train", odd for "test", and it is
the whole entropy of a numpy PCG64 generator (torch's CPU generator keeps only 32 bits of
a seed, which would make distinct batch seeds collide).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

BOS = 0  # token 0 is BOS/padding in every task's vocabulary
SPLITS = {"train": 0, "test": 1}
MAX_INDEX = 2**32  # batch indices (training steps) per seed
MAX_SEED = 2**30  # so that every batch seed fits torch's 63-bit seeds


@dataclass(frozen=True)
class Batch:
    """One batch of a synthetic task.

    input_ids:    [B, T] int64, what the model reads (starts with BOS)
    targets:      [B, T] int64, the token to predict at each position (the next token)
    answer_mask:  [B, T] bool, True where targets[t] is an answer token (scored)
    answer_index: [N] int64, the mask's True positions as flat indices b * T + t, in
                  row-major order (mask.nonzero()'s); computed from answer_mask when not
                  given (a host read of the mask: build batches on the CPU, then move them)
    answer_count: N, a Python int (the index's length: no device read)
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    answer_mask: torch.Tensor
    answer_index: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.answer_index is None:
            object.__setattr__(self, "answer_index", answer_positions(self.answer_mask))

    @property
    def answer_count(self) -> int:
        return self.answer_index.shape[0]

    @staticmethod
    def from_content(content: torch.Tensor, is_answer: torch.Tensor) -> "Batch":
        """content: [B, T] int64 tokens; is_answer: [B, T] bool. Returns the shifted Batch."""
        bos = torch.full_like(content[:, :1], BOS)
        input_ids = torch.cat([bos, content[:, :-1]], dim=1)  # [B, T]
        return Batch(input_ids, content.clone(), is_answer.clone())

    def at_answers(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] at the answer positions: [N, ...] in answer_index's order."""
        return x.flatten(0, 1).index_select(0, self.answer_index)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.targets.to(device), self.answer_mask.to(device),
                     self.answer_index.to(device))


def answer_positions(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] bool -> [N] int64: the flat indices b * T + t of its True entries, in
    row-major order (mask.nonzero()'s rows as b * T + t)."""
    if mask.dim() != 2:
        raise ValueError(f"answer_mask must be [B, T], got shape {tuple(mask.shape)}")
    return mask.reshape(-1).nonzero().squeeze(1)


def batch_seed(split: str, seed: int, index: int) -> int:
    """The generator seed of batch `index` of `split` ("train" or "test") under run `seed`.

    Train seeds are even and test seeds odd, so the two sets never meet; distinct
    (seed, index) pairs give distinct seeds for 0 <= index < 2**32.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if not (0 <= index < MAX_INDEX):
        raise ValueError(f"batch index must be in [0, 2**32), got {index}")
    if not (0 <= seed < MAX_SEED):
        raise ValueError(f"seed must be in [0, 2**30), got {seed}")
    return (seed * MAX_INDEX + index) * 2 + SPLITS[split]  # < 2**63


def generator_for(split: str, seed: int, index: int) -> np.random.Generator:
    """A fresh numpy generator for batch `index` of `split` (see batch_seed)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(batch_seed(split, seed, index))))


def digits_of(numbers, width: int, reverse: bool) -> list[int]:
    """Decimal digits of each non-negative int, zero-padded to `width` (most significant first,
    or least significant first when reverse). Returns one flat list of len(numbers) * width."""
    out: list[int] = []
    for n in numbers:
        s = str(int(n)).rjust(width, "0")
        if len(s) > width:
            raise ValueError(f"{n} does not fit in {width} digits")
        out.extend(int(c) for c in (s[::-1] if reverse else s))
    return out
