"""One kernel of one op's forward+backward under Nsight Compute, for its stall reasons.

    ncu --clock-control none --kernel-name regex:bwd_states --launch-count 1 \
        --section WarpStateStats --section SchedulerStats --section Occupancy \
        python3 benchmarks/ncu_kernel.py const_frozen

Runs one bf16 forward+backward of the kind (profile_kernels' kinds, the bench's shape unless
--T etc. say otherwise) and synchronises; ncu picks the kernel. Not a benchmark: ncu replays
the kernel and serialises it.

When to run it: under ncu when profile_kernels.py shows a kernel far from its floor and its
stall reasons are the question; summarise the report with ncu_summary.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_kernels  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=profile_kernels.GATED + profile_kernels.DELTA)
    profile_kernels.add_shape_args(ap)
    args = ap.parse_args()
    step = profile_kernels.fwd_bwd_step(args.kind, args.B, args.T, args.H, args.D)
    step()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
