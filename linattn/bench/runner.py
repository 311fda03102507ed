"""The bench's runner, shared by the op bench and the model bench: worker processes (a
crash or a hang costs one case's rows, never the run), the parallel compile warm-up, the
row loop with its timeouts and time budget, and the machine facts (ceilings, versions,
which peers import).

What a run asks of the machine is a value, Machine: tests pass fakes (a GPU name, fixed
ceilings, a pool that answers at once) instead of patching this package.
"""
from __future__ import annotations

import gc
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

EXIT_NO_GPU = 2
BUDGET_SKIP = "skipped: out of the time budget (--budget)"
OUT_OF_MEMORY = "OutOfMemoryError"                          # in a row's error: retried alone


def short_error(e: BaseException) -> str:
    """'TypeName: message' on one line, the message cut at 300 characters."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# ============================================================================ machine facts

def why_missing(module: str) -> str | None:
    """None when `module` can be imported, else why not (finding a submodule runs its
    packages' __init__, which may fail on a missing or mismatched dependency)."""
    import importlib.util
    try:
        if importlib.util.find_spec(module) is not None:
            return None
        return f"{module} is not importable"
    except Exception as e:  # an __init__ that fails: name the cause
        return f"{module} is not importable: {short_error(e)}"


def cuda_gpu_name() -> str | None:
    """The CUDA device's name, None without a CUDA GPU."""
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def measure_ceilings(quick=False) -> dict:
    """Copy bandwidth (a 4 GiB device-to-device copy, bytes read + written) and the bf16
    8192^3 matmul rate, medians of do_bench."""
    import torch
    from triton.testing import do_bench
    rep = 50 if quick else 200
    x = torch.empty(2**30, device="cuda", dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), warmup=20, rep=rep, return_mode="median")
    copy = 2 * x.numel() * 4 / (t * 1e-3) / 1e12
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: a @ b, warmup=20, rep=rep, return_mode="median")
    mm = 2 * 8192**3 / (t * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_TBps": copy, "matmul_TFLOPs": mm}


def git_commit() -> str | None:
    """The checkout's short commit, "+dirty" when linattn/ differs from it (the timed code is
    then not the commit's); None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        diff = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "linattn"],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+dirty" if diff.returncode == 1 else "")


def versions(models: bool = False) -> dict:
    """Python, torch (and its CUDA), triton, fla-core, mlstm-kernels and linattn versions;
    with models also flash-linear-attention's and the git commit."""
    import torch
    out = {"python": sys.version.split()[0]}
    dists = [("torch", "torch"), ("triton", "triton"), ("fla", "fla-core"),
             ("mlstm_kernels", "mlstm-kernels"), ("linattn", "linattn")]
    dists += [("flash_linear_attention", "flash-linear-attention")] if models else []
    for key, dist in dists[:5]:
        out[key] = _dist_version(dist)
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    for key, dist in dists[5:]:
        out[key] = _dist_version(dist)
    if models:
        out["commit"] = git_commit()
    return out


def _dist_version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def clear_autotune_caches() -> int:
    """Forgets every Triton autotuner's chosen configs in this process (fla's CachedAutotuner
    included: a subclass); returns how many autotuners had chosen any. Their next launch
    tunes again; the compiled kernels stay cached."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return 0
    cleared = 0
    for obj in gc.get_objects():
        if issubclass(type(obj), Autotuner) and obj.cache:   # type(): no __class__ lookups
            obj.cache.clear()
            cleared += 1
    return cleared


# ============================================================================ workers (worker side)

def serve_requests(row_of) -> int:
    """A worker's loop: one JSON request per stdin line, row_of(request) -> one JSON row per
    line on the original stdout; anything the libraries print goes to stderr. row_of records
    its rows' own errors; an exception it raises becomes the row's "worker: ..." error."""
    result_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    results = os.fdopen(result_fd, "w", buffering=1)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            row = row_of(json.loads(line))
        except Exception as e:
            row = {"error": f"worker: {short_error(e)}"}
        results.write(json.dumps(row) + "\n")
    return 0


# ============================================================================ workers (parent side)

class WorkerPool:
    """One worker process per case (started as `argv`, serving serve_requests), started on
    its first request, kept across shapes (so a compiled and autotuned kernel is reused). A
    worker that dies or overruns its time is killed and its case marked dead: the case's
    later rows record why and are skipped."""

    def __init__(self, argv: list, env: dict | None = None, log=sys.stderr):
        self.argv, self.env, self.log = argv, env, log
        self.procs: dict = {}
        self.tails: dict = {}
        self.dead: dict = {}
        self.replies: queue.Queue = queue.Queue()

    def _start(self, op):
        p = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, bufsize=1, env=self.env)
        self.procs[op] = p
        self.tails[op] = deque(maxlen=40)
        threading.Thread(target=self._read_out, args=(op, p), daemon=True).start()
        threading.Thread(target=self._read_err, args=(op, p), daemon=True).start()
        return p

    def _read_out(self, op, p):
        for line in p.stdout:
            self.replies.put((op, p, line))
        self.replies.put((op, p, None))

    def _read_err(self, op, p):
        for line in p.stderr:
            self.tails[op].append(line.rstrip())
            print(f"[{op}] {line.rstrip()}", file=self.log, flush=True)

    def send(self, op: str, request: dict) -> bool:
        if op in self.dead:
            return False
        p = self.procs.get(op)
        if p is not None and p.poll() is not None:          # died while idle
            self._bury(op, self._died(op, p))
            return False
        p = p or self._start(op)
        try:
            p.stdin.write(json.dumps({**request, "op": op}) + "\n")
            p.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            self._bury(op, f"worker gone: {e}")
            return False
        return True

    def _bury(self, op, reason):
        p = self.procs.pop(op, None)
        if p is not None and p.poll() is None:
            p.kill()
        if p is not None:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.dead[op] = reason

    def _died(self, op, p) -> str:
        try:
            rc = p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        time.sleep(0.2)                                      # let the stderr reader finish
        tail = " | ".join(list(self.tails.get(op, ()))[-6:])
        what = "compile error" if re.search(r"LLVM|Assertion|assert|PassManager|MLIR|triton", tail) else "crash"
        sig = f"signal {-rc}" if rc is not None and rc < 0 else f"exit {rc}"
        return f"{what}: worker died ({sig}): {tail[-400:]}"

    def collect(self, pending: dict, deadline_of, first_only=False) -> dict:
        """Waits for the cases in `pending` ({case: start time}, emptied as they answer);
        returns {case: row}, after the first answer with first_only. A case past
        deadline_of(case, start) is killed and answered with a timeout error."""
        rows = {}
        while pending and not (first_only and rows):
            now = time.monotonic()
            for op, start in list(pending.items()):
                if now >= deadline_of(op, start):
                    reason = f"timeout after {now - start:.0f} s"
                    self._bury(op, reason)
                    rows[op] = {"error": reason}
                    del pending[op]
            if not pending:
                break
            wait = max(0.05, min(deadline_of(op, st) for op, st in pending.items()) - now)
            try:
                op, p, line = self.replies.get(timeout=wait)
            except queue.Empty:
                continue
            if op not in pending or self.procs.get(op) is not p:
                continue                                     # a late reply of a killed worker
            if line is None:
                reason = self._died(op, p)
                self._bury(op, reason)
                rows[op] = {"error": reason}
            else:
                try:
                    rows[op] = json.loads(line)
                except ValueError:
                    continue
            del pending[op]
        return rows

    def run(self, op: str, request: dict, timeout: float) -> dict:
        if not self.send(op, request):
            return {"error": f"skipped: {self.dead.get(op, 'worker unavailable')}"}
        return self.collect({op: time.monotonic()}, lambda _op, st: st + timeout)[op]

    def close(self, grace: float = 5.0, keep: str | None = None) -> int:
        """Closes every worker's stdin but `keep`'s (its loop ends); kills what is still busy
        after grace s. A closed case is not dead: its next request starts a new worker.
        Returns how many workers it closed."""
        closing = {op: p for op, p in self.procs.items() if op != keep}
        for p in closing.values():
            try:
                p.stdin.close()
            except OSError:
                pass
        end = time.monotonic() + grace
        for op, p in closing.items():
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            del self.procs[op]
        return len(closing)


class InProcess:
    """--inprocess: every row in this process through row_of(request) -> row (profilers,
    debugging, tests); a crash ends the run."""

    def __init__(self, row_of: Callable[[dict], dict]):
        self.row_of = row_of
        self.dead: dict = {}

    def run(self, key, request, timeout):
        return self.row_of(request)

    def close(self, keep=None) -> int:
        return 0


def worker_env() -> dict:
    """This process's environment with this checkout of linattn first on PYTHONPATH and
    unbuffered output, for the workers."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(x for x in (pkg_root, env.get("PYTHONPATH")) if x)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_pool(worker_argv: list | None, row_of: Callable[[dict], dict]):
    """A WorkerPool of `worker_argv` processes; in this process (InProcess(row_of)) when
    worker_argv is None."""
    return InProcess(row_of) if worker_argv is None else WorkerPool(worker_argv, worker_env())


@dataclass(frozen=True)
class Machine:
    """What a bench run asks of the machine: gpu_name() (None: no CUDA GPU), ceilings(quick)
    -> {"copy_TBps", "matmul_TFLOPs"}, why_missing(module) -> None or why it cannot run, and
    pool(worker_argv or None, row_of) -> the runner of the rows (see start_pool)."""
    gpu_name: Callable[[], str | None] = cuda_gpu_name
    ceilings: Callable[..., dict] = measure_ceilings
    why_missing: Callable[[str], str | None] = why_missing
    pool: Callable = start_pool


# ============================================================================ the warm-up and the rows

def warm_up(pool, names: list, request_of, *, jobs: int, timeout: float, deadline: float,
            retry_alone: bool) -> dict:
    """One warm request (compile and autotune) of every case in `names`, up to `jobs` at once
    (their compiles overlap); returns {name: seconds it took} (without retry_alone a failed
    case's error instead, and cases the deadline left out say so). A case that overran
    `timeout` beside the others (compiles share the CPUs, autotuning the GPU) is tried once
    more alone within the deadline with retry_alone, else forgiven (its rows start a new
    worker, which compiles alone from Triton's disk cache). A case that crashed stays dead,
    its reason prefixed by "in the compile warm-up"."""
    took, started, pending, timed_out = {}, {}, {}, []
    todo = [n for n in names if n not in pool.dead]
    while todo or pending:
        while todo and len(pending) < jobs and time.monotonic() < deadline:
            name = todo.pop(0)
            if pool.send(name, request_of(name)):
                pending[name] = started[name] = time.monotonic()
        if not pending:
            break
        done = pool.collect(pending, lambda _n, st: min(st + timeout, deadline), first_only=True)
        for name, row in done.items():                      # collect empties pending
            error = row.get("error")
            took[name] = round(time.monotonic() - started[name], 1)
            if error:
                print(f"warm-up {name}: {error}", file=sys.stderr, flush=True)
                if not retry_alone:
                    took[name] = error
            if str(error or "").startswith("timeout"):
                if not retry_alone:
                    pool.dead.pop(name, None)
                    continue
                if jobs > 1:
                    timed_out.append(name)
                    continue
            if name in pool.dead:
                pool.dead[name] = f"in the compile warm-up: {pool.dead[name]}"
    for name in todo:
        took[name] = BUDGET_SKIP
    for name in timed_out:                                   # alone this time
        left = deadline - time.monotonic()
        if left < 1.0:
            pool.dead[name] = f"in the compile warm-up: {pool.dead.get(name, 'timeout')}"
            continue
        pool.dead.pop(name, None)
        print(f"compile warm-up: retrying {name} alone", flush=True)
        t0 = time.monotonic()
        row = pool.run(name, request_of(name), min(timeout, left))
        took[name] = round(time.monotonic() - t0, 1)
        if name in pool.dead:
            pool.dead[name] = f"in the compile warm-up (also alone): {pool.dead[name]}"
        if row.get("error"):
            print(f"warm-up {name} (alone): {row['error']}", file=sys.stderr, flush=True)
    return took


@dataclass
class Job:
    """One planned row: key names its case (and worker), row holds the fields known before
    it runs, request is what its worker is sent, needs the module it cannot run without;
    spec is the bench's own handle on the row (the op bench's (case, shape)) for its hooks."""
    key: str
    row: dict
    request: dict
    needs: str | None = None
    spec: object = field(default=None, repr=False)


def run_rows(plan: list, pool, *, missing: dict, timeout: float, deadline: float, on_row,
             finish, start=None, prepare=None, exclusive: bool = False) -> None:
    """Runs every Job of `plan` in order through pool.run, each within `timeout` and the
    overall `deadline`; a row that cannot run records why ("skipped: ...": its module is in
    `missing` {module: why}, the budget is spent, or its worker died earlier). start() runs
    first; prepare(job) -> extra request fields runs before each row that runs;
    on_row(row) gets every row, wall_s (seconds, compile included) added to those that ran.
    exclusive: every other worker is closed before a row runs, so no idle process holds
    device memory beside it (a closed case's next row starts a new worker). SIGTERM ends the
    loop as an exit; the pool is closed and finish() runs in every case."""
    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        if start is not None:
            start()
        for job in plan:
            row = dict(job.row)
            if job.needs in missing:
                row["error"] = f"skipped: {missing[job.needs]}"
            elif time.monotonic() >= deadline:
                row["error"] = BUDGET_SKIP
            elif job.key in pool.dead:
                row["error"] = f"skipped: {pool.dead[job.key]}"
            else:
                if exclusive:
                    pool.close(keep=job.key)
                request = {**job.request, **(prepare(job) if prepare is not None else {})}
                t_row = time.monotonic()
                reply = pool.run(job.key, request, max(1.0, min(timeout, deadline - time.monotonic())))
                # Idle workers keep their CUDA contexts and caches: a row that ran out of
                # device memory runs once more with every other worker closed.
                if OUT_OF_MEMORY in str(reply.get("error", "")) and pool.close(keep=job.key):
                    reply = pool.run(job.key, request, max(1.0, min(timeout, deadline - time.monotonic())))
                    reply["retried"] = "alone, after an out-of-memory error beside the idle workers"
                row.update(reply)
                row["wall_s"] = round(time.monotonic() - t_row, 2)
            on_row(row)
    finally:
        signal.signal(signal.SIGTERM, old)
        pool.close()
        finish()
