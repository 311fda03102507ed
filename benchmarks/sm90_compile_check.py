"""Compile every Triton kernel specialisation the tests launch for sm_90 (H200), on a CPU.

    .venv/bin/python benchmarks/sm90_compile_check.py [options] [pytest args...]
    (default pytest args: tests/ops -m "not gpu"; put options before the pytest args)

Triton's interpreter misses what only the real compiler sees: a kernel reading a module-global
`X: tl.constexpr`, shared memory over the H200's 227 KiB, register spills. This tool finds
them without a GPU, in two steps:

1. Record: run the pytest selection in this process under TRITON_INTERPRET=1 (kernels really
   run, so the tests still check results) and record, for each launch of a @triton.jit kernel
   of linattn.ops.triton, the key Triton's JIT cache uses: every argument's type and
   specialisation (pointers and ints divisible by 16: "D"; ints == 1 and None: constexprs),
   the constexpr values, num_warps and num_stages. The gated launcher's tiling heuristic is
   switched to the device's (gated_api.INTERPRET = False) unless --interpreter-tiling.
2. Compile: each distinct key goes through `triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 90, 32))` in worker processes started without TRITON_INTERPRET
   (so the kernels are real JITFunctions) and with a temporary TRITON_CACHE_DIR. A line per key
   gives OK/ERROR, shared memory bytes, registers and spills (from ptxas -v), the programs
   that fit on one SM (blocks_per_sm: the grid's waves follow), compile seconds; --dump DIR
   writes each key's TTGIR and PTX (a `tt.load` left in a loop is a load the pipeliner did not
   prefetch); --sass counts SASS instructions from the cubin (shared-memory stores and loads,
   spill traffic, barriers, HGMMA, global loads: static counts, a proxy to compare two forms
   of a kernel, not a timing).

Exit code 1 if a key fails to compile or needs more than 227 KiB of shared memory, 2 if
pytest could not run (failed tests only warn: their launches are still checked). The default
selection (~180 keys) takes ~5 minutes on a 2-core machine, mostly float32 "ieee" delta
kernels (up to 30 s each); narrow it with pytest's -k, --filter or --max-per-kernel.

When to run it: on a CPU (`make sm90-check`) after any change to a Triton kernel or its
launch choices, before spending GPU time: it catches register spills and shared-memory
overruns the interpreter cannot.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = 227 * 1024        # H200 (sm_90): opt-in shared memory per block, bytes
SM_REGISTERS = 65536           # 32-bit registers per SM
SM_SMEM = 228 * 1024           # shared memory per SM, bytes (1 KB of it reserved per block)
SM_WARPS, SM_BLOCKS = 64, 32   # resident warps and blocks per SM


def blocks_per_sm(regs: int, smem: int, warps: int) -> int:
    """Programs of this kernel that fit on one SM at once (registers allocated per warp in
    units of 256, shared memory plus the 1 KB the driver reserves per block). A grid of G
    programs runs in G / (132 * this) waves on the H200: a wave's tail costs as much as a full
    one (Nsight Compute showed a 1.29-wave scan taking 1.65x a 0.97-wave one)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM_REGISTERS // (per_warp * warps) if regs else SM_BLOCKS
    by_smem = SM_SMEM // (smem + 1024)
    return max(0, min(by_regs, by_smem, SM_WARPS // warps, SM_BLOCKS))
KERNEL_MODULES = "linattn.ops.triton."
DEFAULT_PYTEST = ["tests/ops", "-m", "not gpu"]


# ------------------------------------------------------------------ step 1: record (interpreter)

def _jsonable(v):
    """A constexpr value as JSON (tl.dtype -> {"dtype": "bf16"})."""
    import triton.language as tl
    if isinstance(v, tl.constexpr):
        v = v.value
    return {"dtype": str(v)} if isinstance(v, tl.dtype) else v


class Recorder:
    """pytest plugin: wraps InterpretedFunction.run to record each launch's key, then runs it."""

    def __init__(self, device_tiling: bool):
        self.device_tiling = device_tiling
        self.keys: dict[str, dict] = {}          # canonical JSON key -> record
        self.test = None
        self._binders = {}

    def pytest_configure(self, config):
        from triton.backends.compiler import BaseBackend
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import KernelParam, create_function_from_signature
        if self.device_tiling:
            from linattn.ops.triton import gated_api
            gated_api.INTERPRET = False          # the GPU's tiles, warps, stages
        real_run, rec = InterpretedFunction.run, self

        def binder(kern):   # Triton's own argument binder, as JITFunction builds it
            if kern not in rec._binders:
                import inspect
                sig, kw = inspect.signature(kern.fn), kern.kwargs
                dns, dnsa = kw.get("do_not_specialize") or [], kw.get("do_not_specialize_on_alignment") or []
                params = [KernelParam(i, p, i in dns or p.name in dns, i in dnsa or p.name in dnsa)
                          for i, p in enumerate(sig.parameters.values())]
                rec._binders[kern] = create_function_from_signature(sig, params, BaseBackend)
            return rec._binders[kern]

        def run(kern, *args, grid, warmup, **kwargs):
            if kern.fn.__module__.startswith(KERNEL_MODULES):
                bound, spec, opts = binder(kern)(*args, **kwargs)
                spec = [[n, t, _jsonable(bound[n]) if t == "constexpr" else a]
                        for n, (t, a, *_) in zip(bound, spec)]
                key = {"mod": kern.fn.__module__, "fn": kern.fn.__name__, "spec": spec,
                       "opts": {k: opts[k] for k in sorted(opts)}}
                k = json.dumps(key, sort_keys=True)
                entry = rec.keys.setdefault(k, dict(key, test=rec.test, launches=0))
                entry["launches"] += 1
            return real_run(kern, *args, grid=grid, warmup=warmup, **kwargs)
        InterpretedFunction.run = run

    def pytest_runtest_setup(self, item):
        self.test = item.nodeid


def summary(key: dict) -> str:
    """'*fp32 K=D | L=128 IEEE=True V=1 h0=None | w4 s2': pointer dtypes, ints Triton marks
    divisible by 16, constexprs (ints == 1 and None arguments among them), warps, stages."""
    ptrs = sorted({t for _, t, _ in key["spec"] if t.startswith("*")})
    ints = [f"{n}=D" for n, t, a in key["spec"] if t[0] in "iu" and a == "D"]
    cx = [f"{n}={a['dtype'] if isinstance(a, dict) else a}" for n, t, a in key["spec"] if t == "constexpr"]
    o = key["opts"]
    return (f"{','.join(ptrs)} {' '.join(ints)} | {' '.join(cx)} | "
            f"w{o.get('num_warps', 4)} s{o.get('num_stages', 3)}")


# --------------------------------------------------------------- step 2: compile (real compiler)

def compile_key(key: dict) -> dict:
    """AOT-compile one recorded key for sm_90 (in a worker: TRITON_INTERPRET unset)."""
    import importlib
    import triton
    import triton.language as tl
    from triton import knobs
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(key["mod"]), key["fn"])
    sig, consts, attrs = {}, {}, {}
    for i, (name, t, a) in enumerate(key["spec"]):
        sig[name] = t
        if t == "constexpr":
            consts[(i,)] = tl.dtype(a["dtype"]) if isinstance(a, dict) else a
        elif isinstance(a, str):
            attrs[(i,)] = BaseBackend.parse_attr(a)
    knobs.nvidia.dump_ptxas_log = True         # ptxas -v: registers and spills, on stdout
    log, t0 = io.StringIO(), time.time()
    try:
        with contextlib.redirect_stdout(log):
            kern = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=dict(key["opts"]))
    except Exception as e:  # noqa: BLE001 -- any compiler failure is a result to report
        return {"ok": False, "seconds": time.time() - t0,
                "error": f"{type(e).__name__}: {e}".strip()[:4000]}
    ptxas = log.getvalue()
    if key.get("dump"):                        # the optimised TTGIR and the PTX, for reading
        os.makedirs(key["dump"], exist_ok=True)
        stem = os.path.join(key["dump"], f"{key['fn']}_{key['index']}")
        for ext in ("ttgir", "ptx"):
            with open(f"{stem}.{ext}", "w") as f:
                f.write(kern.asm[ext])
    regs = re.search(r"Used (\d+) registers", ptxas)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    res = {"ok": True, "seconds": time.time() - t0, "shared": kern.metadata.shared,
           "regs": int(regs.group(1)) if regs else None,
           "spills": int(spill.group(1)) + int(spill.group(2)) if spill else None}
    if key.get("sass"):
        sass = disassemble(kern.asm["cubin"])
        res["sass"] = sass_counts(sass)
        if key.get("dump"):
            with open(os.path.join(key["dump"], f"{key['fn']}_{key['index']}.sass"), "w") as f:
                f.write(sass)
    return res


