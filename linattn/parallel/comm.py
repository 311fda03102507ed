"""The few collectives sequence parallelism needs, on any torch.distributed backend.

Every function takes a process group (None: the default group). When torch.distributed is
not initialised and group is None, the "group" is this one process (world size 1): the
helpers then do no communication, so single-GPU code can call them unchanged.

Works with gloo (CPU tensors) and NCCL (CUDA tensors): all_gather_into_tensor and
reduce_scatter_tensor are used where the backend has them, list-based all_gather and
all_reduce elsewhere.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when collectives over group would talk to other processes."""
    if group is not None:
        return True
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group=None) -> tuple[int, int]:
    """(this process's rank in group, group size); (0, 1) when not distributed."""
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_group(group) -> None:
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if group is not None and not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialised")


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == dist.Backend.NCCL


def all_gather_stacked(x: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' x stacked in rank order: [W, *x.shape]. Every rank's x has one shape.

    Sends x.numel() * x.element_size() bytes per rank (receives W times that)."""
    rank, world = rank_and_world(group)
    x = x.contiguous()
    if world == 1:
        return x.unsqueeze(0)
    out = torch.empty((world,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    if _is_nccl(group):
        dist.all_gather_into_tensor(out, x, group=group)
    else:
        dist.all_gather(list(out.unbind(0)), x, group=group)
    return out


def _to_wire(x: torch.Tensor, wire_dtype) -> torch.Tensor:
    """x in the wire dtype (floating tensors only; None: x)."""
    return x if wire_dtype is None or not x.is_floating_point() else x.to(wire_dtype)


class Pending:
    """A collective in flight: wait() returns its result (after the backend's work is done),
    in dtype when given (the messages travelled in a narrower wire dtype)."""

    def __init__(self, result: torch.Tensor, work=None, dtype=None):
        self._result, self._work, self._dtype = result, work, dtype

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._dtype is not None:
            self._result, self._dtype = self._result.to(self._dtype), None
        return self._result


class ProcessGroupComm:
    """The collectives of sequence parallelism over a torch.distributed process group.

    group None: the default group; without an initialised default group this is the single
    process (rank 0 of 1), which communicates nothing. A communicator is a value: the LASP-2
    ops take one, so a rank's work can run on other transports (LoopbackComm) unchanged.

    wire_dtype: floating messages travel in this dtype (e.g. torch.bfloat16: half the bytes
    of float32 states) and are returned in their own; None sends them as they are."""

    def __init__(self, group=None, wire_dtype: torch.dtype | None = None):
        check_group(group)
        self.group, self.wire_dtype = group, wire_dtype
        self.rank, self.world = rank_and_world(group)

    def start_all_gather(self, x: torch.Tensor) -> Pending:
        """Launches the all-gather of x (every rank's x has one shape) and returns at once;
        wait() gives [W, *x.shape] in rank order. On NCCL the gather runs on NCCL's stream,
        so work queued before wait() overlaps it."""
        dtype = x.dtype
        x = _to_wire(x, self.wire_dtype).contiguous()
        if self.world == 1:
            return Pending(x.unsqueeze(0), dtype=dtype)
        out = torch.empty((self.world,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        if _is_nccl(self.group):
            work = dist.all_gather_into_tensor(out, x, group=self.group, async_op=True)
        else:
            work = dist.all_gather(list(out.unbind(0)), x, group=self.group, async_op=True)
        return Pending(out, work, dtype)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' x stacked in rank order: [W, *x.shape]."""
        return self.start_all_gather(x).wait()


class LoopbackComm:
    """One rank of a W-rank group simulated in this process, without any communication.

    all_gather(x) returns [W, *x.shape]: every rank's entry is x itself (a group whose ranks
    all hold this rank's data: what a rank's timing needs), or, with inbox, the messages the
    other ranks sent in the same call (inbox[j][i]: rank j's i-th message, e.g. the `sent`
    list of a LoopbackComm that ran rank j). With record, every message this rank sends is
    kept in `sent` (a copy), so running each rank once with a plain LoopbackComm records what
    an exact simulation of any rank needs: in LASP-2 each rank's messages depend on its own
    slice only. wire_dtype: as ProcessGroupComm's (every gathered message, this rank's
    included, is rounded to it and back).
    """

    def __init__(self, rank: int, world: int, inbox: list | None = None, record: bool = True,
                 wire_dtype: torch.dtype | None = None):
        if not (0 <= rank < world):
            raise ValueError(f"rank must be in [0, world) = [0, {world}), got {rank}")
        if inbox is not None and len(inbox) != world:
            raise ValueError(f"inbox must hold one message list per rank ({world}), got {len(inbox)}")
        self.rank, self.world, self.inbox, self.record = rank, world, inbox, record
        self.wire_dtype = wire_dtype
        self.sent: list[torch.Tensor] = []
        self.calls = 0

    def start_all_gather(self, x: torch.Tensor) -> Pending:
        i = self.calls
        self.calls += 1
        if self.record:
            self.sent.append(x.detach().clone())
        parts = [x if (self.inbox is None or j == self.rank) else
                 self.inbox[j][i].to(device=x.device, dtype=x.dtype) for j in range(self.world)]
        return Pending(_to_wire(torch.stack(parts), self.wire_dtype), dtype=x.dtype)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.start_all_gather(x).wait()


def reduce_scatter_stacked(x: torch.Tensor, group=None) -> torch.Tensor:
    """x: [W, *shape], one block per rank; returns sum over ranks of their block [rank].

    NCCL: a reduce-scatter (x.numel() / W elements received per rank). Other backends
    (gloo has no reduce-scatter): an all-reduce of x, then this rank's block."""
    rank, world = rank_and_world(group)
    if world == 1:
        return x[0]
    x = x.contiguous()
    if _is_nccl(group):
        out = torch.empty(tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x[rank]


def all_gather_lengths(n: int, device, group=None) -> list[int]:
    """Every rank's integer n, in rank order (one tiny all-gather)."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    return [int(v) for v in all_gather_stacked(t, group).view(-1).tolist()]


class _GatherSequence(torch.autograd.Function):
    """Differentiable all-gather along dim 1 of [B, T_r, ...] slices of unequal lengths.

    Forward: each rank's slice is zero-padded to max(T_r) and all-gathered (W * B * max(T_r)
    * rest elements received per rank); the pads are dropped. Backward: the gradient of the
    whole [B, sum T_r, ...] tensor is summed over ranks and each rank keeps its slice
    (reduce-scatter on NCCL, all-reduce on gloo)."""

    @staticmethod
    def forward(ctx, x, lengths, group):
        rank, world = rank_and_world(group)
        tmax = max(lengths)
        pad = x.new_zeros((x.shape[0], tmax) + tuple(x.shape[2:]))
        pad[:, : x.shape[1]] = x
        g = all_gather_stacked(pad, group)  # [W, B, tmax, ...]
        ctx.lengths, ctx.group, ctx.rank = lengths, group, rank
        return torch.cat([g[j, :, :n] for j, n in enumerate(lengths)], dim=1)

    @staticmethod
    def backward(ctx, dy):
        lengths, tmax = ctx.lengths, max(ctx.lengths)
        blocks = dy.new_zeros((len(lengths), dy.shape[0], tmax) + tuple(dy.shape[2:]))
        for j, part in enumerate(torch.split(dy, lengths, dim=1)):
            blocks[j, :, : lengths[j]] = part
        dx = reduce_scatter_stacked(blocks, ctx.group)  # [B, tmax, ...]
        return dx[:, : lengths[ctx.rank]], None, None


def gather_sequence(x: torch.Tensor, group=None, lengths: list[int] | None = None) -> torch.Tensor:
    """All ranks' slices [B, T_r, ...] joined along time into [B, sum_r T_r, ...], differentiable.

    lengths: every rank's T_r (gathered with one small collective when None)."""
    rank, world = rank_and_world(group)
    if world == 1:
        return x
    if lengths is None:
        lengths = all_gather_lengths(x.shape[1], x.device, group)
    return _GatherSequence.apply(x, list(lengths), group)
