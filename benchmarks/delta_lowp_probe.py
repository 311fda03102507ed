"""Which delta-rule intermediates can be stored in 16 bits? A CPU precision probe.

fla keeps W, U, U' (vnew) and the chunk states h in bf16, which halves their memory traffic
against float32 (each float32 [TT, H, 128] tensor is 512 MiB per pass at the bench shape).
The Triton delta-rule kernels store h, U', dU', dW and dk_part in the inputs' dtype for
16-bit inputs and do not form W or U at all (the points w and u model kernels that would).
This probe runs the chunked PyTorch path in float64
with chosen intermediates rounded to bf16 where a kernel would store them, and checks the
result with the tests' own rule (tests/helpers.check_against_oracle: outputs within 3x and
gradients within 5x the error of rounding the inputs alone), on the delta tests' inputs:
unit keys, and unnormalised keys with beta ||k||^2 up to 2, gated and not.

Rounding points (forward values; autograd passes gradients through a rounding unchanged, so
this probes the forward's stored values, as the backward would read them):
    h     the chunk-start state as the output and the backward read it (the scan carries S
          exactly)
    vnew  U' as the output reads it (the state update uses the exact U')
    w     W as the scan reads it (U' = U - W S: cancels when keys are not normalised)
    u     U as the scan reads it (same cancellation)
    S     the state the scan carries, every chunk (a control the rule should reject: the
          kernels never do this)
    kS    S rounded as the operand of K S (W S) only: one 16-bit dot, as fla's scan
    upd   U' rounded as the operand of the state update K^T U' only (one 16-bit dot)
Backward points (the gradient flowing into a value rounded, as a kernel storing it would):
    dvnew dU' (delta_bwd's dv2), rounded for every reader, the reverse scan's dS update too
          (the kernel keeps that one in float32: the probe is the stricter of the two)
    dw    dW (delta_bwd's dw, read by grads_wy)
    dS16  dS' rounded where the reverse scan's K dS' dot (and dk's) reads it
    dkpart  dk's part through Q K^T and the state update (delta_bwd's dk_part), rounded per use

    PYTHONPATH=. python3 benchmarks/delta_lowp_probe.py [--T 256] [--seeds 3]

When to run it: on the CPU before a delta-rule kernel stores another intermediate in 16 bits
(or drops one to recompute it), before spending GPU time on the change (PERF_NOTES.md's
lessons).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "ops" / "triton"))

import helpers  # noqa: E402
import test_delta_triton as TD  # noqa: E402

import linattn  # noqa: E402
from linattn.ops import torch_chunked  # noqa: E402
from linattn.ops.torch_chunked import _causal_log_mask  # noqa: E402

LOW = torch.bfloat16


def rounded(x, on: bool):
    """x rounded to LOW and back (autograd: identity), or x."""
    return x.to(LOW).to(x.dtype) if on else x


class _RoundGrad(torch.autograd.Function):
    """Identity forward; the backward rounds the incoming gradient to LOW (a kernel storing that
    gradient in 16 bits for a later kernel to read)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.to(LOW).to(g.dtype)


def grad_rounded(x, on: bool):
    return _RoundGrad.apply(x) if on else x


