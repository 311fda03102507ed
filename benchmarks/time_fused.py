"""Times the fused layer pieces (linattn.ops.fused, linattn.ops.linear_ce) on the GPU against
their plain PyTorch paths, eager and torch.compile'd, at the 12-layer d_model 768 model's
shapes: 16384 tokens per step (T 2048 x B 8 and T 8192 x B 2), 6 heads of 128, bf16.

    python benchmarks/time_fused.py --out benchmarks/results/fused_h100.json
    python benchmarks/time_fused.py --no-compile --pieces short_conv,linear_ce
    python benchmarks/time_fused.py --no-compile --cudagraph   # GPU time alone
    python benchmarks/time_fused.py --pieces short_conv,short_conv_l2,l2_normalize --T 8192 --no-compile

Pieces (shapes per step):
    short_conv     DeltaNet's conv + SiLU: x [B, T, 2304] (q, k, v of 6 heads x 128), W 4
    short_conv_l2  that conv with q and k L2-normalised per head inside it (norm_channels
                   1536, groups of 128), returning q, k, v; the "conv+l2" row is the conv
                   followed by l2_normalize of q and of k, as the layers ran it before
    l2_normalize   q from that conv output: a [B, T, 6, 128] strided view
    gated_norm     the output norm: rmsnorm(o [B, T, 6, 128]) * w * silu(gate [B, T, 768])
    rms_norm       the blocks' RMSNorm: [B, T, 768] float32 residual stream -> float32
    swiglu         silu(gate) * up from gate_up [B, T, 2 x 3072]
    linear_ce      the LM head + cross-entropy: h [16384, 768] @ W [32000, 768]^T, mean
                   loss (the plain path forms the [16384, 32000] logits, then float32;
                   "chunked-torch" is the chunked op with its softmax part in PyTorch)
Each row: median ms of triton.testing.do_bench for forward and forward+backward (gradients
of every floating input, with torch.autograd.grad), and the peak memory one forward+backward
allocates above its inputs. Rows are compared within one run on one GPU. "fused" is the
backend "auto" picks; for l2_normalize and rms_norm, whose "auto" runs PyTorch when autograd
records the call, a "triton" row times the Triton kernels forward and backward.

When to run it: on one GPU after a change to a fused layer piece (linattn/ops/fused.py,
linattn/ops/linear_ce.py) or to the rule choosing Triton or PyTorch for it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from linattn.ops import fused  # noqa: E402
from linattn.ops.linear_ce import linear_cross_entropy  # noqa: E402

TOKENS, H, D, D_MODEL, HIDDEN, VOCAB, W = 16384, 6, 128, 768, 3072, 32000, 4
PIECES = ("short_conv", "short_conv_l2", "l2_normalize", "gated_norm", "rms_norm", "swiglu",
          "linear_ce")
CONV_PIECES = ("short_conv", "short_conv_l2")  # timed at every T (the others see tokens)
# pieces whose "auto" takes PyTorch when a gradient is recorded (linattn.ops.fused): their
# "fused" row is PyTorch in fwd+bwd, and a "triton" row times the Triton path
AUTO_TORCH_UNDER_AUTOGRAD = ("l2_normalize", "rms_norm")


def make_case(piece: str, T: int, dtype=torch.bfloat16, dev="cuda"):
    """(inputs: list of leaf tensors, fn(backend, *inputs) -> output tensor)."""
    B = TOKENS // T

    def leaf(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, device=dev, dtype=torch.float32) * scale).to(dt).requires_grad_()

    if piece == "short_conv":
        C = 2 * H * D + H * D
        return [leaf(B, T, C), leaf(C, W, dt=torch.float32, scale=0.5)], \
            lambda be, x, w: fused.short_conv(x, w, backend=be)[0]
    if piece == "short_conv_l2":
        C = 2 * H * D + H * D

        def conv_l2(be, x, w):
            if be == "unfused":  # the conv, then q's and k's norms as separate calls
                q, k, v = fused.short_conv(x, w)[0].split(H * D, dim=-1)
                return (fused.l2_normalize(q.unflatten(-1, (H, D))),
                        fused.l2_normalize(k.unflatten(-1, (H, D))), v)
            y = fused.short_conv(x, w, backend=be, norm_channels=2 * H * D, norm_group=D)[0]
            q, k, v = y.split(H * D, dim=-1)
            return q.unflatten(-1, (H, D)), k.unflatten(-1, (H, D)), v
        return [leaf(B, T, C), leaf(C, W, dt=torch.float32, scale=0.5)], conv_l2
    if piece == "l2_normalize":
        return [leaf(B, T, 3 * H * D)], \
            lambda be, x: fused.l2_normalize(x[..., :H * D].unflatten(-1, (H, D)), backend=be)
    if piece == "gated_norm":
        return [leaf(B, T, H, D), leaf(B, T, H * D), leaf(D, dt=torch.float32)], \
            lambda be, o, g, w: fused.gated_rms_norm(o, w, g, "silu", 1e-6, backend=be)
    if piece == "rms_norm":
        return [leaf(B, T, D_MODEL, dt=torch.float32), leaf(D_MODEL, dt=torch.float32)], \
            lambda be, x, w: fused.rms_norm(x, w, 1e-6, backend=be)
    if piece == "swiglu":
        return [leaf(B, T, 2 * HIDDEN)], lambda be, gu: fused.swiglu(gu, backend=be)
    if piece == "linear_ce":
        targets = torch.randint(0, VOCAB, (TOKENS,), device=dev)

        def ce(be, h, w):
            if be == "torch":
                return F.cross_entropy(F.linear(h, w).float(), targets)
            if be == "chunked":  # the chunked op with its softmax part in PyTorch
                return linear_cross_entropy(h, w, targets, backend="torch")
            return linear_cross_entropy(h, w, targets)
        return [leaf(TOKENS, D_MODEL), leaf(VOCAB, D_MODEL, scale=0.02)], ce
    raise ValueError(f"unknown piece {piece!r}; pieces: {PIECES}")


def time_impl(fn, inputs, reps_ms: int = 200, cudagraph: bool = False):
    """(fwd ms, fwd+bwd ms, peak extra MiB of one fwd+bwd). fn returns a tensor or a tuple of
    them (each gets a random cotangent). cudagraph: time calls replayed from a CUDA graph (the
    GPU's time alone, without the host's dispatch and launch cost)."""
    from triton.testing import do_bench, do_bench_cudagraph

    def bench(f):
        if cudagraph:  # one graph of rep / (one call's ms) calls: a short rep keeps it small
            return do_bench_cudagraph(f, rep=min(reps_ms, 50), return_mode="median")
        return do_bench(f, rep=reps_ms)
    def outs(*a):
        out = fn(*a)
        return out if isinstance(out, tuple) else (out,)
    with torch.no_grad():
        grad = tuple(torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs(*inputs))

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        torch.autograd.grad(outs(*inputs), inputs, grad)

    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return bench(fwd), bench(fwd_bwd), peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--pieces", default=",".join(PIECES))
    ap.add_argument("--T", default="2048,8192", help="sequence lengths (16384 tokens each)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile'd PyTorch")
    ap.add_argument("--cudagraph", action="store_true",
                    help="time CUDA-graph replays (GPU time without host overhead)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("time_fused needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    torch.manual_seed(0)
    pieces = [p for p in args.pieces.split(",") if p]
    Ts = [int(t) for t in args.T.split(",")]
    rows = []
    for piece in pieces:
        # the pieces other than the conv see tokens, not T: time them at the first T only
        for T in (Ts if piece in CONV_PIECES else Ts[:1]):
            inputs, fn = make_case(piece, T)
            impls = [("fused", lambda *a: fn("auto", *a)), ("torch", lambda *a: fn("torch", *a))]
            if piece in AUTO_TORCH_UNDER_AUTOGRAD:  # "fused" is PyTorch here: time Triton too
                impls.append(("triton", lambda *a: fn("triton", *a)))
            if piece == "linear_ce":
                impls.append(("chunked-torch", lambda *a: fn("chunked", *a)))
            if piece == "short_conv_l2":
                impls.append(("conv+l2", lambda *a: fn("unfused", *a)))
            if not args.no_compile:
                impls.append(("torch.compile", torch.compile(lambda *a: fn("torch", *a))))
            for name, impl in impls:
                t0 = time.time()
                try:
                    f_ms, fb_ms, peak = time_impl(impl, inputs, cudagraph=args.cudagraph)
                    err = None
                except Exception as e:  # a compile failure is a row, not the end of the run
                    f_ms = fb_ms = peak = float("nan")
                    err = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(dict(piece=piece, T=T if piece in CONV_PIECES else None,
                                 tokens=TOKENS, impl=name, fwd_ms=f_ms, fwd_bwd_ms=fb_ms,
                                 peak_mib=peak, error=err, wall_s=round(time.time() - t0, 1)))
            torch._dynamo.reset()
    base = {(r["piece"], r["T"]): r for r in rows if r["impl"] == "torch"}
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}"
          f" | bf16, {TOKENS} tokens | {'CUDA-graph replays' if args.cudagraph else 'eager calls'}")
    print(f"{'piece':<13} {'T':>5} {'impl':<14} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak MiB':>9} "
          f"{'fwd x':>6} {'f+b x':>6}")
    for r in rows:
        b = base[(r["piece"], r["T"])]
        sp = [b[k] / r[k] if r[k] == r[k] and r[k] > 0 else float("nan") for k in ("fwd_ms", "fwd_bwd_ms")]
        r["speedup_fwd"], r["speedup_fwd_bwd"] = sp
        print(f"{r['piece']:<13} {str(r['T'] or '-'):>5} {r['impl']:<14} {r['fwd_ms']:>8.3f} "
              f"{r['fwd_bwd_ms']:>11.3f} {r['peak_mib']:>9.0f} {sp[0]:>6.2f} {sp[1]:>6.2f}"
              + (f"  {r['error']}" if r["error"] else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                    triton=triton.__version__, date=time.strftime("%Y-%m-%d"), dtype="bfloat16",
                    tokens=TOKENS, d_model=D_MODEL, heads=H, head_dim=D, vocab=VOCAB,
                    timing="cudagraph" if args.cudagraph else "eager")
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
