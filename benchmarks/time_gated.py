"""Quick bf16 timing of the gated-family Triton kernels on one GPU (not the full bench).

B=8, T=8192, H=16, K=V=128 (B*T = 65536, docs/design.md section 6), forward and forward+backward,
median of triton.testing.do_bench, plus the peak extra memory of forward+backward.
Usage: PYTHONPATH=. python3 benchmarks/time_gated.py [--T 8192] [--B 8]

When to run it: for a quick look at the gated-family kernels after a change (gpu_check.sh
runs it with RUN_TIMING=1); claims come from `linattn bench`.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton

import linattn


def make(kind, B, T, H, D, dev, dtype):
    gen = torch.Generator(device=dev).manual_seed(0)

    def rn(*s):
        return torch.randn(*s, device=dev, dtype=dtype, generator=gen)

    q, k, v = rn(B, T, H, D), F.normalize(rn(B, T, H, D), dim=-1), rn(B, T, H, D)
    ins = dict(q=q, k=k, v=v)
    if kind == "const":
        ins["g"] = -torch.rand(H, device=dev, generator=gen) * 0.1
    elif kind == "scalar":
        ins["g"] = F.logsigmoid(torch.randn(B, T, H, device=dev, generator=gen) + 4)
    elif kind == "key":
        ins["g"] = F.logsigmoid(torch.randn(B, T, H, D, device=dev, generator=gen) + 4)
    elif kind.startswith("mlstm"):
        ins["i"] = torch.randn(B, T, H, device=dev, generator=gen)
        ins["f"] = torch.randn(B, T, H, device=dev, generator=gen) + 3
    for x in ins.values():
        x.requires_grad_(True)
    return ins


def op(kind, override=None):
    """The op of kind on the Triton kernels; override: gated_api.Override (None: the
    device's launch choices)."""
    from linattn.ops.triton import gated_api
    if override is not None:
        def scale(kw):
            return kw["q"].shape[-1] ** -0.5
        if kind in ("mlstm_sig", "mlstm_exp"):
            gate = "sigmoid" if kind == "mlstm_sig" else "exp"
            return lambda **kw: gated_api.mlstm(**kw, scale=scale(kw), input_gate=gate,
                                                override=override)
        return lambda **kw: gated_api.linear_attention(**kw, scale=scale(kw), override=override)
    if kind == "mlstm_sig":
        return lambda **kw: linattn.mlstm(**kw, input_gate="sigmoid", backend="triton")
    if kind == "mlstm_exp":
        return lambda **kw: linattn.mlstm(**kw, input_gate="exp", backend="triton")
    return lambda **kw: linattn.linear_attention(**kw, backend="triton")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--kinds", default="none,const,scalar,key,mlstm_sig,mlstm_exp")
    args = ap.parse_args()
    dev, dtype = "cuda", torch.bfloat16
    rows = []
    for kind in args.kinds.split(","):
        try:
            ins = make(kind, args.B, args.T, args.H, args.D, dev, dtype)
            fn = op(kind)
            do = torch.randn_like(ins["v"])
            leaves = list(ins.values())

            def fwd():
                with torch.no_grad():
                    fn(**ins)

            def fwd_bwd():
                o, _ = fn(**ins)
                o.backward(do)

            fwd_bwd()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            tf = triton.testing.do_bench(fwd, return_mode="median")
            tfb = triton.testing.do_bench(fwd_bwd, grad_to_none=leaves, return_mode="median")
            rows.append(dict(kind=kind, fwd_ms=round(tf, 3), fwd_bwd_ms=round(tfb, 3), peak_extra_mib=round(peak)))
        except Exception as e:  # report and go on with the other kinds
            rows.append(dict(kind=kind, error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(rows[-1], flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "time_gated.json"), "w") as fh:
            json.dump(dict(shape=vars(args), gpu=torch.cuda.get_device_name(), rows=rows), fh, indent=1)
    print(f"{'kind':<10} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:<10} ERROR {r['error'][:200]}")
        else:
            print(f"{r['kind']:<10} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>11.3f} {r['peak_extra_mib']:>9}")


if __name__ == "__main__":
    main()
