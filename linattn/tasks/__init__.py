"""Synthetic tasks that separate linear-attention architectures, generated from a seed.

Every task is a dataclass of knobs with `.batch(split, seed, index, batch_size)` returning a
`Batch` (input_ids, targets [B, T] int64, answer_mask [B, T] bool, answer_index [N] int64:
the mask's positions as flat indices; see tasks.batch): a pure function of its arguments,
with train and test batches drawn from disjoint seeds. Loss and accuracy count answer tokens
only.

    mqar        multi-query associative recall (knobs: pairs, seq_len, vocab, queries)
    arithmetic  n-digit by m-digit add / sub / mul (digits, digits_b, op, order, tokenization)
    nupa        number understanding: 13 Number Cookbook problems (problem, digits, tokenization)
    compare     which of two decimals is larger (int_digits, frac_digits)
    copy        selective copying of marked tokens out of noise (copy_len, seq_len, vocab)
    text        byte-level language modelling on a directory or file of text (corpus, seq_len)
"""
from __future__ import annotations

from .arithmetic import Arithmetic
from .base import Task
from .batch import Batch, batch_seed
from .compare import Compare
from .copy import SelectiveCopy
from .mqar import MQAR
from .nupa import Nupa
from .text import Text

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (MQAR, Arithmetic, Compare, SelectiveCopy, Nupa, Text)}


def make_task(name: str, **knobs) -> Task:
    """The task `name` with the given knobs, validated. ValueError on an unknown name or knob,
    or knobs that cannot make the task."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    cls = TASKS[name]
    unknown = sorted(set(knobs) - set(cls.knobs()))
    if unknown:
        raise ValueError(f"task {name} has no knob {', '.join(unknown)} "
                         f"(its knobs: {', '.join(cls.knobs())})")
    return cls(**knobs).validate()


def task_from_dict(d: dict) -> Task:
    """Inverse of Task.to_dict()."""
    d = dict(d)
    return make_task(d.pop("name"), **d)


__all__ = ["Task", "Batch", "TASKS", "make_task", "task_from_dict", "batch_seed",
           "MQAR", "Arithmetic", "Compare", "SelectiveCopy", "Nupa", "Text"]
