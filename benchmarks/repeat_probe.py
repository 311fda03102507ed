"""Where a delta-rule kernel goes wrong on the GPU: NaN counts and differences, run to run and
setting to setting, of every output, gradient and backward intermediate.

benchmarks/flag_diff.py compares each setting's results with the first setting's, once; when
the first setting is itself wrong (NaN) or a kernel is not deterministic, its table cannot say
which. This runs each setting (flag_diff's syntax, one process each) REPS times on flag_diff's
cases and, besides o, the final state and the gradients, records what delta_bwd.reverse_scan
and delta_bwd.grads_qk return (reverse_scan.0 = dh, .1 = dU', .2 = dh0; grads_qk.0 = dq,
.1 = dk_part, .2 = dW, .3 = db), so the first kernel with a NaN or an O(1) difference shows.
A line per (case, setting, run): "ok", or each tensor whose max |diff| / max |base| against
the base (the first setting's first run) exceeds 2e-2, with its NaN count.

    python3 benchmarks/repeat_probe.py d128x256,g100x64_pack 3 \\
        "unsplit=delta.reverse_scan_split16=0;default=;bv16=delta.reverse_scan_split16_min_bv=16"

Found on the H200 (results/repeat_probe_delta-h200-2026-11-29-untimed8.txt): the
reverse scan's NaN at DeltaNet K 128 on 16-wide V blocks, and grads_qk's run-to-run different
dW on 64-wide gated V tiles. PROBE_DEV=cpu runs flag_diff's CPU case under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flag_diff  # noqa: E402

SPIED = ("reverse_scan", "grads_qk")  # delta_bwd functions whose outputs are recorded
THRESHOLD = 2e-2                      # relative difference reported (bf16 rounding is below)


def child(flags: str, names: list[str], reps: int, path: str) -> None:
    """Runs the cases reps times under flags; saves {(case, run): {name: tensor} or error}."""
    values = flag_diff.set_flags(flags)
    from linattn.ops.triton import delta_bwd
    recorded = {}
    for fn in SPIED:
        def spy(*args, _orig=getattr(delta_bwd, fn), _name=fn, **kwargs):
            out = _orig(*args, **kwargs)
            for i, t in enumerate(out):
                if t is not None:
                    recorded[f"{_name}.{i}"] = t.detach().float().cpu()
            return out
        setattr(delta_bwd, fn, spy)
    dev = os.environ.get("PROBE_DEV", "cuda")
    cases = {c[0]: c for c in flag_diff.cases("delta", dev)}
    results = {}
    for name in names:
        _, gated, B, T, K, V, lengths, h0 = cases[name]
        for r in range(reps):
            recorded.clear()
            try:
                out = flag_diff.run_case("delta", gated, B, T, K, V, lengths, h0, dev, **values)
                if dev == "cuda":
                    torch.cuda.synchronize()
                results[(name, r)] = {**out, **recorded}
            except Exception as e:  # an illegal address poisons the context: stop here
                results[(name, r)] = f"{type(e).__name__}: {str(e)[:200]}"
                torch.save(results, path)
                return
    torch.save(results, path)


def report(base: dict, res: dict) -> str:
    """The tensors of res that differ from base by more than THRESHOLD or hold NaN."""
    row = []
    for n, t in res.items():
        nan = int(torch.isnan(t).sum())
        ref = base[n]
        diff = (t - ref).abs().nan_to_num(1e9).max()
        rel = (diff / ref.abs().nan_to_num(0).max().clamp_min(1e-30)).item()
        if nan or rel > THRESHOLD:
            row.append(f"{n}:{rel:.1e}" + (f"/nan{nan}" if nan else ""))
    return " ".join(row) or "ok"


def main() -> None:
    if sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]), sys.argv[5])
        return
    names, reps = sys.argv[1].split(","), int(sys.argv[2])
    settings = [s.split("=", 1) for s in sys.argv[3].split(";")]
    results = {}
    for sname, flags in settings:
        path = f"/tmp/repeat_probe_{os.getpid()}_{sname}.pt"
        subprocess.run([sys.executable, __file__, "--child", flags, ",".join(names), str(reps),
                        path], timeout=int(os.environ.get("PROBE_TIMEOUT_S", "150")))
        results[sname] = torch.load(path) if os.path.exists(path) else {}
    base_name = settings[0][0]
    for name in names:
        base = results[base_name].get((name, 0))
        for sname, _ in settings:
            for r in range(reps):
                res = results[sname].get((name, r))
                if not isinstance(res, dict) or not isinstance(base, dict):
                    line = res if isinstance(res, str) else "not run (or no base)"
                else:
                    line = report(base, res)
                print(f"{name:14s} {sname:12s} run {r}  {line}")


if __name__ == "__main__":
    main()
