"""Packed sequences (cu_seqlens) as one padded batch, for the chunked PyTorch path.

`reference.over_sequences` runs an op once per packed sequence: a Python loop over the N
sequences, each a handful of small tensor ops per chunk. `run_packed` instead scatters the
packed [1, TT, H, ...] inputs into a dense batch [N, Tpad, H, ...] (Tpad: the longest
sequence rounded up to the op's chunk length), runs the op's dense code once from the N
initial states, and gathers the real positions back to [1, TT, H, V].

Why the results are the loop's: sequence n fills row n from position 0, so its chunk
boundaries fall where the loop puts them; the padding comes after its last token, so no real
output reads it (the ops are causal); and each padding slot holds the caller's fill values,
chosen so that the padded step is an exact identity step of the recurrence (the state passes
unchanged, in floating point too: every padded term is a product with an exact zero and
every padded decay exp(0) = 1). The final state of row n is then its state after its last
real token. The fills per op are stated and tested in linattn.ops.torch_chunked and
tests/ops/test_varlen.py.

Padding costs work: N * Tpad tokens are computed for TT real ones. `use_padded_batch` takes
the batch only while that waste is bounded and otherwise keeps the loop (one long sequence
among many short ones would pad every short one to the long one's length).

One host read of cu_seqlens (the loop needs it too); the scatter and gather indices are
built from cu_seqlens on its device. Gradients flow through index_copy / index_select.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .reference import over_sequences

VARLEN_MODES = ("auto", "padded", "loop")  # auto: use_padded_batch decides

# use_padded_batch's default rule (its docstring explains both).
MAX_PAD_RATIO = 2.0
PER_SEQUENCE_TOKENS = 64


def padded_length(longest: int, chunk: int) -> int:
    """The longest length rounded up to a whole number of chunks."""
    return -(-longest // chunk) * chunk


def use_padded_batch(lengths: Sequence[int], chunk: int, *, max_ratio: float = MAX_PAD_RATIO,
                     per_sequence_tokens: int = PER_SEQUENCE_TOKENS) -> bool:
    """Whether N sequences of these lengths run faster as one padded batch than in a loop.

    Both cost about the same per computed token; the padded batch computes N * Tpad tokens,
    the loop the sum of the lengths plus a fixed cost per sequence (Python and one small op
    launch per tensor op per chunk, forward and backward), which on the CPU at MoM's head
    sizes (K 8-16) is about what one chunk of padded tokens costs. The batch is taken when
        N * Tpad <= max_ratio * sum(lengths) + per_sequence_tokens * N,
    which keeps its size, memory included, within a constant of the loop's whatever the
    lengths: MoM's memories (similar lengths, padded to the longest) take the batch, and one
    sequence of length 10^4 among a hundred of length 1 (N * Tpad ~ 10^6 against ~2 10^4)
    keeps the loop.
    """
    N = len(lengths)
    if N == 0:
        return False
    t_pad = padded_length(max(lengths), chunk)
    return N * t_pad <= max_ratio * sum(lengths) + per_sequence_tokens * N


@dataclass(frozen=True)
class PaddedLayout:
    """Where the TT packed tokens sit in a padded batch [N, t_pad]: token p of sequence n
    (position p - cu[n] in it) goes to row-major slot dest[p] = n * t_pad + p - cu[n]."""
    n: int
    t_pad: int
    dest: torch.Tensor  # [TT] int64, on cu_seqlens' device

    def scatter(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """[1, TT, ...] -> [N, t_pad, ...], padding slots = fill (in x's dtype)."""
        base = x.new_full((self.n * self.t_pad, *x.shape[2:]), fill)
        return base.index_copy(0, self.dest, x[0]).view(self.n, self.t_pad, *x.shape[2:])

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """[N, t_pad, ...] -> [1, TT, ...]: the real positions, in packed order."""
        return y.reshape(self.n * self.t_pad, *y.shape[2:]).index_select(0, self.dest)[None]


def padded_layout(cu_seqlens: torch.Tensor, lengths: Sequence[int], chunk: int) -> PaddedLayout:
    """The layout of cu_seqlens [N+1] whose lengths (read on the host) are given."""
    dev = cu_seqlens.device
    n, total = len(lengths), sum(lengths)
    t_pad = padded_length(max(lengths), chunk)
    cu = cu_seqlens.to(torch.long)
    seq = torch.repeat_interleave(torch.arange(n, device=dev), cu[1:] - cu[:-1],
                                  output_size=total)                          # [TT]
    dest = torch.arange(total, device=dev) + seq * t_pad - cu[seq]
    return PaddedLayout(n, t_pad, dest)


def run_packed(run, cu_seqlens, tensors, fills, initial_state, output_final_state, out_dtype,
               *, chunk: int, mode: str = "auto"):
    """over_sequences' contract (linattn.ops.reference), run as one padded batch when mode
    is "padded", or "auto" and use_padded_batch agrees; else the per-sequence loop.

    fills: one identity-step fill value per tensor (ignored for None tensors). A per-head
    tensor ([H]) is expanded to [1, TT, H] first, so that its padding slots take the fill.
    run(*tensors, state) must accept a batch of N rows and initial_state [N, ...] (a tuple
    of them, or None)."""
    if mode not in VARLEN_MODES:
        raise ValueError(f"varlen mode must be one of {VARLEN_MODES}, got {mode!r}")
    if cu_seqlens is None:
        return over_sequences(run, None, tensors, initial_state, output_final_state, out_dtype)
    offsets = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(offsets[:-1], offsets[1:])]
    if mode == "loop" or (mode == "auto" and not use_padded_batch(lengths, chunk)):
        return over_sequences(run, offsets, tensors, initial_state, output_final_state,
                              out_dtype)
    layout = padded_layout(cu_seqlens, lengths, chunk)
    total = offsets[-1]
    dense = []
    for t, fill in zip(tensors, fills):
        if t is not None and t.dim() == 1:
            t = t.view(1, 1, -1).expand(1, total, -1)
        dense.append(None if t is None else layout.scatter(t, fill))
    o, st = run(*dense, initial_state)
    return layout.gather(o).to(out_dtype), (st if output_final_state else None)
