"""The bench's reports, for the op bench and the model bench: the JSON of a run (written
after every row, so a killed run keeps its numbers), its markdown tables (for
BENCHMARKS.md), its PNG plot, and the text lines printed as it goes.

A result is a dict: gpu, date, command, versions, ceilings, config, notes, rows (and
"benchmark": "models" for the model bench). write_outputs picks the formatters by that key,
so benchmarks/plot.py re-renders either kind of result.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .runner import short_error


def _fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _f(x, fmt):
    return "" if x is None else format(x, fmt)


def _md(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (said on stderr) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    return plt


def _save(plt, fig, path: Path, title: str) -> bool:
    """Titles, lays out, writes and closes fig; True (a plot was written)."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (file names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


# ============================================================================ the op bench

def ops_table(rows: list) -> str:
    """The short text table printed last: time next to floor, peak next to memory floor."""
    head = f"{'op':<38} {'shape':<22} {'fwd ms':>8} {'floor':>6} {'fwd+bwd':>8} {'floor':>6} {'peak GiB':>8} {'floor':>6}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("decode"):
            cells = (f"{_fmt(r.get('step_us'), 1):>8} {_fmt(r.get('floor_fwd_ms') and r['floor_fwd_ms'] * 1e3, 1):>6} "
                     f"{'':>8} {'':>6} {'':>8} {'':>6}")
            note = "us/step" + (f", state {r['state_TBps']:.2f} TB/s" if r.get("state_TBps") else "")
        else:
            cells = (f"{_fmt(r.get('fwd_ms')):>8} {_fmt(r.get('floor_fwd_ms')):>6} "
                     f"{_fmt(r.get('fwdbwd_ms')):>8} {_fmt(r.get('floor_fwdbwd_ms')):>6} "
                     f"{_fmt(r.get('peak_gib')):>8} {_fmt(r.get('mem_floor_gib')):>6}")
            note = ""
        if r.get("error"):
            note = (note + "; " if note else "") + r["error"][:90]
        lines.append(f"{r['op']:<38} {r['shape']:<22} {cells}  {note}".rstrip())
    return "\n".join(lines)


def ops_markdown(result: dict) -> str:
    """Tables for BENCHMARKS.md: per D, each op's fwd / fwd+bwd ms at each T (floors in
    the last row), then every row with its floors, then the decoding steps."""
    v, c = result["versions"], result["ceilings"]
    out = [f"## linattn bench: {result['gpu']}, {result['date']}", "",
           f"torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, "
           f"fla {v.get('fla') or '-'}, mlstm_kernels {v.get('mlstm_kernels') or '-'}. "
           f"Measured ceilings: copy {c['copy_TBps']:.2f} TB/s (read + write), "
           f"bf16 matmul {c['matmul_TFLOPs']:.0f} TFLOP/s. B*T = {result['config']['tokens']}, "
           f"H = {result['config']['H']}, bf16, median of do_bench; peak = extra memory of one "
           f"forward+backward.", "", f"Command: `{result['command']}`", ""]
    out += [f"- {n}" for n in result.get("notes", [])] + [""]
    train = [r for r in result["rows"] if not r.get("decode")]
    for D in sorted({r["D"] for r in train}):
        Ts = sorted({r["T"] for r in train if r["D"] == D})
        ops = list(dict.fromkeys(r["op"] for r in train if r["D"] == D))
        cell = {(r["op"], r["T"]): r for r in train if r["D"] == D}
        out += [f"### D = {D}: ms, forward / forward+backward (the floors are in the table of every row)", "",
                "| op | " + " | ".join(f"T={T}" for T in Ts) + " | peak GiB (floor) |",
                "|---|" + "---|" * len(Ts) + "---|"]
        for op in ops:
            cells = []
            for T in Ts:
                r = cell.get((op, T))
                if r is None:
                    cells.append("")
                elif r.get("fwd_ms") is None:
                    cells.append(_md(r.get("error", ""))[:80])
                else:
                    txt = f"{r['fwd_ms']:.2f} / {_fmt(r.get('fwdbwd_ms'))}"
                    if r.get("error"):
                        txt += f" ({_md(r['error'])[:60]})"
                    cells.append(txt)
            peaks = [r for T in Ts if (r := cell.get((op, T))) and r.get("peak_gib") is not None]
            peak = f"{peaks[0]['peak_gib']:.2f} ({peaks[0]['mem_floor_gib']:.2f})" if peaks else ""
            out.append(f"| {op} | " + " | ".join(cells) + f" | {peak} |")
        out.append("")
    if train:
        out += ["### Every row", "",
                "| op | shape | fwd ms | floor | fwd+bwd ms | floor | peak GiB | floor GiB | note |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            out.append(f"| {r['op']} | {r['shape']} | {_fmt(r.get('fwd_ms'))} | {_fmt(r.get('floor_fwd_ms'))} "
                       f"({r.get('floor_fwd_bound', '')}) | {_fmt(r.get('fwdbwd_ms'))} | "
                       f"{_fmt(r.get('floor_fwdbwd_ms'))} ({r.get('floor_fwdbwd_bound', '')}) | "
                       f"{_fmt(r.get('peak_gib'))} | {_fmt(r.get('mem_floor_gib'))} | {_md(r.get('error', ''))[:120]} |")
        out.append("")
    dec = [r for r in result["rows"] if r.get("decode")]
    if dec:
        out += ["### Decoding: one step (T = 1), float32 state read and written", "",
                "| op | shape | us / step | floor us | state TB/s | note |", "|---|---|---|---|---|---|"]
        for r in dec:
            fl = r.get("floor_fwd_ms")
            out.append(f"| {r['op']} | {r['shape']} | {_fmt(r.get('step_us'), 1)} | "
                       f"{_fmt(fl * 1e3 if fl is not None else None, 1)} | {_fmt(r.get('state_TBps'))} | "
                       f"{_md(r.get('error', ''))[:120]} |")
        out.append("")
    return "\n".join(out)


