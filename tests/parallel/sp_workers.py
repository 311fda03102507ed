"""Worker side of the sequence-parallel tests: run in spawned gloo processes.

Not a test module (pytest does not collect it): the spawned children import it by name.
Every rank draws the same whole-sequence inputs from one seed, runs the single-process op
(backend="reference", float64) on the whole sequence as the oracle, runs the
sequence-parallel op on its slice (backend="torch"), and checks its slice of the outputs,
the final state and every gradient to ~1e-10.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ for helpers

import helpers  # noqa: E402

import linattn  # noqa: E402
import linattn.parallel as sp  # noqa: E402
from linattn.parallel import lasp  # noqa: E402
from linattn.parallel.comm import ProcessGroupComm  # noqa: E402

B, H, K, V = 2, 2, 5, 3  # K != V


# ----------------------------------------------------------------------------- spawning

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _child(rank, entry, fn, world, port, args):
    """A spawned child: entry's work, then the exit without the interpreter's finalisation,
    where gloo's worker threads can still hold tensors and abort the process ("terminate
    called without an active exception"; pytorch/pytorch PR 179291 describes the race). Seen
    under CI's load in 2 of 4 full runs on 2026-11-29. A Python error still propagates (to
    the parent through torch.multiprocessing) before this exit."""
    entry(rank, fn, world, port, args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(entry, fn, world: int, args, timeout: float, what: str, attempts: int = 3):
    """Starts entry(rank, fn, world, port, args) in `world` spawned processes on loopback;
    raises on an error in any of them, and kills them and fails after `timeout` seconds
    instead of hanging. Shared by every multi-process test of this folder.

    A run whose process dies by a signal (not a Python error) is started again on a new port,
    up to `attempts` runs (each run must start from a clean slate): _free_port() releases its
    port before rank 0 binds it, and under CI's load another process can take it in between;
    and see _child for the abort at exit."""
    for attempt in range(attempts):
        try:
            _run_once(entry, fn, world, args, timeout, what)
            return
        except mp.ProcessExitedException:
            if attempt == attempts - 1:
                raise


def _run_once(entry, fn, world: int, args, timeout: float, what: str):
    ctx = mp.start_processes(_child, args=(entry, fn, world, _free_port(), args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"{world} {what} still running after {timeout} s (hang?)")


def spawn(fn, world: int, *args, timeout: float = 240.0):
    """Runs fn(rank, world, *args) in `world` gloo processes on loopback (see run_processes)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_processes(_entry, fn, world, args, timeout, "gloo processes")


def _slices(lengths, rank):
    start = sum(lengths[:rank])
    return slice(start, start + lengths[rank])


def _cut(x, sl, per_token: bool):
    """This rank's leaf copy of x (its time slice when per_token)."""
    if x is None:
        return None
    y = x[:, sl] if per_token else x
    return y.detach().clone().requires_grad_(True)


