"""benchmarks/sm90_compile_check.py: records kernel keys from a test run and AOT-compiles them
for sm_90 without a GPU (it leans on Triton internals, so a Triton upgrade may break it)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import sm90_compile_check as tool  # noqa: E402

BAD = '''
import triton
import triton.language as tl
X: tl.constexpr = 4          # a plain int at run time: the real compiler refuses to read it


@triton.jit
def reads_global(p):
    i = tl.arange(0, 16)
    tl.store(p + i, tl.load(p + i) * X)


@triton.jit
def too_much_smem(a, c, B: tl.constexpr):
    r = tl.arange(0, B)
    x = tl.load(a + r[:, None] * B + r[None, :])
    tl.store(c + r[:, None] * B + r[None, :], tl.dot(x, x))
'''


SCALAR_GATE_RUN = '''
import torch
import linattn


def test_scalar_gate():
    q, k = (torch.randn(1, 40, 1, 160) for _ in range(2))   # K > 128: the device's chunk is 128
    v = torch.randn(1, 40, 1, 16)
    g = -torch.rand(1, 40, 1)
    linattn.linear_attention(q, k, v, g, backend="triton")
'''


def test_records_and_compiles_a_test_run(tmp_path):
    """End to end: a scalar-gate run's launches, the cumsum kernel compiled for sm_90."""
    out = tmp_path / "keys.json"
    (tmp_path / "test_scalar_gate_run.py").write_text(SCALAR_GATE_RUN)
    dump = tmp_path / "dump"
    run = subprocess.run([sys.executable, tool.__file__, "--filter", "chunk_cumsum", "--json", str(out),
                          "--dump", str(dump), "--sass", str(tmp_path / "test_scalar_gate_run.py"),
                          "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    keys = json.loads(out.read_text())
    assert keys and all(k["fn"] == "chunk_cumsum_kernel" and k["result"]["ok"] for k in keys)
    spec = {name: (t, a) for name, t, a in keys[0]["spec"]}
    # the device's chunk for a scalar gate at K > 128 (128), not the interpreter's (64)
    assert spec["x"][0] == "*fp32" and spec["L"] == ("constexpr", 128)
    assert keys[0]["result"]["shared"] > 0 and keys[0]["result"]["regs"] > 0
    # --dump: each compiled key's TTGIR and PTX, for reading what the compiler made of it
    ttgir = sorted(dump.glob("chunk_cumsum_kernel_*.ttgir"))
    assert len(ttgir) == len(keys) and "tt.func" in ttgir[0].read_text()
    assert ".entry chunk_cumsum_kernel" in ttgir[0].with_suffix(".ptx").read_text()
    # --sass: static SASS counts from the cubin (the cumsum reads and writes global memory)
    counts = keys[0]["result"]["sass"]
    assert set(counts) == set(tool.SASS_OPS) and counts["LDG"] > 0
    assert "chunk_cumsum_kernel" in ttgir[0].with_suffix(".sass").read_text()


def test_compile_errors_and_shared_memory_are_reported(tmp_path, monkeypatch):
    (tmp_path / "sm90_bad_kernels.py").write_text(BAD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    keys = [dict(mod="sm90_bad_kernels", fn="reads_global", spec=[["p", "*fp32", "D"]], opts={}),
            dict(mod="sm90_bad_kernels", fn="too_much_smem", opts={"num_warps": 8},
                 spec=[["a", "*fp32", "D"], ["c", "*fp32", "D"], ["B", "constexpr", 256]])]
    results = {}
    tool.compile_all(keys, 1, lambda i, r: results.__setitem__(i, r))
    assert not results[0]["ok"] and "Cannot access global variable X" in results[0]["error"]
    assert results[1]["ok"] and results[1]["shared"] > tool.SMEM_LIMIT


def test_blocks_per_sm_matches_nsight_compute():
    """The programs per SM that Nsight Compute reported on the H200 for bwd_states (4 warps,
    33 KB of shared memory): 4 at 121 registers, 3 at 136; and the other limits."""
    assert tool.blocks_per_sm(121, 33 * 1024, 4) == 4
    assert tool.blocks_per_sm(136, 33 * 1024, 4) == 3
    assert tool.blocks_per_sm(255, 33 * 1024, 8) == 1                 # registers
    assert tool.blocks_per_sm(64, 120 * 1024, 4) == 1                 # shared memory
    assert tool.blocks_per_sm(32, 0, 4) == 16                         # resident warps
