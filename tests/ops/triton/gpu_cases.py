"""Shared plan of the GPU tests (`pytest -m gpu`): few kernel specialisations, many cases.

Triton compiles a kernel once per specialisation: every constexpr (dtype, gate kind, flags
such as HAS_H0 or NONCAUSAL, the tiles BK/BV that the launchers derive from the head dims)
and, for each plain int argument, whether it equals 1 or is a multiple of 16 (H, K, V, and
in the gated backward the packed token count TT). On the H200 a cold specialisation of one
op costs seconds to tens of seconds of CPU (float32 far more than bfloat16: its exact
"ieee" dots unroll into long FMA code), while a case on an already compiled one costs only
its float64 oracle on the CPU. So the GPU tests
- put every axis of docs/design.md section 5 onto one shared shape per (op variant, dtype): T
  through one packed call of all the short lengths, plus a few B x T calls; log-decay
  ranges, q and v x5, states, varlen, non-contiguous inputs on that same shape;
- keep H = 2 (neither 1 nor a multiple of 16) and every packed token count a multiple of
  16 (see `packed`), so no case adds an int specialisation by accident;
- cover the head dims with a few extra shapes, bfloat16 where the tiles are wide;
- group the checks of one specialisation into one test function, so one process compiles
  it once (the disk cache does not stop two xdist workers compiling the same kernel at once).
"""
from __future__ import annotations

import pytest

# Every short T of section 5, an empty and a length-1 sequence, and a multi-chunk sequence
# (300 > the gated chunk of 128 and the delta chunk of 64).
SHORT_LENGTHS = (0, 1, 2, 15, 63, 64, 65, 127, 300)

# Per-test limits (pytest-timeout), seconds: a cold compile of the test's kernels on a busy
# machine with margin (see benchmarks/gpu_check.sh for the measured costs).
DECODE_TIMEOUT = 120
GATED_TIMEOUT = 240
DELTA_TIMEOUT = 300


def packed(lengths, multiple: int = 16) -> list[int]:
    """lengths, plus one filler sequence so the packed total is a multiple of `multiple`
    (the token count TT is a specialised int argument: keep its class fixed)."""
    lengths = list(lengths)
    pad = -sum(lengths) % multiple
    return lengths + ([pad] if pad else [])


def gpu(timeout_s: int):
    """Marks a GPU test, with its own pytest-timeout limit."""
    def mark(fn):
        return pytest.mark.gpu(pytest.mark.timeout(timeout_s)(fn))
    return mark
