"""Linear layer + cross-entropy without the full logits: loss(h W^T, targets), chunked over
tokens, with the gradients wrt h and W computed chunk by chunk in the forward (as Liger-Kernel
and fla's FusedLinearCrossEntropy do). Peak extra memory is one chunk's logits and softmax
([chunk, vocab]) instead of [tokens, vocab] float32 logits and their gradient.

Per chunk: logits = h_c W^T in h's dtype (float32 accumulation), then in float32 (float64 for
float64 h): lse = logsumexp(logits), loss_t = lse - logits[target], and
dlogits = (softmax - onehot) * scale, rounded to h's dtype exactly where autograd through
F.linear(h, W).float() would round it; dh_c = dlogits W, dW += dlogits^T h_c (float32 sum).
scale is 1 (sum) or 1 / (number of counted tokens) (mean); ignored tokens (target ==
ignore_index, or mask False) add nothing to the loss and get zero gradients. With no counted
token the mean is NaN, as F.cross_entropy's is.

linear_cross_entropy is the entry point; the work is the torch custom op
linattn::linear_cross_entropy_fwd (torch.compile traces it as one opaque node): the matmuls in
PyTorch, the softmax and its gradient in PyTorch or, on CUDA (backend "auto", as
linattn.ops.fused chooses), one Triton kernel per chunk that overwrites the chunk's logits
with their gradient (linattn.ops.triton.cross_entropy).
"""
from __future__ import annotations

import torch

from .fused import takes_triton

REDUCTIONS = ("mean", "sum")
CHUNK_ELEMS = 1 << 25  # logits per chunk (128 MiB of float32 softmax)


def default_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: CHUNK_ELEMS logits, a multiple of 64 tokens, at least 64."""
    return max(64, (CHUNK_ELEMS // max(vocab, 1)) // 64 * 64)


@torch.library.custom_op("linattn::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int, sum_reduction: bool, chunk_tokens: int,
                             need_grad: bool, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss: 0-d float32 (float64 for float64 h), dh [N, d] in h's dtype, dW [V, d] in W's
    dtype; dh and dW are d loss / d(h, W) for a loss cotangent of 1, empty tensors unless
    need_grad). h [N, d]; weight [V, d] in h's dtype; targets [N] int64; use_triton: the
    softmax part in Triton (not for float64)."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    N, V = h.shape[0], weight.shape[0]
    with torch.autocast(h.device.type, enabled=False):
        valid_all = targets != ignore_index
        count = valid_all.sum()
        scale = torch.ones((), dtype=acc, device=h.device) if sum_reduction else 1.0 / count.to(acc)
        loss = torch.zeros((), dtype=acc, device=h.device)
        dh = torch.empty_like(h) if need_grad else h.new_empty(0)
        dw = torch.zeros(V, h.shape[1], dtype=acc, device=h.device) if need_grad else h.new_empty(0)
        for s in range(0, N, chunk_tokens):
            e = min(N, s + chunk_tokens)
            hc, tc, valid = h[s:e], targets[s:e], valid_all[s:e]
            if use_triton:
                # the chunk's logits in h's dtype, overwritten with their gradient
                from .triton.cross_entropy import ce_rows
                g = (hc @ weight.t()).contiguous()                          # [n, V]
                loss = loss + ce_rows(g, tc, scale.to(torch.float32), ignore_index, need_grad).sum()
                if need_grad:
                    dh[s:e] = g @ weight
                    dw += (g.t() @ hc).to(acc)
                continue
            # the chunk's logits in h's dtype, then float32
            lf = (hc @ weight.t()).to(acc)                                  # [n, V]
            lse = torch.logsumexp(lf, dim=-1)                               # [n]
            tsafe = torch.where(valid, tc, torch.zeros_like(tc))
            picked = lf.gather(1, tsafe[:, None])[:, 0]
            loss = loss + torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            if need_grad:
                # dlogits = (softmax - onehot) * scale on counted rows, 0 on ignored ones
                p = lf.sub_(lse[:, None]).exp_()
                p.scatter_add_(1, tsafe[:, None], -torch.ones_like(lse)[:, None])
                p.mul_((valid.to(acc) * scale)[:, None])
                g = p.to(h.dtype)
                dh[s:e] = g @ weight
                dw += (g.t() @ hc).to(acc)
        return loss * scale, dh, dw.to(weight.dtype) if need_grad else dw


@linear_cross_entropy_fwd.register_fake
def _(h, weight, targets, ignore_index, sum_reduction, chunk_tokens, need_grad, use_triton):
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    return (h.new_empty((), dtype=acc), torch.empty_like(h) if need_grad else h.new_empty(0),
            torch.empty_like(weight) if need_grad else h.new_empty(0))


def _setup(ctx, inputs, output):
    _, dh, dw = output
    ctx.save_for_backward(dh, dw)
    ctx.need_grad = inputs[6]


def _backward(ctx, dloss, _dh, _dw):
    if not ctx.need_grad:
        raise RuntimeError("linear_cross_entropy was called with no input requiring grad")
    dh, dw = ctx.saved_tensors
    return dh * dloss.to(dh.dtype), dw * dloss.to(dw.dtype), None, None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor | None = None, *, ignore_index: int = -100,
                         reduction: str = "mean", chunk_tokens: int | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of logits = h @ weight^T against targets, chunked over tokens.

    h [..., d] float (the final hidden states); weight [V, d] (the LM head); targets [...]
    int64 with h's leading shape; mask [...] bool (True: counted) or None; ignore_index: a
    target value that is not counted; reduction "mean" (over counted tokens) or "sum";
    chunk_tokens: tokens per chunk (default: default_chunk_tokens(V)); backend: "auto"
    (the softmax part in Triton for CUDA tensors), "torch" or "triton" (see linattn.ops.fused).
    Returns a 0-d float32 loss (float64 for a float64 h). Under torch.autocast the logits are
    computed in autocast's dtype, as F.linear would compute them there. Gradients flow to h
    and weight; equal to F.cross_entropy(F.linear(h, weight).float(), targets) to rounding.
    """
    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        raise TypeError(f"h must be a floating tensor [..., d], got {type(h).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight must be [V, d={h.shape[-1]}], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError("targets must be an int64 (or int32) tensor with h's leading shape")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"targets must be {tuple(h.shape[:-1])} (h's leading shape), got {tuple(targets.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != targets.shape):
        raise ValueError(f"mask must be a bool tensor of targets' shape {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or int(chunk_tokens) < 1):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    targets = targets.to(torch.int64)
    if mask is not None:
        targets = torch.where(mask, targets, torch.full_like(targets, ignore_index))
    dev = h.device.type
    if torch.is_autocast_enabled(dev) and h.dtype != torch.float64:
        dt = torch.get_autocast_dtype(dev)
        h, weight = h.to(dt), weight.to(dt)
    elif weight.dtype != h.dtype:
        weight = weight.to(h.dtype)
    chunk = int(chunk_tokens) if chunk_tokens is not None else default_chunk_tokens(weight.shape[0])
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, _, _ = linear_cross_entropy_fwd(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1),
                                          int(ignore_index), reduction == "sum", chunk, need_grad,
                                          takes_triton(h, backend))
    return loss
