"""What a layer or a training loop needs to run sequence-parallel: one object holding the group.

A model run sequence-parallel gives every layer the same SequenceParallelContext (or None
for the ordinary single-GPU path) and each layer calls the context's op instead of the
linattn op of the same name:

    sp = SequenceParallelContext(group)                    # group None: the default group
    ids = sp.split(ids)                                    # [B, T] -> this rank's [B, T_r]
    pos = torch.arange(*sp.local_range(T)) (for RoPE)      # global positions of the slice
    o, _ = sp.linear_attention(q, k, v, g, backend=...)    # linear mixers (any gate)
    o, _ = sp.delta_rule(q, k, v, beta, g)                 # (Gated) DeltaNet
    o = sp.causal_attention(q, k, v)                       # softmax-attention layers (LASP-2H)
    x = torch.cat([sp.prev_tokens(x, w - 1), x], 1)        # before a width-w causal conv

The loss is then a sum over ranks: sum each rank's token-loss sum and divide by the global
token count (or all-reduce the loss), and all-reduce (SUM) parameter gradients over the
group, as every parameter only sees its rank's tokens.
"""
from __future__ import annotations

from . import attention, lasp
from .comm import check_group, gather_sequence, rank_and_world


def local_range(T: int, group=None) -> tuple[int, int]:
    """[start, end) of this rank's slice when T steps are split as `split` splits them.

    The first T % W ranks get one step more than the others (torch.tensor_split's rule)."""
    rank, world = rank_and_world(group)
    base, extra = divmod(T, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def split_sequence(x, group=None, dim: int = 1):
    """This rank's contiguous slice of a whole sequence held on every rank (no communication)."""
    start, end = local_range(x.shape[dim], group)
    return x.narrow(dim, start, end - start)


class SequenceParallelContext:
    """The process group of one sequence-parallel model replica, and the ops bound to it.

    Every method takes and returns this rank's slice along time ([B, T_r, ...]); see the
    functions they call for shapes, dtypes and what is sent.
    """

    def __init__(self, group=None):
        check_group(group)
        self.group = group

    @property
    def rank(self) -> int:
        return rank_and_world(self.group)[0]

    @property
    def world_size(self) -> int:
        return rank_and_world(self.group)[1]

    def local_range(self, T: int) -> tuple[int, int]:
        return local_range(T, self.group)

    def split(self, x, dim: int = 1):
        return split_sequence(x, self.group, dim)

    def gather(self, x):
        """Inverse of split along dim 1: [B, T_r, ...] -> [B, T, ...] on every rank (differentiable)."""
        return gather_sequence(x, self.group)

    def linear_attention(self, q, k, v, g=None, **kw):
        return lasp.linear_attention(q, k, v, g, group=self.group, **kw)

    def delta_rule(self, q, k, v, beta, g=None, **kw):
        return lasp.delta_rule(q, k, v, beta, g, group=self.group, **kw)

    def causal_attention(self, q, k, v, *, scale=None):
        return attention.causal_attention(q, k, v, self.group, scale=scale)

    def gather_kv(self, k, v):
        return attention.gather_kv(k, v, self.group)

    def prev_tokens(self, x, n: int):
        return attention.prev_tokens(x, n, self.group)
