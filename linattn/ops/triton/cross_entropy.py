"""Cross-entropy rows in Triton, for linattn.ops.linear_ce's chunks: from a chunk's logits
[n, V] (h's dtype), each row's loss lse - logit[target] (float32) and, in place of the logits,
the gradient (softmax - onehot) * scale in the logits' dtype, in two passes over the row (an
online max / sum of exponentials, then the gradient) instead of PyTorch's float32 copy,
logsumexp, exp, scatter, scale and cast (six passes over a float32 [n, V]).

Rows whose target is ignore_index get loss 0 and a zero gradient. Targets are not checked on
the GPU (that would sync): one outside [0, V) reads a clamped column, never out of bounds. Called by
linear_ce.linear_cross_entropy_fwd (a custom op already), so it has no custom op of its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..alloc import empty

BLOCK_V = 2048  # logits per step of the row loop
NUM_WARPS = 8


@triton.jit
def ce_rows_kernel(logits, targets, scale, loss, V, ignore_index, BV: tl.constexpr,
                   NEED_GRAD: tl.constexpr):
    """Row i (grid n): loss[i], and the row's gradient over its logits when NEED_GRAD."""
    tl.static_assert(BV >= 16)
    i = tl.program_id(0).to(tl.int64)
    row = logits + i * V
    tgt = tl.load(targets + i).to(tl.int64)
    valid = tgt != ignore_index
    # pass 1: running max m and sum of exp(x - m) over the row
    m = tl.full([BV], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BV], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        x = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # a lane that has seen only padding keeps s = 0: shift by 0 there, not by -inf
        ms = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - ms) + tl.exp(x - ms)
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    # the row's loss (0 when ignored)
    x_t = tl.load(row + tl.minimum(tl.maximum(tl.where(valid, tgt, 0), 0), V - 1)).to(tl.float32)
    tl.store(loss + i, tl.where(valid, lse - x_t, 0.0))
    if NEED_GRAD:
        # pass 2: (softmax - onehot) * scale, 0 on ignored rows, over the logits
        w = tl.where(valid, tl.load(scale).to(tl.float32), 0.0)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            mc = cols < V
            x = tl.load(row + cols, mask=mc, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == tgt, 1.0, 0.0)) * w
            tl.store(row + cols, g.to(logits.dtype.element_ty), mask=mc)


def ce_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
            need_grad: bool) -> torch.Tensor:
    """loss [n] float32; with need_grad, logits [n, V] (contiguous, h's dtype) is overwritten
    with d loss_sum * scale / d logits. targets [n] int64; scale 0-d float32."""
    n, V = logits.shape
    loss = empty(n, dtype=torch.float32, device=logits.device)
    if n:
        ce_rows_kernel[(n,)](logits, targets, scale, loss, V, ignore_index,
                             BV=min(BLOCK_V, max(16, triton.next_power_of_2(V))),
                             NEED_GRAD=need_grad, num_warps=NUM_WARPS)
    return loss
