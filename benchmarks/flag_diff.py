"""A kernel option against the default on the GPU, in a minute: the same op, inputs and
cotangent under several settings (the delta rule's DeltaConfig fields, the gated family's
gated_api.Override), each in its own process (a miscompiled kernel's illegal address cannot
poison the others), every output and gradient compared with the first setting's as
max |diff| / max |base|.

The GPU tests compare against the float64 oracle, whose step loops on the CPU take minutes;
this compares kernels with kernels, so it finds an option that breaks a kernel (NaN, an O(1)
error, an illegal address under CUDA_LAUNCH_BLOCKING=1) fast, before the tests and the sweeps
run it. It does not replace them: a difference at the level of the dtype's rounding is
expected (the options round differently), and only the tests bound it.

    python benchmarks/flag_diff.py --op delta \\
        --settings "on=;off=delta.grads_wy_split16=0;w8=delta.launch.grads_wy.num_warps=8"

Run it when a launch choice or a Triton version changes, before the GPU tests.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKED = [0, 1, 2, 15, 63, 64, 65, 127, 300, 3]  # sequence lengths with cu_seqlens


def set_flags(spec: str) -> dict:
    """"NAME=V,..." -> {"config": the delta rule's DeltaConfig, "override": the gated
    family's gated_api.Override} (None where no item names them). delta.FIELD=V sets a
    DeltaConfig field (0 / 1 for a bool, else an int; delta_fwd.X / delta_bwd.X, the names the
    fields had as module constants, mean delta.x), delta.launch.KERNEL.OPTION=V a launch
    option (num_warps, num_stages, maxnreg, ...); gated.chunk=V, gated.tile=V and
    gated.FIELD=V (a KernelConfig field) the Override (gated_api.CHUNK / TILE mean
    gated.chunk / tile). Settings are values passed to the ops: no module state is changed."""
    import dataclasses
    from linattn.ops.triton.delta_config import DEFAULT
    from linattn.ops.triton.gated_api import Override
    cfg = override = None
    for item in filter(None, spec.split(",")):
        name, value = item.split("=")
        mod, *path = name.split(".")
        if mod == "gated_api" and path in (["CHUNK"], ["TILE"]):
            mod, path = "gated", [path[0].lower()]
        if mod == "gated":
            override = override or Override()
            if path in (["chunk"], ["tile"]):
                override = dataclasses.replace(override, **{path[0]: int(value)})
            elif len(path) == 1:
                override = dataclasses.replace(
                    override, fields=override.fields + ((path[0], int(value)),))
            else:
                raise SystemExit(f"flag_diff: no {name}")
            continue
        if mod in ("delta_fwd", "delta_bwd") and path and path[0] == "LAUNCH":
            mod, path = "delta", ["launch", *path[1:]]
        elif mod in ("delta_fwd", "delta_bwd") and len(path) == 1 and \
                hasattr(DEFAULT, path[0].lower()):
            mod, path = "delta", [path[0].lower()]
        if mod == "delta":
            cfg = cfg or DEFAULT
            if path[0] == "launch" and len(path) == 3:
                cfg = cfg.with_launch(path[1], **{path[2]: int(value)})
            elif len(path) == 1 and hasattr(cfg, path[0]) and path[0] != "launch":
                old = getattr(cfg, path[0])
                new = bool(int(value)) if isinstance(old, bool) else int(value)
                cfg = dataclasses.replace(cfg, **{path[0]: new})
            else:
                raise SystemExit(f"flag_diff: no {name}")
            continue
        raise SystemExit(f"flag_diff: no {name} (settings are delta.FIELD, "
                         "delta.launch.KERNEL.OPTION, gated.chunk, gated.tile, gated.FIELD)")
    return {"config": cfg, "override": override}


def cases(op: str, device: str):
    """(name, gated, B, T, K, V, lengths or None, with initial state) for the op; on the CPU
    (the interpreter, float16: a smoke run of this script) one small case."""
    if device == "cpu":
        return [("tiny_pack", True, 1, 80, 16, 32, [0, 17, 63], True)]
    if op == "delta":
        return [("g100x64_pack", True, 1, sum(PACKED), 100, 64, PACKED, True),
                ("g128_T1000", True, 2, 1000, 128, 128, None, True),
                ("d64x100_pack", False, 1, sum(PACKED), 64, 100, PACKED, True),
                ("d16x256_pack", False, 1, sum(PACKED), 16, 256, PACKED, False),
                ("d128x256", False, 2, 300, 128, 256, None, True),
                ("d256x64", False, 2, 300, 256, 64, None, True),
                ("d256x256", False, 2, 300, 256, 256, None, True),
                ("g256x256", True, 2, 300, 256, 256, None, True)]
    return [("K128_T2048", None, 2, 2048, 128, 128, None, False),
            ("K128_T2048_h0", None, 2, 2048, 128, 128, None, True),
            ("K100x72_pack", None, 1, sum(PACKED), 100, 72, PACKED, False),
            ("K256x64_T700", None, 2, 700, 256, 64, None, False)]


def run_case(op, gated, B, T, K, V, lengths, h0, dev, config=None, override=None):
    """One forward+backward on seeded bf16 inputs (float16 on the CPU, where the interpreter
    cannot run bf16), the delta rule with launch choices config, mLSTMexp with the gated
    family's override (None: the defaults): {name: float32 tensor on the CPU}."""
    import linattn
    H = 2
    half = torch.bfloat16 if dev == "cuda" else torch.float16
    gen = torch.Generator(device="cpu").manual_seed(T + K)
    rnd = lambda *s: torch.randn(*s, generator=gen)                         # noqa: E731
    N = len(lengths) if lengths else B
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    kw = {}
    if lengths:
        kw["cu_seqlens"] = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)),
                                        dtype=torch.int32, device=dev)
    if op == "delta":
        k = k / k.norm(dim=-1, keepdim=True)
        x = dict(q=q, k=k, v=v, beta=torch.rand(B, T, H, generator=gen),
                 g=-torch.rand(B, T, H, generator=gen) if gated else None)
        if h0:
            kw["initial_state"] = rnd(N, H, K, V).to(dev).requires_grad_()
        from linattn.ops.triton import delta_api

        def fn(q, k, v, beta, g, backend, **rest):
            return delta_api.delta_rule(q, k, v, beta, g, scale=K ** -0.5, config=config, **rest)
    else:
        x = dict(q=q, k=k, v=v, i=rnd(B, T, H) * 3, f=rnd(B, T, H) * 3 + 3)
        if h0:
            kw["initial_state"] = tuple(t.to(dev).requires_grad_() for t in (
                rnd(N, H, K, V), rnd(N, H, K), rnd(N, H)))
        from linattn.ops.triton import gated_api

        def fn(q, k, v, i, f, backend, **rest):
            if override is None:
                return linattn.mlstm(q, k, v, i, f, backend=backend, **rest)
            return gated_api.mlstm(q, k, v, i, f, scale=K ** -0.5, override=override, **rest)
    x = {n: None if t is None else
         t.to(dev, half if n in ("q", "k", "v") else torch.float32).requires_grad_()
         for n, t in x.items()}
    o, final = fn(**x, **kw, output_final_state=True, backend="triton")
    finals = final if isinstance(final, tuple) else (final,)
    cot = torch.randn(o.shape, generator=gen).to(dev)
    loss = (o.float() * cot).sum() + sum(f.float().sum() for f in finals)
    leaves = {n: t for n, t in x.items() if t is not None}
    state = kw.get("initial_state")
    for j, t in enumerate(state if isinstance(state, tuple) else (state,) if state is not None
                          else ()):
        leaves[f"h0_{j}"] = t
    grads = torch.autograd.grad(loss, list(leaves.values()))
    out = {"o": o, **{f"final_{j}": f for j, f in enumerate(finals)},
           **{"d" + n: g for n, g in zip(leaves, grads)}}
    return {n: t.detach().float().cpu() for n, t in out.items()}


