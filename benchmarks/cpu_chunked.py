"""CPU: the chunked PyTorch path against the step-by-step reference loop.

linear_attention with a scalar gate, B=2, T=2048, H=4, D=64, float32, forward + backward.
The reference is one Python loop over T, vectorised over B and H. Prints the median of a few
runs of each and the speed-up. Not a test: run it by hand and record the figure in
BENCHMARKS.md with the machine, date and versions.

    .venv/bin/python benchmarks/cpu_chunked.py [--T 2048] [--repeats 3]

When to run it: after a change to linattn/ops/torch_chunked.py (the CPU path), and record
the figure in BENCHMARKS.md.
"""
import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import linattn


def fwd_bwd_seconds(backend, q, k, v, g, repeats):
    times = []
    for _ in range(repeats):
        leaves = [x.detach().requires_grad_() for x in (q, k, v, g)]
        t0 = time.perf_counter()
        o, _ = linattn.linear_attention(*leaves, backend=backend)
        o.backward(torch.ones_like(o))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(a.B, a.T, a.H, a.D) for _ in range(3))
    g = F.logsigmoid(torch.randn(a.B, a.T, a.H) + 3.0)  # log-decays near a real model's
    chunked = fwd_bwd_seconds("torch", q, k, v, g, a.repeats)
    loop = fwd_bwd_seconds("reference", q, k, v, g, a.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"linear_attention scalar gate, B={a.B} T={a.T} H={a.H} D={a.D} float32, fwd+bwd median of {a.repeats}")
    print(f"  chunked (backend='torch'):     {chunked * 1e3:9.1f} ms")
    print(f"  reference loop (backend='reference'): {loop * 1e3:9.1f} ms")
    print(f"  speed-up: {loop / chunked:.1f}x")


if __name__ == "__main__":
    main()
