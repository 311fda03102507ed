"""`linattn selftest`: every op, gate kind and dtype on this machine against the float64 oracle.

Runs each op (linear_attention with every gate kind and causal=False, delta_rule with and
without a gate, mlstm exp and sigmoid, and the three decode functions) on the backends the
device has, at small and awkward shapes (T 1, 63, 65, K != V, head dims that are not powers
of two, packed sequences with an empty one, initial and final states), forward and backward,
and judges every output, state and gradient by the tolerance rule of docs/design.md section 5
(linattn.testing, the rule the test suite asserts). Then it runs each op twice on one shape
and requires bitwise equal results (the kernels use no atomics). It prints one row per
(op, gate, backend, dtype, shape) and returns 1 if any row fails.

Backends and dtypes:
    CUDA with triton   the Triton kernels in float32, bfloat16 and float16
    CPU                the chunked PyTorch path in float32 and float64; the Triton kernels in
                       float32 too when TRITON_INTERPRET=1 was set before triton was imported
                       (the interpreter's bfloat16 arithmetic is not the GPU's)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .ops import decode as decode_ops
from .ops import reference
from .ops.api import delta_rule, linear_attention, mlstm
from .testing import compare_to_oracle, flatten

F64 = torch.float64


@dataclass(frozen=True)
class Shape:
    """B sequences of T tokens, or the packed `lengths` (B = 1); H heads, head dims K, V."""
    name: str
    B: int
    T: int
    H: int
    K: int
    V: int
    lengths: tuple[int, ...] | None = None
    state: bool = True


@dataclass(frozen=True)
class Case:
    """One op with one gate kind: op is a public function's name, gate names the variant."""
    op: str
    gate: str

    @property
    def decode(self) -> bool:
        return self.op.endswith("_decode")


CASES = (
    Case("linear_attention", "none"), Case("linear_attention", "const"),
    Case("linear_attention", "scalar"), Case("linear_attention", "key"),
    Case("linear_attention", "noncausal"),
    Case("delta_rule", "none"), Case("delta_rule", "scalar"),
    Case("mlstm", "exp"), Case("mlstm", "sigmoid"),
    Case("linear_attention_decode", "scalar"), Case("linear_attention_decode", "key"),
    Case("delta_rule_decode", "scalar"), Case("mlstm_decode", "exp"),
)

# One set of head dims for every shape, K 24 != V 40, both off powers of two: on CUDA each
# distinct constexpr (the tiles the launchers derive from K and V, the state flags) and each
# int argument's class (1, a multiple of 16, other) is a Triton specialisation compiled on the
# first run, so the shapes of one op differ only where the coverage needs it (T, packing, the
# states), and H = 2, B = 2 and the token counts (2, 126, 70; 10) stay in one class.
K_DIM, V_DIM = 24, 40
# training ops: T 1, T 63 without states, packed 65 + 0 + 5 (an empty sequence)
SHAPES = (
    Shape("T1", B=2, T=1, H=2, K=K_DIM, V=V_DIM),
    Shape("T63", B=2, T=63, H=2, K=K_DIM, V=V_DIM, state=False),
    Shape("65+0+5", B=1, T=70, H=2, K=K_DIM, V=V_DIM, lengths=(65, 0, 5)),
)
# decode functions take no cu_seqlens: one token, and a few
DECODE_SHAPES = (
    Shape("T1", B=2, T=1, H=2, K=K_DIM, V=V_DIM),
    Shape("T5", B=2, T=5, H=2, K=K_DIM, V=V_DIM),
)
QUICK_SHAPES = (SHAPES[2],)
QUICK_DECODE_SHAPES = (DECODE_SHAPES[1],)
DETERMINISM_SHAPE = SHAPES[2]
DETERMINISM_DECODE_SHAPE = DECODE_SHAPES[1]


# ----------------------------------------------------------------------------- inputs