def ops_plot(result: dict, path: Path) -> bool:
    """ms vs T, log-log, one panel per (D, variant): ours solid, peers dashed, SDPA dotted;
    forward+backward thick, forward thin."""
    plt = _pyplot()
    if plt is None:
        return False
    train = [r for r in result["rows"] if not r.get("decode") and r.get("fwd_ms") is not None]
    panels = list(dict.fromkeys((r["D"], r["variant"]) for r in train if r["variant"] != "softmax"))
    if not panels:
        return False
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    style = {"ours": "-", "fla": "--", "tfla": "--", "sdpa": ":"}
    for ax, (D, variant) in zip(axes.flat, panels):
        rows = [r for r in train if r["D"] == D and r["variant"] in (variant, "softmax")]
        for op in dict.fromkeys(r["op"] for r in rows):
            if op == "sdpa[flash]":
                continue
            pts = sorted((r["T"], r["fwd_ms"], r.get("fwdbwd_ms")) for r in rows if r["op"] == op)
            fam = next(r.get("family", "ours") for r in rows if r["op"] == op)
            line, = ax.plot([p[0] for p in pts], [p[2] for p in pts], style.get(fam, "-"),
                            marker="o", lw=2, label=op + " fwd+bwd")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style.get(fam, "-"), marker=".",
                    lw=0.8, color=line.get_color(), label=op + " fwd")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{variant}, D={D}", fontsize=9)
        ax.set_xlabel("T (B*T constant)", fontsize=8)
        ax.set_ylabel("ms", fontsize=8)
        ax.legend(fontsize=5)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(plt, fig, path, f"{result['gpu']} {result['date']}: bf16, H={result['config']['H']}, "
                                 f"B*T={result['config']['tokens']}")


# ============================================================================ the model bench

