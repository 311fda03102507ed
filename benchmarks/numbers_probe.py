"""Which layers and heads carry the operands of an arithmetic model (softmax, linear or hybrid).

In the spirit of Zhang et al. ("Interpreting and Improving LLMs in Arithmetic Calculation",
2024: a few attention heads move the operands to the answer), three measurements on the
test split of a trained `linattn train --task arithmetic` run, per layer and head:

  ablation     zero one head's output (its slice of the mixer's output projection input) and
               measure the drop in exact match and the rise in answer loss. Works for every
               mixer: a linear layer's head output is its state read-out S_t^T q_t.
  dependence   zero the mixer's input at the operand positions (of a, then of b) in one layer
               only and measure how much each head's output at the answer positions changes,
               ||o_h - o_h'|| / ||o_h||: how much of the head's read-out comes from what was
               written at the operands (attention: the values it reads; linear mixers: the
               state they were written into).
  attention    for softmax layers, the attention mass from the answer positions onto the
               digits of a, of b, and elsewhere (BOS, symbols, answer so far), averaged.

    python benchmarks/numbers_probe.py --run runs/mul5 --out benchmarks/results/numbers_probe_mul5
    python benchmarks/numbers_probe.py --train-steps 300 --out /tmp/probe   # tiny model, CPU

Writes OUT.json and OUT.png.

When to run it: on a run of numbers_grid.py (numbers_gpu.sh runs it after the grid) to see
where a model keeps its operands.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from linattn.layers.attention import rope  # noqa: E402
from linattn.tasks.number_tokens import pieces_in_run  # noqa: E402


def operand_slices(task) -> tuple[slice, slice]:
    """Positions in input_ids [B, T] of a's and b's tokens (input_ids = [BOS, content[:-1]])."""
    if task.name != "arithmetic":
        raise ValueError(f"the probe reads arithmetic runs (fixed layout), got task {task.name}")
    pa, pb = pieces_in_run(task.digits, task.tokenization), pieces_in_run(task.m, task.tokenization)
    return slice(1, 1 + pa), slice(2 + pa, 2 + pa + pb)


def head_dims(block) -> tuple[int, int]:
    """(heads, width of one head's output) of a block's mixer."""
    mixer = block.mixer
    return mixer.n_heads, mixer.o_proj.in_features // mixer.n_heads


@contextmanager
def hooked(module, pre=None, post=None):
    handles = []
    if pre is not None:
        handles.append(module.register_forward_pre_hook(pre))
    if post is not None:
        handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def score(model, batches) -> dict:
    """Exact match, token accuracy and mean answer loss of model over batches."""
    exact = correct = tokens = seqs = 0
    loss = 0.0
    for b in batches:
        logits = model(b.input_ids)  # [B, T, V]
        m = b.answer_mask
        right = (logits.argmax(-1) == b.targets) & m
        loss += float(F.cross_entropy(logits[m].float(), b.targets[m], reduction="sum"))
        exact += int((right.sum(1) == m.sum(1)).sum())
        correct, tokens, seqs = correct + int(right.sum()), tokens + int(m.sum()), seqs + m.shape[0]
    return {"exact_match": exact / seqs, "accuracy": correct / tokens, "loss": loss / tokens}


@torch.no_grad()
def head_ablation(model, batches) -> dict:
    """Per layer, per head: drop in exact match and rise in loss when that head's output is zeroed."""
    base = score(model, batches)
    drops, rises = [], []
    for block in model.blocks:
        H, Dv = head_dims(block)
        row_d, row_r = [], []
        for h in range(H):
            def zero_head(mod, args, h=h):
                x = args[0].clone()
                x[..., h * Dv:(h + 1) * Dv] = 0
                return (x,)

            with hooked(block.mixer.o_proj, pre=zero_head):
                s = score(model, batches)
            row_d.append(base["exact_match"] - s["exact_match"])
            row_r.append(s["loss"] - base["loss"])
        drops.append(row_d)
        rises.append(row_r)
    return {"base": base, "exact_match_drop": drops, "loss_rise": rises}


@torch.no_grad()
def head_outputs(model, batch, layer: int, zero_at: slice | None = None) -> torch.Tensor:
    """[N, H, Dv]: layer's per-head mixer outputs at the N answer positions of batch, with the
    mixer's input zeroed at positions zero_at (in that layer only) if given."""
    block, got = model.blocks[layer], {}
    H, Dv = head_dims(block)

    def zero_input(mod, args, kwargs):
        x = args[0].clone()
        x[:, zero_at] = 0
        return (x, *args[1:]), kwargs

    def grab(mod, args):
        got["o"] = args[0]

    handles = [block.mixer.o_proj.register_forward_pre_hook(grab)]
    if zero_at is not None:
        handles.append(block.mixer.register_forward_pre_hook(zero_input, with_kwargs=True))
    try:
        model(batch.input_ids)
    finally:
        for h in handles:
            h.remove()
    return got["o"][batch.answer_mask].unflatten(-1, (H, Dv))  # [N, H, Dv]


@torch.no_grad()
def operand_dependence(model, batches, task) -> dict:
    """Per layer, per head: mean relative change of the head's answer-position output when
    the layer's input at a's (then b's) positions is zeroed."""
    sa, sb = operand_slices(task)
    out = {"a": [], "b": []}
    for layer in range(len(model.blocks)):
        for name, sl in (("a", sa), ("b", sb)):
            num = den = 0.0
            for b in batches:
                clean = head_outputs(model, b, layer)
                cut = head_outputs(model, b, layer, zero_at=sl)
                num = num + (clean - cut).float().norm(dim=-1).sum(0)  # [H]
                den = den + clean.float().norm(dim=-1).sum(0)
            out[name].append((num / den.clamp_min(1e-12)).tolist())
    return out


@torch.no_grad()
def attention_probs(block, x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, T] softmax attention weights of an Attention mixer on its input x [B, T, d]."""
    mixer = block.mixer
    D, T = mixer.head_dim, x.shape[1]
    q, k = (mixer.heads(p(x), D) for p in (mixer.q_proj, mixer.k_proj))  # [B, T, H, D]
    pos = torch.arange(T, device=x.device)
    q, k = rope(q, pos, mixer.rope_theta), rope(k, pos, mixer.rope_theta)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    if mixer.window is not None:
        causal &= ~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-mixer.window)
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@torch.no_grad()
def attention_mass(model, batches, task) -> dict:
    """For each softmax layer: per head, mean attention mass from answer positions onto a's
    digits, b's digits and the rest."""
    sa, sb = operand_slices(task)
    out = {}
    for i, block in enumerate(model.blocks):
        if block.mixer_name != "attention":
            continue
        sums, count = torch.zeros(3, block.mixer.n_heads), 0
        for b in batches:
            got = {}
            with hooked(block.mixer, pre=lambda mod, args: got.setdefault("x", args[0])):
                model(b.input_ids)
            p = attention_probs(block, got["x"])  # [B, H, T, T]
            rows = p.permute(0, 2, 1, 3)[b.answer_mask]  # [N, H, T] answer queries
            ma, mb = rows[..., sa].sum(-1), rows[..., sb].sum(-1)  # [N, H]
            sums += torch.stack([ma.sum(0), mb.sum(0), (1 - ma - mb).sum(0)]).cpu()
            count += rows.shape[0]
        out[str(i)] = {k: (v / count).tolist() for k, v in zip(("a", "b", "rest"), sums)}
    return out


def probe(model, task, *, seed: int = 1, batches: int = 4, batch_size: int = 256, device="cpu") -> dict:
    """All three measurements on `batches` test batches under `seed`."""
    model.eval()
    data = [task.batch("test", seed, i, batch_size).to(device) for i in range(batches)]
    return {"task": task.to_dict(), "layers": [b.mixer_name for b in model.blocks],
            "ablation": head_ablation(model, data), "dependence": operand_dependence(model, data, task),
            "attention_mass": attention_mass(model, data, task)}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("exact match drop when the head is zeroed", res["ablation"]["exact_match_drop"]),
              ("answer loss rise when the head is zeroed", res["ablation"]["loss_rise"]),
              ("head output change when a's positions are zeroed", res["dependence"]["a"]),
              ("head output change when b's positions are zeroed", res["dependence"]["b"])]
    att = res["attention_mass"]
    fig, axes = plt.subplots(1, len(panels) + bool(att), figsize=(4.2 * (len(panels) + bool(att)), 3.6))
    ylabels = [f"{i}: {name}" for i, name in enumerate(res["layers"])]
    for ax, (title, grid) in zip(axes, panels):
        im = ax.imshow(torch.tensor(grid).numpy(), aspect="auto", cmap="viridis")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("head")
        ax.set_yticks(range(len(ylabels)))
        ax.set_yticklabels(ylabels, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
    if att:
        ax = axes[-1]
        labels, xs = [], 0
        for layer, m in att.items():
            for h in range(len(m["a"])):
                ax.bar(xs, m["a"][h], color="C0")
                ax.bar(xs, m["b"][h], bottom=m["a"][h], color="C1")
                ax.bar(xs, m["rest"][h], bottom=m["a"][h] + m["b"][h], color="C7")
                labels.append(f"L{layer}h{h}")
                xs += 1
        ax.set_xticks(range(xs))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_title("attention mass from answer positions (a, b, rest)", fontsize=8)
    t = res["task"]
    fig.suptitle(f"{t.get('op')} {t.get('digits')} digits {t.get('order')}: base exact match "
                 f"{res['ablation']['base']['exact_match']:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_tiny(steps: int, seed: int = 0):
    """A 2-layer gated_deltanet + attention model trained on 2-digit reversed addition (CPU)."""
    from linattn.tasks import make_task
    from linattn.train import TrainConfig, model_config_for, train

    task = make_task("arithmetic", digits=2, op="add", order="reversed")
    cfg = model_config_for(task, d_model=32, n_layers=2, n_heads=2, layers=["gated_deltanet", "attention"],
                           backend="torch")
    res = train(cfg, task, TrainConfig(steps=steps, batch_size=64, lr=3e-3, seed=seed, device="cpu",
                                       eval_batches=1), progress=False)
    return res["model"], task


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run directory of `linattn train --task arithmetic`")
    src.add_argument("--train-steps", type=int, help="train a tiny model for this many steps instead")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.png")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.run is not None:
        from linattn.train import (WEIGHTS_FILE, build_model, load_run, load_weights,
                                   resolve_device)

        model_cfg, task, cfg = load_run(args.run)
        device = resolve_device(args.device if args.device != "auto" else cfg.device)
        model = build_model(model_cfg, device, cfg.seed)
        load_weights(model, args.run / WEIGHTS_FILE)
        seed = cfg.seed + 1
    else:
        model, task = train_tiny(args.train_steps)
        device, seed = torch.device("cpu"), 1
    res = probe(model, task, seed=seed, batches=args.batches, batch_size=args.batch_size, device=device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, args.out.with_suffix(".png"))
    base = res["ablation"]["base"]
    print(f"base exact match {base['exact_match']:.4f}, token accuracy {base['accuracy']:.4f}")
    for i, name in enumerate(res["layers"]):
        d = res["ablation"]["exact_match_drop"][i]
        print(f"layer {i} {name}: exact-match drop per head {[round(x, 3) for x in d]}, "
              f"dependence on a {[round(x, 2) for x in res['dependence']['a'][i]]}, "
              f"on b {[round(x, 2) for x in res['dependence']['b'][i]]}")
    for layer, m in res["attention_mass"].items():
        print(f"layer {layer} attention mass on a {[round(x, 2) for x in m['a']]}, on b {[round(x, 2) for x in m['b']]}")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
