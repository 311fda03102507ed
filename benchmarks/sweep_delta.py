"""Launch-setting sweep of the delta-rule kernels: per-kernel times under each variant.

Each variant is a DeltaConfig (config_of: launch overrides per kernel (num_warps, num_stages),
the V-tile caps (TILE_CAPS) and other fields ("flags")); for each, one op (DeltaNet or Gated
DeltaNet, bf16, B*T = 65536, H = 16, D = 128 or --D) runs a warm-up forward+backward
(compile), is timed end to end with do_bench, and then profiled per kernel
(benchmarks/profile_kernels.profile_one). The table printed last has a row per kernel and a
column per variant, so the best setting of each kernel can be read off even when variants
change several kernels at once. Not a benchmark
(`linattn bench` is where claims come from).

    PYTHONPATH=. python3 benchmarks/sweep_delta.py --json $OUT/sweep_delta.json [--kinds delta]

When to run it: on a new GPU, a new Triton version, or before changing a launch choice of
the delta-rule kernels (linattn/ops/triton/delta_config.py); the winners go there and
`linattn bench` confirms them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_kernels  # noqa: E402

from linattn.ops.triton.delta_config import DEFAULT, DeltaConfig  # noqa: E402

# name -> {kernel: launch overrides}; TILE_CAPS' keys set V-tile caps, "flags" other
# DeltaConfig fields (named as the module constants they once were)
VARIANTS = {
    "default": {},
    "warps_swapped": {"prep": dict(num_warps=8), "scan": dict(num_warps=4),
                      "output": dict(num_warps=8), "reverse_scan": dict(num_warps=8),
                      "grads_qk": dict(num_warps=8), "grads_wy": dict(num_warps=8)},
    "stages_swapped": {"prep": dict(num_stages=1), "scan": dict(num_stages=1),
                       "output": dict(num_stages=1), "reverse_scan": dict(num_stages=2),
                       "grads_qk": dict(num_stages=1), "grads_wy": dict(num_stages=2)},
    # the forward scan on 4 warps and 1 stage: 72 KB of shared memory and 255 registers (24 B
    # of spills) let 2 programs share an SM, so its 256 programs (B 8, H 16, V / 64) run in one
    # wave; on 8 warps and 2 stages (120 KB) one per SM, 1.94 waves (sm_90 compile counts)
    "scan_w4s1": {"scan": dict(num_warps=4, num_stages=1)},
    # prep under a 168-register cap: 3 programs of 4 warps per SM instead of 2 (244 registers),
    # for 220 B of spills (260 gated) on sm_90; 128 spills 640 B
    "prep_r168": {"prep": dict(maxnreg=168)},
    # the output kernel's V tile: 128 is the default since the 14th session, 64 the former one
    "output_bv128": {"output_bv": 128},
    "output_bv64": {"output_bv": 64},
    "output_bv128_w8": {"output_bv": 128, "output": dict(num_warps=8)},
    # the output (gated_fwd.fwd_o since it replaced delta_output_kernel, never swept): the
    # gated family's no-gate settings (2 stages, BV 128) and steps towards them
    "out_s2": {"output": dict(num_stages=2)},
    "out_s3": {"output": dict(num_stages=3)},
    "out_bv128_s2": {"output_bv": 128, "output": dict(num_stages=2)},
    "out_bv128_s2_w8": {"output_bv": 128, "output": dict(num_stages=2, num_warps=8)},
    # two of the 8th session's winners together (one at a time in its sweep)
    "combined": {"scan": dict(num_warps=4, num_stages=1), "prep": dict(maxnreg=168)},
    # 32-wide V tiles in the scans: 512 programs of half the state each (sm_90 counts below)
    "rs_bv32": {"rs_bv": 32},
    "rs_bv32_w8": {"rs_bv": 32, "reverse_scan": dict(num_warps=8)},
    "rs_bv32_s2": {"rs_bv": 32, "reverse_scan": dict(num_stages=2)},
    "scan_bv32": {"scan_bv": 32, "scan": dict(num_warps=4, num_stages=1)},
    "rs_bv32_r168": {"rs_bv": 32, "reverse_scan": dict(maxnreg=168)},
    "out_s3_r168": {"output": dict(num_stages=3, maxnreg=168)},
    # storage dtypes back to float32, one flag at a time (see delta_fwd / delta_bwd)
    "f32_states": {"flags": {"delta_fwd.STATES_IN_INPUT_DTYPE": False}},
    "f32_grads": {"flags": {"delta_bwd.GRADS_IN_INPUT_DTYPE": False}},
    # the scans' dots on float32 values by tf32 again instead of two 16-bit halves (main's form)
    "scan_nosplit": {"flags": {"delta_fwd.SCAN_SPLIT16": False}},
    "rs_nosplit": {"flags": {"delta_bwd.REVERSE_SCAN_SPLIT16": False}},
    # grads_wy's split off (on from 64-wide K tiles: NaN in dk at K = 16 on the GPU)
    "wy_nosplit": {"flags": {"delta_bwd.GRADS_WY_SPLIT16": False}},
    # Gated DeltaNet's reverse scan unsplit (it splits on 64-wide V blocks: O(1) gradient
    # errors on 16-wide ones; see delta_bwd)
    "rs_narrow_nosplit": {"flags": {"delta_bwd.REVERSE_SCAN_SPLIT16_MIN_BV": 1 << 30}},
    # D = 256 (a 256-wide state tile; H200 2026-11-29, DeltaNet 39.96 ms at BV 32, the scans
    # 6.63 + 19.02 of it; 30.10 at BV 64, now the default): V tiles of 16 / 32, 4 warps
    # instead of 8 (2 stages need more than the H200's 227 KiB of shared memory)
    "k256_bv16": {"flags": {"delta_fwd.STATE_TILE_ELEMS": 4096}},
    "k256_bv16_w4": {"flags": {"delta_fwd.STATE_TILE_ELEMS": 4096},
                     "scan_k256": dict(num_warps=4), "reverse_scan_k256": dict(num_warps=4)},
    "k256_bv32": {"flags": {"delta_fwd.STATE_TILE_ELEMS": 8192}},
    "k256_bv32_w4": {"flags": {"delta_fwd.STATE_TILE_ELEMS": 8192},
                     "scan_k256": dict(num_warps=4), "reverse_scan_k256": dict(num_warps=4)},
    "k256_w4": {"scan_k256": dict(num_warps=4), "reverse_scan_k256": dict(num_warps=4)},
    # (since the 13th session "scan_k256" launches the unsplit forward scan only: float32
    # inputs, or fwd_nosplit256 below; bf16's split scan takes "scan_k256_split", 4 warps)
    # the reverse scan unsplit at K 256 (its split there since the 13th session, PERF_NOTES 29)
    "k256_nosplit": {"flags": {"delta_bwd.REVERSE_SCAN_SPLIT16_MAX_BK": 128}},
    # the forward scan's K 256 split on 8 warps: wrong on the H200 (timing reference only)
    "fwd_split256_w8": {"scan_k256_split": dict(num_warps=8)},
    # the forward scan unsplit at K 256 (main's form until the 13th session) on 8 and 4 warps
    "fwd_nosplit256": {"flags": {"delta_fwd.SCAN_SPLIT16_MAX_BK": 128}},
    "fwd_nosplit256_w4": {"flags": {"delta_fwd.SCAN_SPLIT16_MAX_BK": 128},
                          "scan_k256": dict(num_warps=4)},
    # the reverse scan's masked scores from delta_bwd_scores_kernel (on from K 256 here) at
    # every K, and nowhere (its in-loop K Q^T, main's form)
    "scores_all": {"flags": {"delta_bwd.REVERSE_SCAN_SCORES_MIN_BK": 16}},
    "scores_off": {"flags": {"delta_bwd.REVERSE_SCAN_SCORES_MIN_BK": 1 << 30}},
    # prep on 4 warps (2 since W and U left it), the scans' launch around the new dots
    "prep_w4": {"prep": dict(num_warps=4)},
    "scan_s2": {"scan": dict(num_stages=2)},
    "scan_w8": {"scan": dict(num_warps=8)},
    "rs_s2": {"reverse_scan": dict(num_stages=2)},
    # grads_qk (one program per chunk, head and K tile) launch and V tiles; 64-wide gated
    # tiles were wrong on the H200 (see delta_bwd.GRADS_QK_TILE_BV_GATED)
    "qk_w8": {"grads_qk": dict(num_warps=8)},
    "qk_s1": {"grads_qk": dict(num_stages=1)},
    "qk_s3": {"grads_qk": dict(num_stages=3)},  # gated: faster but wrong on the H200 (14th)
    "qk_bv32": {"qk_bv": 32},
    # gated on 64-wide V tiles (wrong on the H200 at 2 stages, run to run different), without
    # the software pipeline (1 stage) and with a deeper one (3): is the fault the pipeline's?
    "qk_g64": {"flags": {"delta_bwd.GRADS_QK_TILE_BV_GATED": 64}},
    "qk_g64_s1": {"flags": {"delta_bwd.GRADS_QK_TILE_BV_GATED": 64},
                  "grads_qk": dict(num_stages=1)},
    "qk_g64_s3": {"flags": {"delta_bwd.GRADS_QK_TILE_BV_GATED": 64},
                  "grads_qk": dict(num_stages=3)},
    # the scans' float32 dot operands (S, U', dS', ...) as split16's two 16-bit halves, two dots
    # each (scan_dot16_parts, reverse_scan_dot16_parts = 2; the default is 1, rounded)
    "halves": {"flags": {"delta_fwd.SCAN_DOT16_PARTS": 2, "delta_bwd.REVERSE_SCAN_DOT16_PARTS": 2}},
    "scan_halves": {"flags": {"delta_fwd.SCAN_DOT16_PARTS": 2}},
    "rs_halves": {"flags": {"delta_bwd.REVERSE_SCAN_DOT16_PARTS": 2}},
    # main's forms of every option (grads_wy's one dot of dKK + dKK^T stays: less work)
    "main_form": {"flags": {"delta_fwd.SCAN_SPLIT16": False, "delta_bwd.REVERSE_SCAN_SPLIT16": False,
                            "delta_bwd.GRADS_WY_SPLIT16": False}},
}
# variant keys that set a V-tile cap: key -> DeltaConfig field; qk_bv is the ungated one
TILE_CAPS = {"output_bv": "output_bv", "qk_bv": "grads_qk_tile_bv", "scan_bv": "scan_bv",
             "rs_bv": "reverse_scan_bv"}
KERNEL_NAMES = {"delta_prep_kernel": "prep", "delta_scan_kernel": "scan",
                "fwd_o_kernel": "output", "delta_bwd_scan_kernel": "reverse_scan",
                "delta_bwd_dqk_kernel": "grads_qk", "delta_bwd_wy_kernel": "grads_wy",
                "delta_bwd_scores_kernel": "scores"}


def config_of(variant: dict) -> DeltaConfig:
    """The variant as a DeltaConfig: launch overrides per kernel, tile caps, and "flags"
    naming DeltaConfig fields ("delta_fwd.SCAN_SPLIT16" is the field scan_split16)."""
    fields = {TILE_CAPS[k]: v for k, v in variant.items() if k in TILE_CAPS}
    fields.update({path.split(".")[-1].lower(): v for path, v in variant.get("flags", {}).items()})
    cfg = dataclasses.replace(DEFAULT, **fields)
    for name, over in variant.items():
        if name not in TILE_CAPS and name != "flags":
            cfg = cfg.with_launch(name, **over)
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="delta")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    profile_kernels.add_shape_args(ap)
    args = ap.parse_args()
    import triton.testing
    names = args.variants.split(",")
    result = {}
    for kind in args.kinds.split(","):
        for name in names:
            cfg = config_of(VARIANTS[name])
            try:
                step = profile_kernels.fwd_bwd_step(kind, args.B, args.T, args.H, args.D, cfg)
                step()
                ms = triton.testing.do_bench(step, return_mode="median")
                rows, _ = profile_kernels.profile_one(kind, args.B, args.T, args.H, args.D, cfg)
            except Exception as e:  # report and go on
                print(f"== {kind} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                result[f"{kind}/{name}"] = {"error": f"{type(e).__name__}: {e}"}
                continue
            per = {}
            for r in rows:
                short = next((v for k, v in KERNEL_NAMES.items() if k in r["kernel"]), None)
                per[short or "other"] = per.get(short or "other", 0.0) + r["ms_per_step"]
            result[f"{kind}/{name}"] = {"fwd_bwd_ms": ms, "kernels_ms": per, "variant": VARIANTS[name]}
            print(f"{kind:12s} {name:18s} fwd+bwd {ms:7.3f} ms  "
                  + " ".join(f"{k}={v:.2f}" for k, v in sorted(per.items())), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    # the table: kernel x variant, per kind
    for kind in args.kinds.split(","):
        done = [n for n in names if "kernels_ms" in result.get(f"{kind}/{n}", {})]
        print(f"\n{kind}: ms per fwd+bwd (kernels from the profiler)")
        print(f"{'kernel':14s}" + "".join(f"{n[:16]:>17s}" for n in done))
        kernels = sorted({k for n in done for k in result[f"{kind}/{n}"]["kernels_ms"]})
        for kname in kernels + ["TOTAL"]:
            cells = []
            for n in done:
                r = result[f"{kind}/{n}"]
                cells.append(r["fwd_bwd_ms"] if kname == "TOTAL" else r["kernels_ms"].get(kname, 0.0))
            print(f"{kname:14s}" + "".join(f"{c:17.3f}" for c in cells))


if __name__ == "__main__":
    main()
