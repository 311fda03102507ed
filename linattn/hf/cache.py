"""The generation cache of a linattn model: every layer's recurrent state, for transformers.

transformers' generate() keeps whatever the model's forward returns as `cache` and hands it
back on the next step (the way its own xLSTM and Mamba models carry their recurrent states,
outside the key/value `Cache` classes). LinAttnCache holds, per layer, the state a linattn
mixer returns with return_state=True (see linattn.layers.base): matrix states and short-conv
caches of the linear mixers, key/value caches of the attention layers of hybrids.

Left padding. A batch whose rows have different lengths is prefilled one row at a time on
the row's own tokens (its padding never enters any state), and the rows' states are stacked:
fixed-size recurrent states stack as they are; attention key/value caches of different
lengths are left-padded into a "padded attention state" (see padded_attention_step) that
masks the padding and keeps each row's own positions for RoPE. Later steps run the whole
batch at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import Attention


class LinAttnCache:
    """Per-layer states of a linattn model during generation.

    states: a list with one entry per layer: the mixer's state (its own layout: a tensor, a
        tuple, or a dict), or a padded attention state (a dict with the key "valid").
    seen_tokens: how many columns of input (padding included) the states have consumed;
        transformers reads it through get_seq_length().
    """

    is_compileable = False

    def __init__(self, states: list, seen_tokens: int):
        self.states = list(states)
        self.seen_tokens = int(seen_tokens)

    def __len__(self) -> int:
        return len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keeps rows beam_idx [B'] of every state (beam search)."""
        self.states = [index_rows(s, beam_idx) for s in self.states]

    def batch_size(self) -> int:
        return _first_tensor(self.states).shape[0]


def _first_tensor(tree):
    if isinstance(tree, torch.Tensor):
        return tree
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    for item in items:
        t = _first_tensor(item)
        if t is not None:
            return t
    return None


def index_rows(tree, index: torch.Tensor):
    """tree (tensors [B, ...], in dicts/tuples/lists; other leaves kept) with rows `index`."""
    if isinstance(tree, torch.Tensor):
        return tree.index_select(0, index.to(tree.device))
    if isinstance(tree, dict):
        return {k: index_rows(v, index) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(index_rows(v, index) for v in tree)
    return tree


def stack_rows(trees: list):
    """One state for a batch from per-row states (each [1, ...]): tensors concatenated on dim 0.
    Attention states (dicts with "k", "v", "offset") of different lengths become one padded
    attention state."""
    first = trees[0]
    if isinstance(first, dict) and "offset" in first:
        return _pad_attention_states(trees)
    if isinstance(first, torch.Tensor):
        return torch.cat(trees, dim=0)
    if isinstance(first, dict):
        return {k: stack_rows([t[k] for t in trees]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(stack_rows([t[i] for t in trees]) for i in range(len(first)))
    if first is None:
        return None
    raise TypeError(f"cannot stack states of type {type(first).__name__}")


def _pad_attention_states(states: list) -> dict:
    """Attention states {"k", "v": [1, L_b, H, D], "offset": int} -> the padded attention
    state {"k", "v": [B, L, H, D] (zeros left of each row's keys), "valid": [B, L] bool,
    "kpos": [B, L] int64 position of each key, "pos": [B] int64 position of the next token}."""
    L = max(s["k"].shape[1] for s in states)
    ks, vs, valid, kpos, pos = [], [], [], [], []
    for s in states:
        n, offset = s["k"].shape[1], int(s["offset"])
        dev = s["k"].device
        ks.append(F.pad(s["k"], (0, 0, 0, 0, L - n, 0)))
        vs.append(F.pad(s["v"], (0, 0, 0, 0, L - n, 0)))
        valid.append(torch.arange(L, device=dev) >= L - n)
        kpos.append(offset - L + torch.arange(L, device=dev))
        pos.append(offset)
    dev = ks[0].device
    return {"k": torch.cat(ks), "v": torch.cat(vs), "valid": torch.stack(valid),
            "kpos": torch.stack(kpos), "pos": torch.tensor(pos, device=dev, dtype=torch.long)}


def is_padded_attention_state(state) -> bool:
    return isinstance(state, dict) and "valid" in state




def padded_attention_step(attn: Attention, x: torch.Tensor, state: dict):
    """The Attention layer `attn` on new tokens x [B, T, d_model] (no padding among them) after
    a padded attention state (see _pad_attention_states). Returns (y [B, T, d_model], the new
    padded attention state); with a sliding window the state keeps the last window-1 columns."""
    B, T, _ = x.shape
    D, dev = attn.head_dim, x.device
    q, k, v = attn.project(x)                                                          # [B, T, H(_kv), D]
    pos = state["pos"][:, None] + torch.arange(T, device=dev)                          # [B, T]
    q, k = attn.rotate(q, pos), attn.rotate(k, pos)
    k = torch.cat([state["k"].to(k.dtype), k], dim=1)                                  # [B, L+T, H, D]
    v = torch.cat([state["v"].to(v.dtype), v], dim=1)
    valid = torch.cat([state["valid"], torch.ones(B, T, dtype=torch.bool, device=dev)], dim=1)  # [B, L+T]
    kpos = torch.cat([state["kpos"], pos], dim=1)                                      # [B, L+T]
    d = pos[:, :, None] - kpos[:, None, :]                                             # [B, T, L+T]
    allowed = valid[:, None, :] & (d >= 0)
    if attn.window is not None:
        allowed &= d < attn.window
    qh, kh, vh = (z.transpose(1, 2) for z in (q, attn.expand_kv(k), attn.expand_kv(v)))  # [B, H, ., D]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed[:, None])         # [B, H, T, D]
    y = attn.o_proj(o.transpose(1, 2).flatten(-2))
    keep = k.shape[1] if attn.window is None else min(k.shape[1], attn.window - 1)
    cut = k.shape[1] - keep
    return y, {"k": k[:, cut:], "v": v[:, cut:], "valid": valid[:, cut:], "kpos": kpos[:, cut:],
               "pos": state["pos"] + T}