def make_inputs(case: Case, shape: Shape, seed: int = 0) -> dict:
    """float64 inputs of the case at the shape (keys unit-norm for the delta rule, log-decays
    in [-1, 0], mLSTM forget pre-activations around +3), as keywords of the op."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V = shape.B, shape.T, shape.H, shape.K, shape.V
    N = len(shape.lengths) if shape.lengths is not None else B

    def randn(*s, scale=1.0):
        return torch.randn(*s, generator=gen, dtype=F64) * scale

    def log_decay(*s):
        return -torch.rand(*s, generator=gen, dtype=F64)

    d = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V))
    family = case.op.removesuffix("_decode")
    state = shape.state and case.gate != "noncausal"
    if family == "linear_attention":
        d["g"] = {"none": None, "noncausal": None, "const": log_decay(H),
                  "scalar": log_decay(B, T, H), "key": log_decay(B, T, H, K)}[case.gate]
        if state:
            d["initial_state"] = randn(N, H, K, V)
    elif family == "delta_rule":
        d["k"] = F.normalize(d["k"], dim=-1)
        d["beta"] = torch.rand(B, T, H, generator=gen, dtype=F64) * 0.98 + 0.01
        d["g"] = log_decay(B, T, H) if case.gate == "scalar" else None
        if state:
            d["initial_state"] = randn(N, H, K, V)
    else:
        d["i"] = randn(B, T, H, scale=2.0)
        d["f"] = randn(B, T, H).add(3.0)
        if state:
            d["initial_state"] = ((randn(N, H, K, V), randn(N, H, K).abs(), randn(N, H))
                                  if case.gate == "exp" else randn(N, H, K, V))
    if shape.lengths is not None:
        cu = [0]
        for n in shape.lengths:
            cu.append(cu[-1] + n)
        d["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    return d


def grad_names(case: Case, inputs: dict) -> list[str]:
    """Every floating input of a training op (decode functions have no backward)."""
    if case.decode:
        return []
    return [n for n, x in inputs.items() if x is not None and n != "cu_seqlens"]


# ----------------------------------------------------------------------------- functions

def fast_fn(case: Case, backend: str) -> Callable:
    """fn(**inputs) -> (o, state) on the backend under test."""
    if case.decode:
        op = getattr(decode_ops, case.op)
        extra = dict(input_gate=case.gate) if case.op == "mlstm_decode" else {}

        def run_decode(initial_state=None, **kw):
            return op(**kw, state=initial_state, backend=backend, **extra)
        return run_decode
    if case.op == "linear_attention":
        causal = case.gate != "noncausal"

        def run_la(**kw):
            return linear_attention(**kw, causal=causal, output_final_state=causal,
                                    backend=backend)
        return run_la
    if case.op == "delta_rule":
        return lambda **kw: delta_rule(**kw, output_final_state=True, backend=backend)
    return lambda **kw: mlstm(**kw, input_gate=case.gate, output_final_state=True,
                              backend=backend)


def oracle_fn(case: Case) -> Callable:
    """The float64 step loop (linattn.ops.reference) with the case's options."""
    family = case.op.removesuffix("_decode")
    if family == "linear_attention":
        causal = case.gate != "noncausal"
        return lambda **kw: reference.linear_attention(**kw, causal=causal,
                                                       output_final_state=causal)
    if family == "delta_rule":
        return lambda **kw: reference.delta_rule(**kw, output_final_state=True)
    return lambda **kw: reference.mlstm(**kw, input_gate=case.gate, output_final_state=True)


# ----------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class Target:
    """A backend, a dtype and the device its inputs live on."""
    backend: str
    dtype: torch.dtype
    device: str


