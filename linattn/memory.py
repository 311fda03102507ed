"""What autograd keeps between a forward and its backward, measured on any device.

    out, saved = saved_for_backward(module, *args, **kwargs)

runs module(*args, **kwargs) under torch.autograd.graph.saved_tensors_hooks and returns its
output and one SavedTensor per storage the graph keeps for the backward:

  * counted once per storage: q, k and v saved as slices of one conv output count as that
    output, a tensor two nodes save counts once (the bytes held are the storage's);
  * attributed to the innermost submodule of `module` running when it was saved ("o_proj",
    "out_norm", "" for the module's own forward body);
  * tensors an autograd.Function keeps on its ctx outside save_for_backward (the delta rule's
    chunk intermediates) are found by walking the output's graph, attributed to the node's
    class name;
  * parameters' storages are marked (parameter=True) and left out of the totals: they are
    held whether or not a backward follows. Autocast's per-step weight casts are not
    parameters; they do not grow with the tokens, which per_token cancels.

per_token(saved_a, tokens_a, saved_b, tokens_b) gives the bytes per token by attribution from
two runs at two token counts (the difference cancels what does not grow with the tokens; with
chunked ops take token counts that are multiples of the chunk).

The measurement is of the backends that run: on the CPU the fused pieces' PyTorch paths keep
more than their Triton paths (set the pieces' backend to "triton" under TRITON_INTERPRET=1 to
measure what a GPU keeps).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SavedTensor", "saved_for_backward", "per_token", "total_bytes"]


@dataclass(frozen=True)
class SavedTensor:
    """One storage the graph keeps: where it was saved, the first saved view's shape and
    dtype, the storage's bytes, and whether it is a parameter's."""
    where: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int
    parameter: bool


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


def _ctx_tensors(outputs):
    """(node name, tensor) for every tensor held as a ctx attribute by the nodes of the
    outputs' graph (custom autograd.Functions' ctx is the node)."""
    roots = [t.grad_fn for t in _tensors_in(outputs) if t.grad_fn is not None]
    seen, stack = set(), roots
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for value in getattr(node, "__dict__", {}).values():
            for t in _tensors_in(value):
                yield type(node).__name__, t
        stack.extend(fn for fn, _ in node.next_functions)


def saved_for_backward(module: nn.Module, *args, **kwargs):
    """(module(*args, **kwargs), [SavedTensor, ...]); see the module docstring."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    names = {id(sub): name for name, sub in module.named_modules()}
    stack: list[str] = []

    # global hooks: per-module ones would change what a module does (GatedOutputNorm fuses
    # only an unhooked out-projection)
    def enter(sub, args):
        if id(sub) in names:
            stack.append(names[id(sub)])

    def leave(sub, args, output):
        if id(sub) in names:
            stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave)]
    found: dict[int, SavedTensor] = {}

    def record(where, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() and ptr not in found:
            found[ptr] = SavedTensor(where, tuple(t.shape), t.dtype, storage.nbytes(),
                                     ptr in params)

    def pack(t):
        record(stack[-1] if stack else "", t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for where, t in _ctx_tensors(out):
        record(where, t)
    return out, list(found.values())


def total_bytes(saved, by_where: bool = False):
    """Bytes of the non-parameter storages: the total, or a dict by attribution."""
    totals = defaultdict(int)
    for s in saved:
        if not s.parameter:
            totals[s.where] += s.nbytes
    return dict(totals) if by_where else sum(totals.values())


def per_token(saved_a, tokens_a: int, saved_b, tokens_b: int) -> dict[str, float]:
    """Bytes per token by attribution (and "total") from two runs at tokens_a < tokens_b
    tokens; attributions that do not grow with the tokens are left out."""
    if not 0 < tokens_a < tokens_b:
        raise ValueError(f"need 0 < tokens_a < tokens_b, got {tokens_a}, {tokens_b}")
    a, b = total_bytes(saved_a, True), total_bytes(saved_b, True)
    res = {}
    for where in sorted(set(a) | set(b)):
        d = (b.get(where, 0) - a.get(where, 0)) / (tokens_b - tokens_a)
        if d:
            res[where] = d
    res["total"] = sum(res.values())
    return res