# SASS instructions --sass counts (whole kernel, static): shared-memory stores and loads (STS,
# LDS: operands staged for the tensor cores, layout conversions), local memory (LDL, STL:
# register spills), barriers (BAR), Hopper tensor-core instructions (HGMMA), global loads (LDG)
SASS_OPS = ("STS", "LDS", "LDL", "STL", "BAR", "HGMMA", "LDG")


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin, by the cuobjdump that ships with Triton's NVIDIA backend."""
    import triton.backends.nvidia as nv
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def sass_counts(sass: str) -> dict:
    """Static count of each SASS_OPS opcode (any suffix, predicated or not)."""
    ops = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass, re.M)
    return {op: sum(1 for o in ops if o == op) for op in SASS_OPS}


def worker_main():
    """Hidden --worker mode: one JSON key per stdin line -> one JSON result per stdout line."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                              # compiler chatter must not reach the results
    for line in sys.stdin:
        out.write(json.dumps(compile_key(json.loads(line))) + "\n")
        out.flush()


def compile_all(keys: list[dict], jobs: int, on_result) -> None:
    """Compile keys in `jobs` worker processes; a worker that dies (a compiler abort) fails
    only its key and is replaced."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    todo, lock = list(enumerate(keys)), threading.Lock()

    def drive():
        proc = None
        while True:
            with lock:
                if not todo:
                    break
                i, key = todo.pop(0)
            if proc is None:
                err = tempfile.TemporaryFile()
                proc = subprocess.Popen([sys.executable, __file__, "--worker"], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            t0 = time.time()
            proc.stdin.write(json.dumps(key) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if line:
                res = json.loads(line)
            else:                              # the worker died mid-compile
                rc = proc.wait()
                err.seek(0)
                tail = err.read().decode(errors="replace").strip().splitlines()[-15:]
                res = {"ok": False, "seconds": time.time() - t0,
                       "error": f"compiler process died (exit {rc})\n" + "\n".join(tail)}
                proc = None
            with lock:
                on_result(i, res)
        if proc is not None:
            proc.stdin.close()
            proc.wait()
    threads = [threading.Thread(target=drive) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ------------------------------------------------------------------------------------ the CLI

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Other arguments go to pytest (default: tests/ops -m 'not gpu').",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--max-per-kernel", type=int, default=None, metavar="N", help="compile at most N keys per kernel")
    ap.add_argument("--filter", default="", metavar="SUBSTR", help="only keys whose 'kernel summary' line contains SUBSTR")
    ap.add_argument("--jobs", type=int, default=1, metavar="N", help="parallel compile workers (default 1)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write every key and its result to PATH")
    ap.add_argument("--dump", default=None, metavar="DIR",
                    help="write each compiled key's TTGIR and PTX to DIR/<kernel>_<n>.{ttgir,ptx}")
    ap.add_argument("--sass", action="store_true",
                    help="also count SASS instructions of each key (STS, LDS, LDL, STL, BAR, "
                         "HGMMA, LDG) from its cubin; with --dump, write DIR/<kernel>_<n>.sass")
    ap.add_argument("--interpreter-tiling", action="store_true",
                    help="record the gated kernels at the interpreter's tiling, not the GPU's")
    args, pytest_args = ap.parse_known_args()
    pytest_args = pytest_args or DEFAULT_PYTEST

    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    os.environ["TRITON_INTERPRET"] = "1"       # before triton is imported
    import pytest
    rec = Recorder(device_tiling=not args.interpreter_tiling)
    t0 = time.time()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", *pytest_args], plugins=[rec])
    print(f"\npytest exit code {int(rc)} after {time.time() - t0:.0f} s; "
          f"{len(rec.keys)} distinct kernel keys recorded")
    if int(rc) not in (0, 1):                  # 1: failed tests (their launches still count)
        return 2

    per_kernel, keys = Counter(), []
    for key in rec.keys.values():
        if args.filter in f"{key['fn']} {summary(key)}" and (
                args.max_per_kernel is None or per_kernel[key["fn"]] < args.max_per_kernel):
            per_kernel[key["fn"]] += 1
            keys.append(dict(key, dump=args.dump, sass=args.sass, index=len(keys)))
    print(f"compiling {len(keys)} keys for sm_90 with {args.jobs} worker(s)\n")

    results: list[dict | None] = [None] * len(keys)

    def show(i, res):
        results[i] = res
        k = keys[i]
        if res["ok"]:
            res["per_sm"] = blocks_per_sm(res["regs"] or 0, res["shared"],
                                          k["opts"].get("num_warps") or 4)
        stats = (f"smem {res['shared']:>6} regs {res['regs']} spills {res['spills']} "
                 f"per SM {res['per_sm']}" if res["ok"]
                 else "ERROR " + res["error"].splitlines()[0][:120])
        if res.get("sass"):
            stats += " | " + " ".join(f"{op} {n}" for op, n in res["sass"].items())
        print(f"{'OK   ' if res['ok'] else 'ERROR'} {k['fn']:<24} {res['seconds']:6.1f}s  {stats}\n"
              f"      {summary(k)}", flush=True)
    os.environ["TRITON_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="sm90_check_cache_")
    t0 = time.time()
    compile_all(keys, args.jobs, show)
    shutil.rmtree(cache, ignore_errors=True)

    errors = [(k, r) for k, r in zip(keys, results) if not r["ok"]]
    big = [(k, r) for k, r in zip(keys, results) if r["ok"] and r["shared"] > SMEM_LIMIT]
    spills = [(k, r) for k, r in zip(keys, results) if r["ok"] and r["spills"]]
    print(f"\n== {len(keys)} keys ({', '.join(f'{f} {n}' for f, n in sorted(per_kernel.items()))}) in "
          f"{time.time() - t0:.0f} s wall, {sum(r['seconds'] for r in results):.0f} s of compiles: "
          f"{len(keys) - len(errors)} OK, {len(errors)} errors, {len(big)} over {SMEM_LIMIT} B "
          f"shared memory, {len(spills)} with spills")
    for k, r in errors:
        print(f"ERROR {k['fn']} {summary(k)}\n  first test: {k['test']}\n  "
              + "\n  ".join(r["error"].splitlines()[:6]))
    for k, r in big:
        print(f"SHARED MEMORY {r['shared']} B > {SMEM_LIMIT} B: {k['fn']} {summary(k)}")
    spills.sort(key=lambda kr: -kr[1]["spills"])
    for k, r in spills[:15]:
        print(f"SPILLS {r['spills']} B stored+loaded ({r['regs']} registers): {k['fn']} {summary(k)}")
    if len(spills) > 15:
        print(f"... and {len(spills) - 15} more keys with spills (see the lines above or --json)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(k, result=r) for k, r in zip(keys, results)], f, indent=1)
    return 1 if errors or big else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.path.insert(0, ROOT)
        worker_main()
    else:
        sys.exit(main())