def targets(device: str) -> list[Target]:
    """The backends and dtypes this device supports (module docstring)."""
    if device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return [Target("torch", torch.float32, "cuda"), Target("torch", F64, "cuda")]
        return [Target("triton", dt, "cuda")
                for dt in (torch.float32, torch.bfloat16, torch.float16)]
    out = [Target("torch", torch.float32, "cpu"), Target("torch", F64, "cpu")]
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        try:
            import triton  # noqa: F401
            out.append(Target("triton", torch.float32, "cpu"))
        except ImportError:
            pass
    return out


@dataclass
class Row:
    op: str
    gate: str
    backend: str
    dtype: str
    shape: str
    worst: str
    ok: bool
    detail: str = ""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _ratio(error: float, bound: float) -> float:
    """error / bound; inf for NaN errors and for nonzero errors against a zero bound."""
    if error != error:
        return float("inf")
    if bound > 0:
        return error / bound
    return 0.0 if error == 0 else float("inf")


def check_case(case: Case, shape: Shape, target: Target, tolerance_scale: float = 1.0,
               fn: Callable | None = None) -> Row:
    """The case at the shape on the target, judged by the rule; any exception fails it.
    fn: the function under test (default fast_fn(case, target.backend))."""
    row = Row(case.op, case.gate, target.backend, _dtype_name(target.dtype), shape.name, "", False)
    try:
        inputs = make_inputs(case, shape)
        names = grad_names(case, inputs)
        # the float32 gradient of a constant [H] decay sums every token's chunk-identity term:
        # a known gap, held to 2e-5 of its magnitude as the test suite holds it
        rel = {"g": 2e-5} if case.gate == "const" else None
        fn = fn or fast_fn(case, target.backend)
        _, _, checks = compare_to_oracle(fn, oracle_fn(case), inputs,
                                         dtype=target.dtype, grad_names=names,
                                         device=target.device, rel_grads=rel,
                                         tolerance_scale=tolerance_scale)
    except Exception as e:  # a crash is a failure of the row, not of the run
        row.worst, row.detail = "error", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        return row
    ratios = [_ratio(c.error, c.bound) for c in checks]
    worst = max(range(len(checks)), key=lambda j: ratios[j])
    row.worst = f"{ratios[worst]:.3g} ({checks[worst].label})"
    row.ok = all(c.ok for c in checks)
    row.detail = "; ".join(c.message for c in checks if not c.ok)
    return row


def _run_once(case: Case, inputs: dict, target: Target, fn: Callable):
    """Forward and backward on the target: the outputs and gradients, on the CPU."""
    names = grad_names(case, inputs)
    leaves = {}
    for n, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            dt = target.dtype if n in ("q", "k", "v") else (F64 if target.dtype == F64 else torch.float32)
            leaves[n] = x.to(target.device, dt).requires_grad_(n in names)
        elif isinstance(x, tuple):
            dt = F64 if target.dtype == F64 else torch.float32
            leaves[n] = tuple(t.to(target.device, dt).requires_grad_(n in names) for t in x)
        elif isinstance(x, torch.Tensor):
            leaves[n] = x.to(target.device)
        else:
            leaves[n] = x
    o, st = fn(**leaves)
    outs = [o] + flatten(st)
    if not names:
        return [y.detach().cpu() for y in outs]
    gen = torch.Generator().manual_seed(1)
    cots = [torch.randn(y.shape, generator=gen, dtype=F64).to(y.device, y.dtype) for y in outs]
    wrt = [t for n in names for t in flatten(leaves[n])]
    grads = torch.autograd.grad(outs, wrt, cots, allow_unused=True)
    return [y.detach().cpu() for y in outs] + [g.cpu() for g in grads if g is not None]


