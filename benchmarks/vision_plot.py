"""One figure of a vision results folder: the ViTs' test accuracy per mixer (each seed and the
mean), the diffusion runs' judge accuracy against training steps (teacher DiT, LiT inherited and
distilled, LiT from scratch), and the non-causal op and layers' fwd+bwd time against tokens.

    python benchmarks/vision_plot.py benchmarks/results/vision-nvidia-h100-2026-12-07

Reads vit_summary.json (benchmarks/vision_gpu.sh), lit_summary.json (vision_lit_gpu.sh) and
vision_bench.json (vision_bench.py), whichever are there; writes vision.png beside them.
When to run it: after a GPU run of those scripts, before quoting it in BENCHMARKS.md.
"""
import argparse
import json
import sys
from pathlib import Path


def _load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def plot(folder: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vit, lit, bench = (_load(folder, n) for n in ("vit_summary.json", "lit_summary.json", "vision_bench.json"))
    panels = [p for p in (vit, lit, bench) if p]
    if not panels:
        raise FileNotFoundError(f"{folder} holds none of vit_summary.json, lit_summary.json, vision_bench.json")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    axes = iter(axes[0])
    if vit:
        ax = next(axes)
        for i, (mixer, s) in enumerate(vit.items()):
            ax.scatter([i] * len(s["accuracies"]), [100 * a for a in s["accuracies"]], color="0.6", s=14)
            ax.bar(i, 100 * s["mean"], width=0.6, alpha=0.7, label=f"{mixer} {100 * s['mean']:.2f}")
        ax.set_xticks(range(len(vit)), list(vit))
        low = min(min(s["accuracies"]) for s in vit.values())
        ax.set_ylim(max(0.0, 100 * low - 5), 100.5)
        ax.set_ylabel("test accuracy, %")
        ax.set_title(f"ViT on digits ({len(next(iter(vit.values()))['accuracies'])} seeds)")
        ax.legend(fontsize=8)
    if lit:
        ax = next(axes)
        for run, s in lit.items():
            steps = [e["step"] for e in s["evaluations"]]
            ax.plot(steps, [100 * e["accuracy"] for e in s["evaluations"]], marker="o", label=run)
        ax.set_xlabel("training steps")
        ax.set_ylabel("judge accuracy on samples, %")
        ax.set_title("diffusion: sample quality")
        ax.legend(fontsize=8)
    if bench:
        ax = next(axes)
        rows = [r for r in bench["rows"] if "fwdbwd_ms" in r]
        for name in dict.fromkeys(f"{r['kind']}: {r['name']}" for r in rows):
            pts = sorted((r["tokens"], r["fwdbwd_ms"]) for r in rows if f"{r['kind']}: {r['name']}" == name)
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (H x W)")
        ax.set_ylabel("fwd+bwd ms")
        ax.set_title(f"non-causal, {bench['dtype']}, {bench['gpu']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = folder / "vision.png"
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a vision results folder")
    print(f"wrote {plot(p.parse_args(argv).folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
