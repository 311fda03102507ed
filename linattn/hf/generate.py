"""Text in, continuation out: what `linattn generate` runs for model directories and runs."""
from __future__ import annotations

import sys

import torch


def generation_kwargs(*, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                      top_k: int = 0, repetition_penalty: float = 1.0) -> dict:
    """transformers generate() options: greedy at temperature 0, else sampling with top-k/top-p.
    ValueError names a bad option."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    kw = {"max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty}
    if temperature == 0:
        kw.update(do_sample=False, top_p=None, top_k=None, temperature=None)
    else:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    return kw


class _Printer:
    """A transformers streamer that writes each new piece of text to `out` as it comes."""

    def __init__(self, tokenizer, out, skip_special_tokens: bool):
        from transformers import TextStreamer

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                out.write(text)
                if stream_end:
                    out.write("\n")
                out.flush()

        self.streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=skip_special_tokens)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, *, stream=None, seed: int | None = None,
                  **options) -> str:
    """The continuation of `prompt` (the tokenizer's text; a synthetic task's tokenizer reads
    space-separated ids) by model.generate with generation_kwargs(**options). stream: a text
    file (sys.stdout) to write the continuation to while it is generated, or None. seed fixes
    sampling. Returns the continuation's text: without "<bos>" for text models (it ends a
    document), with it for synthetic tasks' models (it is a token of their vocabulary)."""
    kw = generation_kwargs(**options)
    enc = tokenizer(prompt, return_tensors="pt")
    dev = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    if ids.shape[1] > model.config.max_seq_len:
        raise ValueError(f"the prompt is {ids.shape[1]} tokens, over the model's max_seq_len="
                         f"{model.config.max_seq_len}")
    if seed is not None:
        torch.manual_seed(seed)
    task = getattr(model.config, "task", None)
    skip = not task or task.get("name") == "text"
    streamer = _Printer(tokenizer, stream, skip).streamer if stream is not None else None
    out = model.generate(ids, attention_mask=mask, streamer=streamer,
                         pad_token_id=tokenizer.pad_token_id, **kw)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=skip)


def generate_cli(path: str, prompt: str, *, device: str = "auto", stream: bool = True,
                 seed: int | None = None, out=None, **options) -> str:
    """`linattn generate` on a model directory (linattn export) or a run directory (linattn
    train): loads it, prints the continuation to `out` (stdout), streaming when `stream`."""
    from .export import load_any

    out = sys.stdout if out is None else out
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, tokenizer = load_any(path, dev)
    text = generate_text(model, tokenizer, prompt, stream=out if stream else None, seed=seed, **options)
    if not stream:
        out.write(text + "\n")
    return text