def check_determinism(case: Case, shape: Shape, target: Target,
                      fn: Callable | None = None) -> Row:
    """Two forward+backward runs of the same inputs give bitwise equal results.
    fn: the function under test (default fast_fn(case, target.backend))."""
    row = Row(case.op, case.gate, target.backend, _dtype_name(target.dtype),
              f"{shape.name}, 2 runs", "", False)
    try:
        inputs = make_inputs(case, shape, seed=1)
        fn = fn or fast_fn(case, target.backend)
        a = _run_once(case, inputs, target, fn)
        b = _run_once(case, inputs, target, fn)
    except Exception as e:
        row.worst, row.detail = "error", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        return row
    differ = sum(not torch.equal(x, y) for x, y in zip(a, b)) + abs(len(a) - len(b))
    row.ok = differ == 0
    row.worst = "bitwise equal" if row.ok else f"{differ} tensors differ"
    return row


def plan(device: str, *, quick: bool = False, cases=CASES) -> list[tuple]:
    """The rows to run, in print order: (kind "rule" | "determinism", case, shape, target)."""
    jobs = []
    for target in targets(device):
        for case in cases:
            shapes = ((QUICK_DECODE_SHAPES if quick else DECODE_SHAPES) if case.decode else
                      (QUICK_SHAPES if quick else SHAPES))
            jobs += [("rule", case, shape, target) for shape in shapes]
            det = DETERMINISM_DECODE_SHAPE if case.decode else DETERMINISM_SHAPE
            jobs.append(("determinism", case, det, target))
    return jobs


def run_row(kind: str, case: Case, shape: Shape, target: Target,
            tolerance_scale: float = 1.0) -> Row:
    """One planned row (a picklable entry point for the worker processes)."""
    if kind == "determinism":
        return check_determinism(case, shape, target)
    return check_case(case, shape, target, tolerance_scale)


# Compile seconds of each group's kernels on a cold cache (sm_90 compiles of the keys the
# plan launches at the shapes above, on one CPU core: benchmarks/sm90_compile_check.py): the
# order in which workers take the groups, longest first, so that no long compile starts last.
# Keys: op family and whether the dtype is float32 (its exact "ieee" dots unroll into long FMA
# code). All groups: ~430 s, the longest (the gated delta rule in float32) ~50 s.
COMPILE_SECONDS = {
    ("delta_rule", True): 45, ("mlstm", True): 30, ("linear_attention", True): 20,
    ("delta_rule", False): 20, ("mlstm", False): 15, ("linear_attention", False): 10,
}
DECODE_COMPILE_SECONDS = 1


def group_of(case: Case, target: Target) -> tuple:
    """Rows that launch the same kernel specialisations (a constant decay runs the scalar
    gate's kernels) share a group: one worker runs them, compiling each kernel once."""
    gate = "scalar" if case.gate == "const" else case.gate
    return case.op, gate, target.backend, str(target.dtype)


def compile_seconds(case: Case, target: Target) -> float:
    if case.decode:
        return DECODE_COMPILE_SECONDS
    return COMPILE_SECONDS[(case.op, target.dtype == torch.float32)]


def default_jobs(device: str) -> int:
    """Worker processes: on CUDA most of a first run is Triton compiling kernel
    specialisations, single-threaded, so up to 16 groups of rows at once (one per core); on
    the CPU the rows take milliseconds and a worker's start-up would cost more than it
    saves."""
    return min(16, os.cpu_count() or 1) if device == "cuda" else 1


def _one_thread():
    """A worker's torch on one thread: its CPU work (the float64 oracle) is small, and 16
    workers with a thread per core each would oversubscribe the cores that compile."""
    torch.set_num_threads(1)


def run_group(jobs: list, tolerance_scale: float = 1.0) -> list[Row]:
    """The rows of one group in order (a picklable entry point for the worker processes)."""
    return [run_row(*job, tolerance_scale) for job in jobs]


