"""A lean greedy decoder for serving and benchmarks: no logits processors, no host sync per
token, and optionally the whole per-token step captured in one CUDA graph.

transformers' generate() is the general path (every sampling and stopping option); this is
the fast one for greedy decoding of a fixed number of tokens. Both use the same prefill
(LinAttnForCausalLM.forward, left padding included) and the same per-layer states, so they
give the same tokens.
"""
from __future__ import annotations

import torch

from .cache import LinAttnCache


def _flat(tree, out=None):
    """The tensors of a state tree (tensors in dicts/tuples/lists), in a fixed order."""
    out = [] if out is None else out
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, dict):
        for k in sorted(tree):
            _flat(tree[k], out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _flat(v, out)
    return out


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
                    attention_mask: torch.Tensor | None = None, cuda_graph: bool = False) -> torch.Tensor:
    """Greedy continuation of input_ids [B, T] int64 (left-padded with attention_mask [B, T]
    0/1 when rows differ in length) by a LinAttnForCausalLM: returns [B, T + max_new_tokens].

    cuda_graph: capture one decoding step (every layer, the argmax, the state update in
    place) as a CUDA graph and replay it per token. Needs CUDA tensors and fixed-size states,
    so no softmax-attention layer (its KV cache grows): ValueError otherwise.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if cuda_graph:
        if input_ids.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model and input_ids on a CUDA device")
        if "attention" in model.lm_config.layer_pattern():
            raise ValueError("cuda_graph=True needs fixed-size states: this model has attention "
                             "layers, whose KV cache grows every token")
    out = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
    cache: LinAttnCache = out.cache
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)                         # [B, 1]
    tokens = [input_ids, nxt]
    if max_new_tokens == 0:
        return input_ids
    if not cuda_graph:
        for _ in range(max_new_tokens - 1):
            h, cache.states = model._run(nxt, None, cache.states)
            nxt = model.model._logits(h)[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
        return torch.cat(tokens, dim=1)

    static_ids = nxt.clone()
    states = cache.states
    flat = _flat(states)

    def step():
        h, new = model._run(static_ids, None, states)
        for dst, src in zip(flat, _flat(new)):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        static_ids.copy_(model.model._logits(h)[:, -1].argmax(-1, keepdim=True))

    snapshot = [t.clone() for t in flat]
    ids0 = static_ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile/autotune every kernel before the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for t, s in zip(flat, snapshot):  # undo the warm-up steps
        t.copy_(s)
    static_ids.copy_(ids0)
    for _ in range(max_new_tokens - 1):
        graph.replay()
        tokens.append(static_ids.clone())
    return torch.cat(tokens, dim=1)