def delta_chunks_rounding(points: set):
    """torch_chunked._delta_chunks with the given intermediates rounded to LOW."""
    def chunks(state, q, k, v, beta, g):
        L = q.shape[3]
        k_in = k
        # dk's state-and-output part (delta_bwd's dk_part): the gradient through k's uses in
        # Q K^T and in the state update, each rounded (the kernel rounds their sum once)
        k = grad_rounded(k, "dkpart" in points)
        if g is None:
            gamma = torch.ones(L, L, dtype=q.dtype, device=q.device).tril()
            q_in, k_out, chunk_decay, beta_eb = q, k, None, beta
        else:
            b = g.cumsum(dim=-1)
            gamma = torch.exp(_causal_log_mask(b))
            b_last = b[..., -1:]
            q_in = q * torch.exp(b).unsqueeze(-1)
            k_out = k * torch.exp(b_last - b).unsqueeze(-1)
            chunk_decay = torch.exp(b_last).unsqueeze(-1)
            beta_eb = beta * torch.exp(b)
        eye = torch.eye(L, dtype=q.dtype, device=q.device)
        a = (beta.unsqueeze(-1) * (k_in @ k_in.transpose(-1, -2)) * gamma).tril(-1)
        w = torch.linalg.solve_triangular(eye + a, beta_eb.unsqueeze(-1) * k_in, upper=False,
                                          unitriangular=True)
        u = torch.linalg.solve_triangular(eye + a, beta.unsqueeze(-1) * v, upper=False,
                                          unitriangular=True)
        w, u = rounded(w, "w" in points), rounded(u, "u" in points)
        w = grad_rounded(w, "dw" in points)                     # dW (delta_bwd's dw)
        attn = (q @ k.transpose(-1, -2)) * gamma
        outs = []
        for n in range(q.shape[2]):
            # dU' rounded where every reader sees it, the recurrence's dS update included
            # (the kernels keep that one in float32): a conservative stand-in for dv2 in 16 bits
            s_ks = rounded(state, "kS" in points)  # S as a single 16-bit dot's operand
            u_n = grad_rounded(u[:, :, n] - w[:, :, n] @ s_ks, "dvnew" in points)
            outs.append(q_in[:, :, n] @ rounded(state, "h" in points)
                        + attn[:, :, n] @ rounded(u_n, "vnew" in points))
            decayed = state if chunk_decay is None else chunk_decay[:, :, n] * state
            # K^T U' with U' (decay-weighted) as a 16-bit dot operand; its gradient dS'
            # rounded for the reverse scan's K dS' dot (and dk's) when dS16
            upd = k_out[:, :, n].transpose(-1, -2) @ rounded(u_n, "upd" in points)
            state = rounded(decayed + grad_rounded(upd, "dS16" in points), "S" in points)
        return torch.stack(outs, dim=2), state
    return chunks


def probe(points: set, case: dict) -> str:
    """'ok', or the first failing check's message."""
    saved = torch_chunked._delta_chunks
    torch_chunked._delta_chunks = delta_chunks_rounding(points)
    try:
        names = [n for n in TD.GRADS if case.get(n) is not None]
        fast = lambda **kw: linattn.delta_rule(**kw, backend="torch")  # noqa: E731
        helpers.check_against_oracle(fast, TD.oracle, case, dtype=LOW, grad_names=names,
                                     output_final_state=True)
        return "ok"
    except AssertionError as e:
        return str(e).split("\n")[0][:90]
    finally:
        torch_chunked._delta_chunks = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--sets", default="", help="comma-separated '+'-joined rounding points, e.g. none,dvnew,h+dw")
    args = ap.parse_args()
    cases = {}
    for gated, knorm, seed in itertools.product((False, True), (None, "free"), range(args.seeds)):
        cases[f"{'gdn' if gated else 'dn'}-{knorm or 'unit'}-s{seed}"] = TD.make_inputs(
            1, args.T, 2, args.K, args.K, gated=gated, seed=seed, knorm=knorm)
    sets = [set(), {"h"}, {"vnew"}, {"h", "vnew"}, {"w"}, {"u"}, {"h", "vnew", "w", "u"}, {"S"},
            {"dvnew"}, {"dw"}, {"dvnew", "dw"}, {"h", "dvnew", "dw"}]
    if args.sets:
        sets = [set(x.split("+")) - {"none"} for x in args.sets.split(",")]
    for pts in sets:
        label = "+".join(sorted(pts)) or "none (control)"
        results = {name: probe(pts, case) for name, case in cases.items()}
        bad = {n: r for n, r in results.items() if r != "ok"}
        print(f"{label:22s} {len(results) - len(bad)}/{len(results)} pass"
              + "".join(f"\n    {n}: {r}" for n, r in bad.items()), flush=True)


if __name__ == "__main__":
    main()
