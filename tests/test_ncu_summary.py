"""benchmarks/ncu_summary.py: one row per kernel launch from Nsight Compute's text report."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import ncu_summary  # noqa: E402

# two launches, abridged from a real report (H200, 2026-11-29); the second lacks the
# scheduler section, and a rule's prose repeats a metric's words (it must not be read)
REPORT = """\
==PROF== Connected to process 1117 (/usr/bin/python3.12)
  bwd_states_kernel (128, 2, 2)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    DRAM Throughput                   %        54.39
    Duration                         us       503.62
    Section: Scheduler Statistics
    Issued Warp Per Scheduler                        0.37
    Section: Warp State Statistics
    Warp Cycles Per Issued Instruction             cycle         7.02
    OPT   the Achieved Occupancy of 16.49 is below the theoretical one
    Section: Launch Statistics
    Grid Size                                                    512
    Registers Per Thread             register/thread             136
    Waves Per SM                                                1.29
    Section: Occupancy
    Block Limit Registers                 block            3
    Block Limit Shared Mem                block            3
    Achieved Occupancy                        %        16.49
  fwd_o_kernel (1024, 1, 16)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Duration                         us     1,234.50
    Registers Per Thread             register/thread             255
"""


def test_rows_per_launch():
    rows = ncu_summary.parse(REPORT)
    assert [r["kernel"] for r in rows] == ["bwd_states_kernel", "fwd_o_kernel"]
    first, second = rows
    assert first["grid"] == "128,2,2" and first["block"] == "128,1,1"
    assert (first["us"], first["regs"], first["lim_reg"], first["lim_smem"], first["waves"]) == (
        "503.62", "136", "3", "3", "1.29")
    assert (first["occ%"], first["dram%"], first["issue"], first["cyc/inst"]) == (
        "16.49", "54.39", "0.37", "7.02")
    assert second["us"] == "1234.50" and second["regs"] == "255" and "waves" not in second


def test_prints_a_table(tmp_path, capsys):
    path = tmp_path / "ncu.log"
    path.write_text(REPORT)
    assert ncu_summary.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 launches" in out and "bwd_states_kernel" in out and "1.29" in out
    assert out.splitlines()[-1].split()[-1] == "-"          # fwd_o: no cycles-per-instruction
