"""Sequence parallelism for the softmax-attention and convolution layers of a hybrid (LASP-2H).

Softmax attention has no fixed-size state, so its layers all-gather K and V along time
(LASP-2H): each rank then attends with its own queries over the gathered prefix. Short
causal convolutions need only the last few tokens of the ranks before: `prev_tokens`.
All helpers are differentiable (the backward of the all-gather sums the gradients of each
slice over ranks and returns each rank its own: a reduce-scatter on NCCL) and take the same
`group` as linattn.parallel.linear_attention (None: the default group, or this process alone
when torch.distributed is not initialised).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .comm import all_gather_lengths, check_group, gather_sequence, rank_and_world


def _check_bthd(name, x, ref=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, T, H, D], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-d [B, T, H, D], got shape {tuple(x.shape)}")
    if ref is not None:
        if x.shape[:3] != ref.shape[:3]:
            raise ValueError(f"{name} must share B, T, H = {tuple(ref.shape[:3])}, got {tuple(x.shape)}")
        if x.dtype != ref.dtype or x.device != ref.device:
            raise TypeError(f"{name} must have dtype {ref.dtype} on {ref.device}, got {x.dtype} on {x.device}")


def gather_kv_with_lengths(k, v, group=None):
    """gather_kv, also returning every rank's slice length (list of W ints, rank order)."""
    _check_bthd("k", k)
    _check_bthd("v", v, k)
    check_group(group)
    rank, world = rank_and_world(group)
    if world == 1:
        return k, v, [k.shape[1]]
    K = k.shape[-1]
    lengths = all_gather_lengths(k.shape[1], k.device, group)
    kv = gather_sequence(torch.cat([k, v], dim=-1), group, lengths)  # [B, sum T_r, H, K + V]
    return kv[..., :K], kv[..., K:], lengths


def gather_kv(k, v, group=None):
    """All-gathers keys and values along time (LASP-2H), differentiably.

    Args:
        k: [B, T_r, H, K]; v: [B, T_r, H, V]: this rank's slice (slices may differ in length).
    Returns:
        (k_all [B, T, H, K], v_all [B, T, H, V]), T = sum of the slices, in rank order.
    Communication: one tiny all-gather of the lengths, then one all-gather in which each
    rank sends B * max_r(T_r) * H * (K + V) elements (slices are zero-padded to the longest);
    the backward sends the same amount (reduce-scatter on NCCL, all-reduce on gloo).
    """
    k_all, v_all, _ = gather_kv_with_lengths(k, v, group)
    return k_all, v_all


def causal_attention(q, k, v, group=None, *, scale=None):
    """Causal softmax attention of this rank's queries over the whole sequence's prefix.

    Query i of rank r sits at global position offset_r + i and attends every key at a
    global position <= that (offset_r = sum of the lengths of ranks < r). Equals the
    single-process causal attention's rows for this slice, forward and backward.

    Args:
        q, k: [B, T_r, H, K]; v: [B, T_r, H, V]: this rank's slice, one dtype.
        scale: softmax scale (default K ** -0.5).
    Returns:
        o: [B, T_r, H, V] in q's dtype.
    Communication: that of gather_kv.
    """
    _check_bthd("q", q)
    _check_bthd("k", k, q)
    k_all, v_all, lengths = gather_kv_with_lengths(k, v, group)
    rank, _ = rank_and_world(group)
    end = sum(lengths[: rank + 1])  # keys past this rank's last query are never attended
    return _causal_sdpa(q, k_all[:, :end], v_all[:, :end], scale)


def _causal_sdpa(q, k, v, scale):
    """Softmax attention with the causal mask aligned to the bottom right: the last query
    sees every key. q: [B, Tq, H, K]; k: [B, Tk, H, K]; v: [B, Tk, H, V], Tk >= Tq."""
    from torch.nn.attention.bias import causal_lower_right

    Tq, Tk = q.shape[1], k.shape[1]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(Tq, Tk), scale=scale)
    return o.transpose(1, 2)  # [B, Tq, H, V]


def prev_tokens(x, n: int, group=None):
    """The n time steps just before this rank's slice (zeros before the sequence start).

    For short causal convolutions: cat([prev_tokens(x, w - 1, group), x], dim=1) is what a
    width-w convolution of the slice needs. Differentiable.

    Args:
        x: [B, T_r, ...] this rank's slice (any T_r, also < n).
        n: number of steps (>= 0).
    Returns:
        [B, n, ...] in x's dtype.
    Communication: a tiny all-gather of lengths, then one all-gather in which each rank
    sends B * min(n, max T_r) * prod(rest) elements.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor [B, T, ...] with a time dimension 1")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    check_group(group)
    rank, world = rank_and_world(group)
    B, rest = x.shape[0], tuple(x.shape[2:])
    if world == 1 or n == 0:
        return x.new_zeros((B, n) + rest)
    tail = x[:, max(0, x.shape[1] - n):]  # [B, min(n, T_r), ...]
    tails_len = all_gather_lengths(tail.shape[1], x.device, group)
    tails = gather_sequence(tail, group, tails_len)  # [B, sum of tails, ...]
    before = tails[:, : sum(tails_len[:rank])][:, -n:] if rank > 0 else tails[:, :0]
    if before.shape[1] < n:
        before = torch.cat([x.new_zeros((B, n - before.shape[1]) + rest), before], dim=1)
    return before