def child(args) -> None:
    values = set_flags(args.flags)
    results = {}
    for name, gated, B, T, K, V, lengths, h0 in cases(args.op, args.device):
        try:
            results[name] = run_case(args.op, gated, B, T, K, V, lengths, h0, args.device,
                                     **values)
            if args.device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # an illegal address poisons the context: stop here
            results[name] = f"{type(e).__name__}: {str(e)[:200]}"
            frames = [f for f in traceback.format_exc().splitlines() if "linattn/ops" in f]
            results[name] += f" (at {frames[-1].strip()})" if frames else ""
            break
    torch.save(results, args.child)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=("delta", "mlstm_exp"), default="delta")
    p.add_argument("--settings", required=True,
                   help='"label=mod.FLAG=0|1,...;label2=..." (the first is the base)')
    p.add_argument("--json", help="write the table here")
    p.add_argument("--timeout", type=int, default=150)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--flags", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    settings = [s.split("=", 1) if "=" in s else (s, "") for s in args.settings.split(";")]
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = {label: subprocess.Popen(
        [sys.executable, __file__, "--op", args.op, "--settings", args.settings, "--device",
         args.device,
         "--child", f"/tmp/flag_diff_{label}.pt", "--flags", flags], env=env)
        for label, flags in settings}
    for label, proc in procs.items():
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    got = {label: torch.load(f"/tmp/flag_diff_{label}.pt")
           if os.path.exists(f"/tmp/flag_diff_{label}.pt") else {} for label, _ in settings}
    base_label = settings[0][0]
    table = {}
    for label, _ in settings[1:]:
        for case, base in got[base_label].items():
            r = got[label].get(case, "not run")
            if isinstance(base, str) or isinstance(r, str):
                table[f"{label} {case}"] = r if isinstance(r, str) else f"base: {base}"
            else:
                table[f"{label} {case}"] = {
                    n: float((r[n] - t).abs().max() / t.abs().max().clamp_min(1e-12))
                    for n, t in base.items()}
    for key, row in table.items():
        if isinstance(row, str):
            print(f"{key:34s} {row}")
        else:
            worst = max(row, key=lambda n: row[n] if row[n] == row[n] else float("inf"))
            print(f"{key:34s} worst {worst} {row[worst]:.1e}   "
                  + " ".join(f"{n}={v:.0e}" for n, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"op": args.op, "settings": args.settings, "diff": table}, f, indent=1)


if __name__ == "__main__":
    main()
