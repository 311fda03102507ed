"""Times the delta-rule Triton kernels (DeltaNet, Gated DeltaNet) on a CUDA GPU.

bf16, B=8, T=8192, H=16, D=128 by default (B*T = 65536 tokens, docs/design.md section 6):
forward and forward+backward medians of triton.testing.do_bench, and the peak memory
allocated above the inputs; --kernels adds each launcher's median (where the time goes).
Usage:

    PYTHONPATH=$PWD python3 benchmarks/time_delta.py [--B 8 --T 8192 --H 16 --D 128] [--kernels]

Prints one row per variant; --json PATH also writes the rows as JSON.

When to run it: for a quick look at the delta-rule kernels after a change (gpu_check.sh runs
it with RUN_TIMING=1); claims come from `linattn bench`.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def make_inputs(B, T, H, D, gated, dtype, device="cuda"):
    """Unit keys, beta in (0, 1), log-decays logsigmoid of a normal (as layers produce)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, H, D, device=device, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, D, device=device, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=device, generator=gen, dtype=dtype)
    beta = torch.rand(B, T, H, device=device, generator=gen).sigmoid()
    g = F.logsigmoid(torch.randn(B, T, H, device=device, generator=gen)) if gated else None
    return q, k, v, beta, g


def time_variant(B, T, H, D, gated, dtype):
    import triton.testing

    import linattn
    q, k, v, beta, g = make_inputs(B, T, H, D, gated, dtype)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, g) if x is not None]
    do = torch.randn_like(v)

    def fwd():
        return linattn.delta_rule(q, k, v, beta, g, backend="triton")[0]

    def fwd_bwd():
        o = fwd()
        torch.autograd.grad(o, leaves, do)

    fwd_bwd()  # compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    with torch.no_grad():
        t_f = triton.testing.do_bench(fwd, return_mode="median")
    t_fb = triton.testing.do_bench(fwd_bwd, return_mode="median")
    return dict(variant="gated_delta" if gated else "delta", B=B, T=T, H=H, D=D,
                dtype=str(dtype).replace("torch.", ""), fwd_ms=t_f, fwd_bwd_ms=t_fb,
                peak_extra_gib=peak)


def time_kernels(B, T, H, D, gated, dtype):
    """Median ms of each launcher of linattn.ops.triton.delta_fwd / delta_bwd on packed inputs."""
    import triton.testing

    from linattn.ops.triton import delta_bwd, delta_fwd
    from linattn.ops.triton.delta_api import chunk_layout
    q, k, v, beta, g = make_inputs(B, T, H, D, gated, dtype)
    q, k, v = (x.view(B * T, H, D) for x in (q, k, v))  # [TT, H, D]
    beta = beta.view(B * T, H)
    g = g.view(B * T, H) if g is not None else None
    do = torch.randn_like(v)
    lay = chunk_layout(B, T, None, q.device)
    scale = D ** -0.5
    gc, tinv = delta_fwd.prep(k, beta, g, lay)
    h, vnew, _ = delta_fwd.scan(k, v, beta, gc, tinv, None, lay, False)
    dh, dv2, _ = delta_bwd.reverse_scan(q, k, beta, tinv, gc, do, None, None, lay, scale, False)
    dq, dkp, dw, db = delta_bwd.grads_qk(q, k, vnew, gc, h, dh, do, dv2, lay, scale)
    steps = {
        "prep": lambda: delta_fwd.prep(k, beta, g, lay),
        "scan": lambda: delta_fwd.scan(k, v, beta, gc, tinv, None, lay, False),
        "output": lambda: delta_fwd.output(q, k, vnew, gc, h, lay, scale, v.dtype),
        "reverse_scan": lambda: delta_bwd.reverse_scan(q, k, beta, tinv, gc, do, None, None,
                                                       lay, scale, False),
        "grads_qk": lambda: delta_bwd.grads_qk(q, k, vnew, gc, h, dh, do, dv2, lay, scale),
        "grads_wy": lambda: delta_bwd.grads_wy(k, v, beta, g, gc, tinv, dw, dv2, dkp, db, lay),
    }
    return {name: triton.testing.do_bench(fn, return_mode="median") for name, fn in steps.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels", action="store_true", help="also time each launcher")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("time_delta.py needs a CUDA GPU")
    rows = [time_variant(a.B, a.T, a.H, a.D, gated, torch.bfloat16) for gated in (False, True)]
    print(f"{'variant':12s} {'B':>3s} {'T':>6s} {'H':>3s} {'D':>4s} {'fwd ms':>8s} "
          f"{'fwd+bwd ms':>11s} {'peak GiB':>9s}")
    for r in rows:
        print(f"{r['variant']:12s} {r['B']:3d} {r['T']:6d} {r['H']:3d} {r['D']:4d} "
              f"{r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:11.3f} {r['peak_extra_gib']:9.2f}")
    if a.kernels:
        for r in rows:
            r["kernels_ms"] = time_kernels(a.B, a.T, a.H, a.D, r["variant"] == "gated_delta",
                                           torch.bfloat16)
            print(r["variant"] + ": " + ", ".join(f"{n} {t:.3f}" for n, t in
                                                 r["kernels_ms"].items()) + " (ms)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
