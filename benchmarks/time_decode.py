"""Times one decode step (T = 1) of the fused recurrent kernel on the GPU.

    python benchmarks/time_decode.py                 # B in 1 64 256, H 16, D 128, bf16
    python benchmarks/time_decode.py --sweep         # also try tile widths / warps
    python benchmarks/time_decode.py --json benchmarks/results/decode_h200.json

Ops: linear_attention_decode with a scalar gate (simple GLA) and delta_rule_decode with a
gate (Gated DeltaNet), through the public functions (validation + launch: what a serving
loop pays), with inplace=False (a new state, as fla's fused_recurrent writes it) and
inplace=True. Times are medians of triton.testing.do_bench (L2 flushed between calls).
The bytes that must move are the float32 state read and written plus q, k, v, gates read
and o written; achieved TB/s is those bytes over the time, next to the copy-bandwidth
floor. fla 0.6.0 on the H200 (same shapes, float32 state) for comparison:
    B=1: 155 us (simple gla) / 126 us (gated delta); B=64: 299 / 225; B=256: 323 / 256.

When to run it: after a change to the recurrent (decoding) kernel or its launch choices
(--sweep times its tile widths and warps); `linattn bench` times the decoding steps against
fla for claims.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from linattn.ops.decode import delta_rule_decode, linear_attention_decode  # noqa: E402

COPY_TBPS = 4.28  # measured copy bandwidth of the H200 (bytes read + written), TB/s
FLA_US = {("linear_attention", 1): 155, ("linear_attention", 64): 299, ("linear_attention", 256): 323,
          ("delta_rule", 1): 126, ("delta_rule", 64): 225, ("delta_rule", 256): 256}


def make_inputs(op, B, H, K, V, dtype, device="cuda"):
    """One decode step's inputs: q, k [B, 1, H, K], v [B, 1, H, V], gates [B, 1, H], and a
    float32 state [B, H, K, V] (kept small so repeated in-place steps stay finite)."""
    q = torch.randn(B, 1, H, K, device=device, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, 1, H, K, device=device), dim=-1).to(dtype)
    v = torch.randn(B, 1, H, V, device=device, dtype=dtype)
    g = -torch.rand(B, 1, H, device=device) * 0.1
    state = torch.randn(B, H, K, V, device=device) * 0.01
    if op == "linear_attention":
        args = (q, k, v, g)
        fn = linear_attention_decode
    else:
        beta = torch.rand(B, 1, H, device=device)
        args = (q, k, v, beta, g)
        fn = delta_rule_decode
    gate_bytes = sum(a.numel() * a.element_size() for a in args[3:])
    nbytes = (2 * state.numel() * 4                      # state read + written (float32)
              + (2 * q.numel() + v.numel()) * q.element_size() + gate_bytes  # q, k, v, gates
              + v.numel() * v.element_size())            # o written
    return fn, args, state, nbytes


def time_case(op, B, H, K, V, dtype, inplace, **launch):
    from triton.testing import do_bench
    fn, args, state, nbytes = make_inputs(op, B, H, K, V, dtype)
    if launch:  # bypass the public function: the launcher with an explicit tile / warps
        from linattn.ops.triton.recurrent import fused_recurrent
        beta = args[3] if op == "delta_rule" else None
        call = lambda: fused_recurrent(args[0], args[1], args[2], scale=K ** -0.5, g=args[-1],  # noqa: E731
                                       gate_kind="scalar", beta=beta, state=state,
                                       inplace=inplace, **launch)
    else:
        call = lambda: fn(*args, state=state, inplace=inplace)  # noqa: E731
    with torch.inference_mode():
        call()
        torch.cuda.synchronize()
        us = do_bench(call, warmup=50, rep=300, return_mode="median") * 1e3
    return dict(op=op, B=B, H=H, K=K, V=V, dtype=str(dtype).replace("torch.", ""),
                inplace=inplace, us=us, tbps=nbytes / (us * 1e-6) / 1e12,
                floor_us=nbytes / (COPY_TBPS * 1e12) * 1e6, **launch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128, help="head dim K = V")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--sweep", action="store_true", help="also time tile widths x warps")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("time_decode.py needs a CUDA GPU")
    dtype = getattr(torch, a.dtype)
    rows = []
    print(f"{torch.cuda.get_device_name()}, H={a.H}, K=V={a.D}, {a.dtype} q/k/v, float32 state, T=1")
    print(f"{'op':<17}{'B':>5} {'inplace':>8} {'us':>9} {'TB/s':>7} {'floor us':>9} {'fla us':>7}")
    for op in ("linear_attention", "delta_rule"):
        for B in a.B:
            for inplace in (False, True):
                r = time_case(op, B, a.H, a.D, a.D, dtype, inplace)
                rows.append(r)
                fla = FLA_US.get((op, B)) if a.H == 16 and a.D == 128 else None
                print(f"{op:<17}{B:>5} {str(inplace):>8} {r['us']:>9.1f} {r['tbps']:>7.2f} "
                      f"{r['floor_us']:>9.1f} {fla if fla else '-':>7}")
    if a.sweep:
        print("\nsweep (launcher only, inplace=True): block_v x num_warps")
        for op in ("linear_attention", "delta_rule"):
            for B in a.B:
                for bv in (16, 32, 64, 128):
                    for nw in (1, 2, 4, 8):
                        r = time_case(op, B, a.H, a.D, a.D, dtype, True, block_v=bv, num_warps=nw)
                        rows.append(r)
                        print(f"{op:<17}{B:>5} BV={bv:<4} warps={nw:<2} {r['us']:>9.1f} us "
                              f"{r['tbps']:>6.2f} TB/s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
