"""A table from Nsight Compute's text report: one row per profiled kernel launch.

    ncu --clock-control none --section LaunchStats --section Occupancy --section SpeedOfLight \
        --section SchedulerStats --section WarpStateStats python3 benchmarks/ncu_kernel.py delta \
        > ncu_delta.log
    python3 benchmarks/ncu_summary.py ncu_delta.log

Columns: duration, grid and block, registers, the block limits by registers and by shared
memory, waves per SM, achieved occupancy, DRAM throughput, issued warps per scheduler, and
the warp cycles per issued instruction. Sections that were not collected show '-'.

When to run it: on the text report of an ncu run of ncu_kernel.py.
"""
from __future__ import annotations

import re
import sys

METRICS = {  # column -> the metric's name in the report
    "us": "Duration", "regs": "Registers Per Thread", "lim_reg": "Block Limit Registers",
    "lim_smem": "Block Limit Shared Mem", "waves": "Waves Per SM",
    "occ%": "Achieved Occupancy", "dram%": "DRAM Throughput",
    "issue": "Issued Warp Per Scheduler", "cyc/inst": "Warp Cycles Per Issued Instruction",
}
HEADER = re.compile(r"^  (\S+) \(([\d, ]+)\)x\(([\d, ]+)\), Context")


def parse(text: str) -> list[dict]:
    rows, row = [], None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            row = {"kernel": m.group(1), "grid": m.group(2).replace(" ", ""),
                   "block": m.group(3).replace(" ", "")}
            rows.append(row)
            continue
        if row is None:
            continue
        for col, name in METRICS.items():
            m = re.match(rf"^\s+{re.escape(name)}\s+(?:\S+\s+)?([\d.,]+)\s*$", line)
            if m and col not in row:
                row[col] = m.group(1).replace(",", "")
    return rows


def main(paths: list[str]) -> int:
    cols = ["kernel", "grid", "block", *METRICS]
    for path in paths:
        rows = parse(open(path).read())
        print(f"== {path}: {len(rows)} launches")
        print("  ".join(f"{c:>10}" if c != "kernel" else f"{c:<28}" for c in cols))
        for r in rows:
            print("  ".join(f"{r.get(c, '-'):>10}" if c != "kernel" else f"{r[c][:28]:<28}"
                            for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
