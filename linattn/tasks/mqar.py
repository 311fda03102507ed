"""Multi-query associative recall (MQAR, Zoology): store key-value pairs, answer key queries.

Two layouts (knob `layout`):

"linattn" (default; T = seq_len tokens of content, shifted behind BOS by Batch.from_content):

    k1 v1 k2 v2 ... kP vP | filler ... kq vq ... filler ... kq' vq' ...

    The first 2P tokens are P pairs with distinct keys; the rest is cut into 2-token slots, of
    which `queries` (default: P) hold a queried key followed by its value, the others hold BOS
    filler. Each key is queried at most once, in random order. The scored answer tokens are
    the values after queried keys. Keys in [1, 1 + nk), values in [1 + nk, vocab) with
    nk = (vocab - 1) // 2.

"zoology" (Zoology's `multiquery_ar`, Arora et al., 2023, with random_non_queries=False as
    its figure-2 configs use; no BOS, input_ids are the sequence itself):

    input_ids  k1 v1 ... kP vP | 0 .. 0 kq 0 .. 0 kq' 0 ...      (T = seq_len, even)
    targets                           vq        vq'              (scored where a key is queried)

    Keys are P distinct ids in [1, vocab // 2), values P distinct ids in [vocab // 2, vocab).
    Every key is queried once: the query region (the T - 2P tokens after the pairs) is cut
    into (T - 2P) // 2 two-token slots, and P distinct slots are drawn without replacement
    with P(slot i) proportional to (i + 1) ** (power_a - 1) (power_a = 0.01: queries crowd
    near the start of the region, as repeated bigrams do in text); pair j goes to the j-th
    slot drawn. The query key is at the slot's first token, and the model must emit the
    value at that same position (the next input token stays 0). Needs 4P <= T.

Fixed example sets (knobs train_examples, test_examples; 0 = unlimited): by default every
training step draws a fresh batch, batch `index` a pure function of (seed, index) (see
linattn.tasks.batch). With train_examples = N > 0 the training data is a fixed set of N
examples, as Zoology's: example i is a pure function of (seed, i) (generated in blocks of
BLOCK examples, each block from its own generator), and epoch e visits the set in an order
that is a pure function of (seed, e), in floor(N / batch_size) batches (the last partial batch
of each epoch is dropped; the next epoch's order differs). So step s of a run is still a
pure function of (seed, s): epoch s // steps_per_epoch, batch s % steps_per_epoch of that
epoch's order, and a resumed run sees the same data. "Epochs over a fixed set" become steps
= epochs * steps_per_epoch(batch_size). With test_examples = M > 0, test batch `index` is
examples [index * batch_size, (index + 1) * batch_size) of a fixed test set of M examples
(the last one shorter), so ceil(M / batch_size) batches cover it. The train and test sets
come from disjoint generator streams (the split enters every seed), so they share examples
only by chance (Zoology's sets, from seeds s and s + 10, likewise).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .base import Task, randint, random_choice_rows
from .batch import BOS, SPLITS, Batch

LAYOUTS = ("linattn", "zoology")
ZOOLOGY_KNOBS = ("layout", "power_a", "train_examples", "test_examples")
BLOCK = 1024  # examples of a fixed set generated together (one generator per block)
_BLOCK_TAG, _ORDER_TAG = 0x5E7B10C, 0x0EB0C4  # seed-sequence words that keep the streams apart


@dataclass
class MQAR(Task):
    name = "mqar"
    pairs: int = 8
    seq_len: int = 64
    vocab: int = 64
    queries: int = 0  # 0: one query per pair
    layout: str = "linattn"
    power_a: float = 0.01  # zoology layout: power law of the query slots
    train_examples: int = 0  # 0: a fresh batch every step; N: a fixed set of N examples
    test_examples: int = 0  # 0: unlimited test batches; M: a fixed test set of M examples

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def to_dict(self) -> dict:
        """Task.to_dict without the zoology-protocol knobs left at their defaults, so a
        default MQAR writes the config.json it always wrote."""
        d = super().to_dict()
        for knob in ZOOLOGY_KNOBS:
            if d[knob] == MQAR.knobs()[knob]:
                del d[knob]
        return d

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
        """The pairs and the queries with no filler between them: T = 2P + 2Q (the zoology
        layout and fixed sets have no shorter form: themselves)."""
        if self.layout != "linattn" or self.train_examples:
            return self
        return replace(self, seq_len=2 * self.pairs + 2 * self.num_queries)

    def check(self) -> None:
        if self.pairs < 1:
            raise ValueError(f"mqar: pairs must be >= 1, got {self.pairs}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"mqar: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        for knob in ("train_examples", "test_examples"):
            if getattr(self, knob) < 0:
                raise ValueError(f"mqar: {knob} must be >= 0 (0: unlimited), got {getattr(self, knob)}")
        if self.layout == "zoology":
            self._check_zoology()
            return
        if self.num_keys < self.pairs:
            raise ValueError(f"mqar: vocab={self.vocab} has {self.num_keys} keys, fewer than "
                             f"pairs={self.pairs} (need vocab >= {2 * self.pairs + 1})")
        if not (0 <= self.queries <= self.pairs):
            raise ValueError(f"mqar: queries must be in [0, pairs={self.pairs}], got {self.queries}")
        need = 2 * self.pairs + 2 * self.num_queries
        if self.seq_len < need:
            raise ValueError(f"mqar: seq_len={self.seq_len} is too short for {self.pairs} pairs "
                             f"and {self.num_queries} queries (need >= {need})")

    def _check_zoology(self) -> None:
        P, T = self.pairs, self.seq_len
        if self.queries not in (0, P):
            raise ValueError(f"mqar: the zoology layout queries every pair: queries must be 0 or "
                             f"pairs={P}, got {self.queries}")
        if T % 2 or T < 4 * P:
            raise ValueError(f"mqar: the zoology layout needs an even seq_len >= 4 * pairs = {4 * P}, "
                             f"got {T}")
        if self.vocab // 2 - 1 < P:
            raise ValueError(f"mqar: vocab={self.vocab} has {self.vocab // 2 - 1} keys, fewer than "
                             f"pairs={P} (need vocab >= {2 * P + 2})")
        if not (isinstance(self.power_a, (int, float)) and 0 < self.power_a <= 1):
            raise ValueError(f"mqar: power_a must be in (0, 1] (1: uniform slots), got {self.power_a!r}")

    # ------------------------------------------------------------------ generators

    def sample(self, batch_size: int, gen: np.random.Generator) -> Batch:
        if self.layout == "zoology":
            return self._sample_zoology(batch_size, gen)
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

    def slot_probabilities(self) -> np.ndarray:
        """[(T - 2P) // 2] float64: the zoology layout's power law over query slots."""
        space = (self.seq_len - 2 * self.pairs) // 2
        p = np.arange(1, space + 1, dtype=np.float64) ** (self.power_a - 1)
        return p / p.sum()

    def _sample_zoology(self, batch_size: int, gen: np.random.Generator) -> Batch:
        B, P, T, half = batch_size, self.pairs, self.seq_len, self.vocab // 2
        keys = 1 + _distinct_rows(gen, B, half - 1, P)                       # [B, P] in [1, half)
        values = half + _distinct_rows(gen, B, self.vocab - half, P)         # [B, P] in [half, vocab)
        # P slots without replacement, weighted: the Gumbel top-k draw, in draw order
        log_p = np.log(self.slot_probabilities())                            # [space]
        scores = log_p[None] + gen.gumbel(size=(B, log_p.size))              # [B, space]
        slots = torch.from_numpy(np.argsort(-scores, axis=1, kind="stable")[:, :P].astype(np.int64))
        pos = 2 * P + 2 * slots                                              # [B, P] query key j

        ids = torch.zeros(B, T, dtype=torch.int64)
        ids[:, 0:2 * P:2] = keys
        ids[:, 1:2 * P:2] = values
        ids.scatter_(1, pos, keys)
        targets = torch.cat([ids[:, 1:], ids.new_zeros(B, 1)], 1)            # next token, but:
        targets.scatter_(1, pos, values)                                     # a query's value
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask.scatter_(1, pos, True)
        return Batch(ids, targets, mask)

    # ------------------------------------------------------------------ fixed sets

    def steps_per_epoch(self, batch_size: int) -> int:
        """Training steps that visit the fixed training set once (partial batch dropped)."""
        if not self.train_examples:
            raise ValueError("mqar: epochs need a fixed training set (train_examples > 0)")
        if batch_size > self.train_examples:
            raise ValueError(f"mqar: batch_size={batch_size} exceeds train_examples={self.train_examples}")
        return self.train_examples // batch_size

    def batch(self, split: str, seed: int, index: int, batch_size: int) -> Batch:
        n = {"train": self.train_examples, "test": self.test_examples}.get(split, 0)
        if not n:
            return super().batch(split, seed, index, batch_size)
        if batch_size < 1 or index < 0:
            raise ValueError(f"batch_size must be >= 1 and index >= 0, got {batch_size}, {index}")
        if split == "test":
            rows = np.arange(index * batch_size, min((index + 1) * batch_size, n))
            if rows.size == 0:
                raise ValueError(f"mqar: test batch {index} of {batch_size} is past the fixed test set "
                                 f"of {n} examples ({-(-n // batch_size)} batches)")
        else:
            epoch, j = divmod(index, self.steps_per_epoch(batch_size))
            rows = self._epoch_order(seed, epoch)[j * batch_size:(j + 1) * batch_size]
        return self.examples(split, seed, rows)

    def examples(self, split: str, seed: int, rows) -> Batch:
        """Examples `rows` (ints in [0, N)) of the fixed set of `split` under `seed`."""
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        full = self._fixed_set(split, seed)
        return Batch(full.input_ids[rows].long(), full.targets[rows].long(), full.answer_mask[rows])

    def _cache(self) -> dict:
        """This task's generated sets, kept on the instance (dropped when a knob changes)."""
        cache = self.__dict__.get("_fixed_cache")
        key = tuple(sorted(self.to_dict().items()))
        if cache is None or cache["key"] != key:
            cache = {"key": key, "sets": {}, "order": None}
            self.__dict__["_fixed_cache"] = cache
        return cache

    def _fixed_set(self, split: str, seed: int) -> Batch:
        """The whole fixed set of `split` under `seed`, generated once in blocks of BLOCK
        examples, block b from its own generator (ids kept as int16 when the vocabulary fits)."""
        sets = self._cache()["sets"]
        if (split, seed) not in sets:
            n = self.train_examples if split == "train" else self.test_examples
            small = torch.int16 if self.vocab <= 2**15 else torch.int64
            parts = []
            for block in range(-(-n // BLOCK)):
                gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                    [_BLOCK_TAG, SPLITS[split], seed, block])))
                b = self.sample(min(BLOCK, n - block * BLOCK), gen)
                parts.append((b.input_ids.to(small), b.targets.to(small), b.answer_mask))
            sets[(split, seed)] = Batch(*(torch.cat(p) for p in zip(*parts)))
        return sets[(split, seed)]

    def _epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """[N] int64: the order in which epoch `epoch` visits the training set."""
        cache = self._cache()
        if cache["order"] is None or cache["order"][0] != (seed, epoch):
            gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_ORDER_TAG, seed, epoch])))
            cache["order"] = ((seed, epoch), gen.permutation(self.train_examples))
        return cache["order"][1]


def _distinct_rows(gen: np.random.Generator, rows: int, population: int, k: int) -> torch.Tensor:
    """[rows, k] int64: each row k distinct values from range(population), uniform over the
    ordered k-tuples of distinct values: rows with a repeat are drawn again (when k^2 <= 2
    population, so that at most ~40% of the rows repeat a value); otherwise the k smallest of
    uniform scores, in score order."""
    if k * k > 2 * population:
        scores = gen.random((rows, population))                              # [rows, population]
        part = np.argpartition(scores, k - 1, axis=1)[:, :k] if k < population else \
            np.tile(np.arange(population), (rows, 1))
        order = np.argsort(np.take_along_axis(scores, part, axis=1), axis=1)
        return torch.from_numpy(np.take_along_axis(part, order, axis=1).astype(np.int64))
    out = gen.integers(0, population, size=(rows, k))                       # [rows, k]
    while True:
        s = np.sort(out, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
        if bad.size == 0:
            return torch.from_numpy(out.astype(np.int64))
        out[bad] = gen.integers(0, population, size=(bad.size, k))
