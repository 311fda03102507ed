"""Greedy generation throughput: a Gated DeltaNet through linattn's generation against
transformers' LlamaForCausalLM of the same dims (SDPA + DynamicCache, no compile), in one run.

    PYTHONPATH=$PWD python benchmarks/generation.py --out benchmarks/results/generation.json

Defaults (the issue's bar): batch 64, prompts of 2048 and 8192 random tokens, 512 new tokens,
12 layers, d_model 768, 12 heads, vocabulary 32000, bf16 weights, untied head, SwiGLU 3072
in both models. Methods, each timed from the prompt to the last token (prefill included):
    linattn greedy+graph   linattn.hf.greedy.greedy_generate(cuda_graph=True): one CUDA
                           graph replay per token (decode step kernels inside)
    linattn greedy         greedy_generate without the graph (decode step kernels)
    linattn hf.generate    transformers' generate() on LinAttnForCausalLM with LinAttnCache
    llama hf.generate      transformers' generate() on LlamaForCausalLM, SDPA, DynamicCache
Reported per method: wall time, prefill time (one forward over the prompt), tokens/s
(generated tokens over the wall time) and decode tokens/s (over the time after the prefill),
speed-up over Llama, peak memory above the weights, and the cache per sequence (linattn's
states after the prefill; Llama's KV cache at the end). The run stops starting new cases
after --time-budget seconds (default 480) so the command stays under 9 minutes; skipped
cases are listed. JSON goes to --out; the table is printed last.

When to run it: on one GPU after a change to generation (linattn.hf.greedy, the decode
kernels, the cache) or to the decode step's launch choices; it is the source of
BENCHMARKS.md's generation table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def cache_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(cache_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(cache_bytes(v) for v in tree)
    return 0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_linattn(args):
    import linattn.hf as H

    cfg = H.LinAttnConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                          n_heads=args.heads, mixer="gated_deltanet", mlp_ratio=4.0,
                          max_seq_len=max(args.prompts) + args.new_tokens, tie_embeddings=False,
                          eos_token_id=None)
    torch.manual_seed(0)
    return H.LinAttnForCausalLM(cfg).to(args.device, args.dtype).eval()


def build_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      intermediate_size=4 * args.d_model, max_position_embeddings=max(args.prompts) + args.new_tokens,
                      tie_word_embeddings=False, attn_implementation="sdpa", eos_token_id=None,
                      bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(args.device, args.dtype).eval()


def methods(linattn_model, llama_model, device):
    from linattn.hf.greedy import greedy_generate

    def hf(model):
        def run(ids, n):
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  do_sample=False, pad_token_id=0)
        return run

    graph = {"linattn greedy+graph": (linattn_model, lambda ids, n: greedy_generate(linattn_model, ids, n,
                                                                                   cuda_graph=True))}
    return {
        **(graph if device.type == "cuda" else {}),
        "linattn greedy": (linattn_model, lambda ids, n: greedy_generate(linattn_model, ids, n)),
        "linattn hf.generate": (linattn_model, hf(linattn_model)),
        "llama hf.generate": (llama_model, hf(llama_model)),
    }


@torch.no_grad()
def time_case(name, model, run, ids, n) -> dict:
    dev = ids.device
    cuda = dev.type == "cuda"
    sync(dev)
    weights = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = model(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    sync(dev)
    prefill = time.perf_counter() - t0
    per_seq = cache_bytes(out.cache.states) / ids.shape[0] if name.startswith("linattn") else None
    del out
    sync(dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    seq = run(ids, n)
    sync(dev)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - weights if cuda else float("nan")
    if per_seq is None:  # Llama's KV cache at the end: 2 * layers * (prompt + n) * d_model values
        cfg = model.config
        per_seq = 2 * cfg.num_hidden_layers * (ids.shape[1] + n) * cfg.hidden_size * 2
    assert seq.shape == (ids.shape[0], ids.shape[1] + n), seq.shape
    B = ids.shape[0]
    return {"method": name, "prompt": ids.shape[1], "batch": B, "new_tokens": n, "wall_s": wall,
            "prefill_s": prefill, "tokens_per_s": B * n / wall,
            "decode_tokens_per_s": B * (n - 1) / max(wall - prefill, 1e-9),
            "peak_mem_gb": peak / 2**30, "cache_mb_per_seq": per_seq / 2**20, "tokens": seq[:, -n:].cpu()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/generation.json")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only smoke-tests the script")
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds after which no new case starts")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    start = time.perf_counter()
    import transformers
    import triton

    ours, llama = build_linattn(args), build_llama(args)
    table = methods(ours, llama, args.device)
    g = torch.Generator(device=args.device).manual_seed(0)
    # warm-up: compile and autotune every kernel on a short prompt
    warm = torch.randint(1, args.vocab, (args.batch, min(256, max(args.prompts))), device=args.device, generator=g)
    for name, (model, run) in table.items():
        run(warm, 8)
    rows, skipped, errors = [], [], {}
    for P in args.prompts:
        ids = torch.randint(1, args.vocab, (args.batch, P), device=args.device, generator=g)
        for name, (model, run) in table.items():
            if time.perf_counter() - start > args.time_budget:
                skipped.append(f"{name} @ {P}")
                continue
            try:
                rows.append(time_case(name, model, run, ids, args.new_tokens))
            except Exception as e:  # noqa: BLE001  (record it, keep timing the others)
                errors[f"{name} @ {P}"] = f"{type(e).__name__}: {e}"
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
    for r in rows:  # same tokens from the three linattn paths
        ref = next((x for x in rows if x["prompt"] == r["prompt"] and x["method"] == "linattn hf.generate"), None)
        r["same_tokens_as_hf_generate"] = None if ref is None or not r["method"].startswith("linattn") \
            else bool(torch.equal(r["tokens"], ref["tokens"]))
        llama_row = next((x for x in rows if x["prompt"] == r["prompt"] and x["method"] == "llama hf.generate"), None)
        r["speedup_vs_llama"] = None if llama_row is None else r["tokens_per_s"] / llama_row["tokens_per_s"]
    result = {"gpu": torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"),
              "args": {k: str(v) if isinstance(v, (torch.device, torch.dtype)) else v for k, v in vars(args).items()},
              "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
              "skipped": skipped, "errors": errors, "total_s": time.perf_counter() - start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}, transformers "
          f"{result['transformers']}; batch {args.batch}, {args.new_tokens} new tokens, greedy, {str(args.dtype).replace('torch.', '')}")
    for k, v in errors.items():
        print(f"error: {k}: {v}")
    if skipped:
        print("skipped (time budget):", ", ".join(skipped))
    head = f"{'prompt':>6}  {'method':<20} {'wall s':>7} {'prefill s':>9} {'tok/s':>9} {'decode tok/s':>12} " \
           f"{'vs llama':>8} {'peak GB':>8} {'cache MB/seq':>12} {'same':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = "-" if r["speedup_vs_llama"] is None else f"{r['speedup_vs_llama']:.2f}x"
        same = "-" if r["same_tokens_as_hf_generate"] is None else ("yes" if r["same_tokens_as_hf_generate"] else "NO")
        print(f"{r['prompt']:>6}  {r['method']:<20} {r['wall_s']:>7.2f} {r['prefill_s']:>9.2f} {r['tokens_per_s']:>9,.0f} "
              f"{r['decode_tokens_per_s']:>12,.0f} {sp:>8} {r['peak_mem_gb']:>8.2f} {r['cache_mb_per_seq']:>12.2f} {same:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