def run(device: str, *, quick: bool = False, tolerance_scale: float = 1.0,
        cases=CASES, out=sys.stdout, jobs: int = 1) -> list[Row]:
    """Every case on every target of the device; prints each row, in plan order, as soon as it
    and the rows before it have finished. jobs > 1 runs the groups of rows (group_of) in that
    many worker processes (started with "spawn", as CUDA requires), the longest compiles
    first; each row's result does not depend on which process ran it (its inputs come from
    its own seeds)."""
    rows = []
    header = ("op", "gate", "backend", "dtype", "shape", "worst error / bound", "pass")
    widths = (24, 9, 7, 8, 20, 26, 4)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)), file=out)

    def emit(r: Row):
        rows.append(r)
        cells = (r.op, r.gate, r.backend, r.dtype, r.shape, r.worst, "ok" if r.ok else "FAIL")
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)), file=out, flush=True)

    todo = plan(device, quick=quick, cases=cases)
    if jobs <= 1:
        for job in todo:
            emit(run_row(*job, tolerance_scale))
        return rows
    import concurrent.futures as cf
    import multiprocessing as mp

    groups: dict[tuple, list[int]] = {}
    for i, (_, case, _, target) in enumerate(todo):
        groups.setdefault(group_of(case, target), []).append(i)

    def cost(g):
        _, case, _, target = todo[g[0]]
        return compile_seconds(case, target)
    order = sorted(groups.values(), key=cost, reverse=True)
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                initializer=_one_thread) as pool:
        futures = {}
        for g in order:
            f = pool.submit(run_group, [todo[i] for i in g], tolerance_scale)
            futures.update({i: (f, j) for j, i in enumerate(g)})
        for i, (kind, case, shape, target) in enumerate(todo):  # in plan order
            future, j = futures[i]
            try:
                emit(future.result()[j])
            except Exception as e:  # the worker died (a crash in a kernel): the row fails
                name = shape.name + (", 2 runs" if kind == "determinism" else "")
                emit(Row(case.op, case.gate, target.backend, _dtype_name(target.dtype), name,
                         "error", False, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"))
    return rows


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linattn selftest",
        description="Check every op, gate kind and dtype on this device against the float64 "
                    "oracle (forward, backward, determinism); exit status 1 on any failure.")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--quick", action="store_true",
                   help="one shape per op (packed sequences with an empty one) instead of three")
    p.add_argument("--ops", default=None,
                   help="comma-separated op names to run (default: all), e.g. mlstm,delta_rule")
    p.add_argument("--jobs", type=int, default=None,
                   help="rows run at once in worker processes (default: up to 16 on CUDA, where "
                        "a first run mostly compiles Triton kernels; 1 on the CPU)")
    # multiplies every bound: 0 makes every inexact result fail (the CLI's own test)
    p.add_argument("--tolerance-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = _device(args.device)
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    except ValueError as e:
        print(f"linattn selftest: error: {e}", file=sys.stderr)
        return 2
    jobs = default_jobs(device) if args.jobs is None else args.jobs
    cases = CASES
    if args.ops:
        wanted = {s.strip() for s in args.ops.split(",") if s.strip()}
        unknown = wanted - {c.op for c in CASES}
        if unknown:
            print(f"linattn selftest: error: unknown --ops {sorted(unknown)}; choose from "
                  f"{sorted({c.op for c in CASES})}", file=sys.stderr)
            return 2
        cases = tuple(c for c in CASES if c.op in wanted)
    t0 = time.perf_counter()
    print(f"linattn selftest on {device}: torch {torch.__version__}"
          f"{_triton_note()}", flush=True)
    rows = run(device, quick=args.quick, tolerance_scale=args.tolerance_scale, cases=cases,
               jobs=jobs)
    failed = [r for r in rows if not r.ok]
    for r in failed:
        print(f"FAIL {r.op} {r.gate} {r.backend} {r.dtype} {r.shape}: {r.detail}")
    print(f"{len(rows) - len(failed)} of {len(rows)} passed in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


def _triton_note() -> str:
    try:
        import triton
    except ImportError:
        return ", triton not installed"
    interp = " (interpreter)" if os.environ.get("TRITON_INTERPRET", "0") == "1" else ""
    return f", triton {triton.__version__}{interp}"