def _full_inputs(op, gate, T, world, gen):
    q = helpers.randn(B, T, H, K, gen=gen)
    k = helpers.randn(B, T, H, K, gen=gen)
    v = helpers.randn(B, T, H, V, gen=gen)
    x = dict(q=q, k=k, v=v)
    if op == "delta":
        x["k"] = helpers.unit_keys(k)
        x["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    x["g"] = helpers.rand_gate(gate, B, T, H, K, gen, low=-0.6, high=-0.01)
    x["initial_state"] = helpers.randn(B, H, K, V, gen=gen)
    do = helpers.randn(B, T, H, V, gen=gen)
    dfinals = [helpers.randn(B, H, K, V, gen=gen) for _ in range(world)]
    return x, do, dfinals


def _check_case(rank, world, lengths, op, gate, with_state, seed, **kw):
    label = f"[{op} gate={gate} state={with_state} W={world} rank={rank}]"
    gen = helpers.seeded(seed)
    T = sum(lengths)
    x, do, dfinals = _full_inputs(op, gate, T, world, gen)
    if not with_state:
        x["initial_state"] = None
    fn_single = linattn.delta_rule if op == "delta" else linattn.linear_attention
    fn_sp = sp.delta_rule if op == "delta" else sp.linear_attention
    names = ["q", "k", "v"] + (["beta"] if op == "delta" else []) + ["g", "initial_state"]

    # Oracle: the whole sequence in one process; the final state's cotangent is the sum.
    full = {n: None if x[n] is None else x[n].detach().clone().requires_grad_(True) for n in names}
    o, st = fn_single(**full, output_final_state=with_state, backend="reference")
    loss = (o * do).sum() + ((st * sum(dfinals)).sum() if with_state else 0)
    loss.backward()

    sl = _slices(lengths, rank)
    const_gate = gate == "const"
    mine = {n: _cut(x[n], sl, n not in ("initial_state",) and not (n == "g" and const_gate))
            for n in names}
    if kw:  # an option of the communicator-level entry point, on the default group
        fn_on = lasp.delta_rule_on if op == "delta" else lasp.linear_attention_on
        o_r, st_r = fn_on(ProcessGroupComm(), **mine, output_final_state=with_state,
                          backend="torch", **kw)
    else:
        o_r, st_r = fn_sp(**mine, group=None, output_final_state=with_state, backend="torch")
    loss_r = (o_r * do[:, sl]).sum() + ((st_r * dfinals[rank]).sum() if with_state else 0)
    loss_r.backward()

    helpers.assert_allclose_f64(o_r, o.detach()[:, sl], f"{label} o")
    if with_state:
        helpers.assert_allclose_f64(st_r, st.detach(), f"{label} final_state")
    else:
        assert st_r is None, label
    for n in names:
        if x[n] is None:
            continue
        got, ref = mine[n].grad, full[n].grad
        if n == "initial_state":
            ref = ref if rank == 0 else torch.zeros_like(ref)  # arrives on rank 0
        elif n == "g" and const_gate:
            got = got.clone()
            dist.all_reduce(got)  # each rank holds its slice's part
        else:
            ref = ref[:, sl]
        assert got is not None, f"{label} no gradient for {n}"
        helpers.assert_allclose_f64(got, ref, f"{label} d{n}")


def _check_attention(rank, world, lengths, seed):
    gen = helpers.seeded(seed)
    T = sum(lengths)
    q, k, v = (helpers.randn(B, T, H, D, gen=gen) for D in (K, K, V))
    do = helpers.randn(B, T, H, V, gen=gen)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qh, kh, vh = (t.transpose(1, 2) for t in full)
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)
    (o * do).sum().backward()

    sl = _slices(lengths, rank)
    mine = [t[:, sl].clone().requires_grad_(True) for t in (q, k, v)]
    o_r = sp.causal_attention(*mine)
    (o_r * do[:, sl]).sum().backward()
    label = f"[attention W={world} rank={rank}]"
    helpers.assert_allclose_f64(o_r, o.detach()[:, sl], f"{label} o")
    for name, m, f in zip("qkv", mine, full):
        helpers.assert_allclose_f64(m.grad, f.grad[:, sl], f"{label} d{name}")

    k_all, v_all = sp.gather_kv(mine[1], mine[2])
    helpers.assert_allclose_f64(k_all, k, f"{label} gathered k")
    helpers.assert_allclose_f64(v_all, v, f"{label} gathered v")


def _check_prev_tokens(rank, world, lengths, n, seed):
    gen = helpers.seeded(seed)
    T = sum(lengths)
    x = helpers.randn(B, T, H, gen=gen)
    ws = [helpers.randn(B, n, H, gen=gen) for _ in range(world)]
    full = x.clone().requires_grad_(True)
    padded = torch.cat([full.new_zeros(B, n, H), full], dim=1)
    starts = [sum(lengths[:r]) for r in range(world)]
    refs = [padded[:, s : s + n] for s in starts]  # the n steps before each slice
    sum((r * w).sum() for r, w in zip(refs, ws)).backward()

    sl = _slices(lengths, rank)
    mine = x[:, sl].clone().requires_grad_(True)
    got = sp.prev_tokens(mine, n)
    (got * ws[rank]).sum().backward()
    label = f"[prev_tokens n={n} W={world} rank={rank}]"
    helpers.assert_allclose_f64(got, refs[rank].detach(), f"{label} value")
    helpers.assert_allclose_f64(mine.grad, full.grad[:, sl], f"{label} grad")


# ----------------------------------------------------------------------------- entry points

CASES = [  # (op, gate, with initial_state and output_final_state)
    ("linear", "none", True), ("linear", "const", True), ("linear", "scalar", True),
    ("linear", "key", True), ("linear", "scalar", False),
    ("delta", "none", True), ("delta", "scalar", True), ("delta", "none", False),
]


def check_everything(rank, world, lengths):
    """All op cases, attention and prev_tokens on one process group."""
    for i, (op, gate, with_state) in enumerate(CASES):
        _check_case(rank, world, lengths, op, gate, with_state, seed=100 + i)
    # The delta rule's two-call form (taken when K + V > fuse_dim, MAX_HEAD_DIM by default).
    _check_case(rank, world, lengths, "delta", "scalar", True, seed=200, fuse_dim=0)
    _check_attention(rank, world, lengths, seed=300)
    _check_prev_tokens(rank, world, lengths, n=3, seed=400)
