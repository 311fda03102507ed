"""Re-render the plot and the markdown tables of a `linattn bench` or `linattn bench --models`
result: run it after changing linattn/bench/report.py, or to redraw an old run's JSON.

    python benchmarks/plot.py benchmarks/results/bench-nvidia-h200-2026-11-28.json [--out DIR]

Writes <stem>.png and <stem>.md beside the JSON (or into --out), with the same code that
`linattn bench` uses at the end of a run (linattn.bench.report.renderers).
"""
import argparse
import json
import sys
from pathlib import Path

from linattn.bench.report import renderers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="a bench-*.json written by linattn bench [--models]")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNG and markdown (default: the JSON's)")
    args = p.parse_args(argv)
    result = json.loads(args.json.read_text())
    out = args.out or args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.json.stem
    markdown, plot = renderers(result)
    (out / f"{stem}.md").write_text(markdown(result) + "\n")
    wrote = plot(result, out / f"{stem}.png")
    print(f"wrote {out / stem}.md" + (f" and {stem}.png" if wrote else " (no plot: no timed rows or no matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
