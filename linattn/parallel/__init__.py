"""Sequence parallelism on torch.distributed (LASP-2 / LASP-2H).

A sequence too long for one GPU is cut along time into contiguous slices, one per rank of a
process group. Linear mixers need only the states of the ranks before them: one all-gather of
fixed-size per-rank states (independent of the sequence length) forward, one backward.
Softmax-attention layers of a hybrid all-gather K and V instead.

    linattn.parallel.linear_attention(q, k, v, g=None, *, group=None, ...)   any gate kind
    linattn.parallel.delta_rule(q, k, v, beta, g=None, *, group=None, ...)   (Gated) DeltaNet
    linattn.parallel.gather_kv(k, v, group)        K, V of the whole sequence (differentiable)
    linattn.parallel.causal_attention(q, k, v, group)   local queries over the gathered prefix
    linattn.parallel.prev_tokens(x, n, group)      the n steps before this slice (convolutions)
    linattn.parallel.SequenceParallelContext(group)     all of the above bound to one group

Works with gloo (CPU) and NCCL (GPU). Needs only torch and numpy.
"""
from .attention import causal_attention, gather_kv, prev_tokens
from .comm import gather_sequence
from .context import SequenceParallelContext, local_range, split_sequence
from .lasp import delta_rule, linear_attention

__all__ = ["linear_attention", "delta_rule", "gather_kv", "causal_attention", "prev_tokens",
           "gather_sequence", "SequenceParallelContext", "local_range", "split_sequence"]