def models_row_line(r: dict) -> str:
    if r.get("tokens_per_s") is None:
        return f"{r['case']:<34} T{r['T']:<6} {r.get('error', '')[:160]}"
    return (f"{r['case']:<34} T{r['T']:<6} B{r['B']:<4} {r['tokens_per_s']:>12,.0f} tok/s "
            f"{r['ms_per_step']:>8.1f} ms  MFU {_f(r.get('mfu') and 100 * r['mfu'], '.1f'):>5}%  "
            + (f"  peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else ""))


def models_markdown_table(rows: list) -> str:
    """One line per row: throughput, ratios to attention and to fla's layers, MFU, memory."""
    out = ["| model | T | B | tokens/s | ms/step | x attention | x fla | MFU % | peak GiB | params | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("tokens_per_s") is not None
        note = r.get("error", "")
        out.append(
            f"| {r['case']} | {r['T']} | {r['B']} | {_f(r.get('tokens_per_s'), ',.0f')} | "
            f"{_f(r.get('ms_per_step'), '.1f')} | {_f(r.get('vs_attention') if ok else None, '.2f')} | "
            f"{_f(r.get('vs_fla') if ok else None, '.2f')} | "
            f"{_f(r.get('mfu') and 100 * r['mfu'] if ok else None, '.1f')} | {_f(r.get('peak_mem_gib'), '.1f')} | "
            f"{_f(r.get('parameters') and r['parameters'] / 1e6, '.1f')}{'M' if r.get('parameters') else ''} | "
            f"{_md(note)[:140]} |")
    return "\n".join(out)


def models_markdown(result: dict) -> str:
    v, c, cfg = result["versions"], result["ceilings"], result["config"]
    head = [f"## linattn bench --models: {cfg['size']} ({cfg['n_layers']} layers, d_model {cfg['d_model']}, "
            f"{cfg['n_heads']} heads), {result['gpu']}, {result['date']}", "",
            f"torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, fla-core "
            f"{v.get('fla') or '-'}, flash-linear-attention {v.get('flash_linear_attention') or '-'}, "
            f"commit {v.get('commit') or '-'}. Measured {'bf16' if cfg['device'] == 'cuda' else 'float32'} "
            f"matmul {c['matmul_TFLOPs']:.4g} TFLOP/s"
            + (f", copy {c['copy_TBps']:.2f} TB/s" if c.get("copy_TBps") else "")
            + f". Vocabulary {cfg['vocab']}, {cfg['tokens_per_step']} tokens per step, "
            f"median of {cfg['steps']} steps after {cfg['warmup']}"
            + (", torch.compile" if cfg.get("compile") else "") + ".", "",
            f"Command: `{result['command']}`", ""]
    head += [f"- {n}" for n in result.get("notes", [])] + [""]
    return "\n".join(head + [models_markdown_table(result["rows"]), ""])


def models_plot(result: dict, path: Path) -> bool:
    """Bars per T: tokens/s (attention's dashed), MFU and peak memory of every case."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = [r for r in result["rows"] if r.get("tokens_per_s")]
    Ts = sorted({r["T"] for r in rows})
    if not Ts:
        return False
    color = {"ours": "tab:blue", "fla": "tab:orange", "sdpa": "tab:gray"}
    metrics = [m for m in [("tokens_per_s", "tokens/s", 1.0), ("mfu", "MFU %", 100.0),
                           ("peak_mem_gib", "peak GiB", 1.0)] if any(r.get(m[0]) for r in rows)]
    fig, axes = plt.subplots(len(metrics), len(Ts), figsize=(6 * len(Ts), 3.3 * len(metrics) + 1), squeeze=False)
    for j, T in enumerate(Ts):
        at = [r for r in rows if r["T"] == T]
        names = [r["case"] for r in at]
        for i, (key, label, scale) in enumerate(metrics):
            ax = axes[i][j]
            vals = [(r.get(key) or 0.0) * scale for r in at]
            ax.bar(range(len(at)), vals, color=[color.get(r["family"], "tab:green") for r in at])
            ref = next((r.get(key) for r in at if r["case"] == "attention"), None)
            if ref:
                ax.axhline(ref * scale, ls="--", color="k", lw=0.8)
            ax.set_xticks(range(len(at)))
            ax.set_xticklabels(names if i == len(metrics) - 1 else [], rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(label, fontsize=8)
            if i == 0:
                ax.set_title(f"T={T}, B={at[0]['B']}", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
    cfg = result["config"]
    return _save(plt, fig, path, f"{result['gpu']} {result['date']}: CausalLM {cfg['size']}, "
                                 f"{cfg['tokens_per_step']} tokens/step (blue: ours, orange: fla's layers, gray: attention)")


# ============================================================================ writing

def renderers(result: dict):
    """(markdown(result) -> str, plot(result, path) -> bool) of the bench that wrote result."""
    if result.get("benchmark") == "models":
        return models_markdown, models_plot
    return ops_markdown, ops_plot


def write_outputs(result: dict, out_dir: Path, stem: str, final: bool) -> None:
    """out_dir/stem.json (replaced atomically at every call); when final also stem.md and
    stem.png (the formatters of renderers(result)), a plot failure reported but never
    losing the numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (stem + ".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out_dir / (stem + ".json"))
    if final:
        markdown, draw = renderers(result)
        (out_dir / (stem + ".md")).write_text(markdown(result) + "\n")
        try:
            draw(result, out_dir / (stem + ".png"))
        except Exception as e:  # a plot failure must not lose the numbers
            print(f"plot failed: {short_error(e)}", file=sys.stderr)
