"""Every rank of a sequence-parallel op simulated in this process, exactly, over LoopbackComm.

Not a test module. `simulated(op, world, lengths, **kw)` returns a function of the whole
sequence's inputs that runs the W ranks one after another and returns (o of the whole
sequence, final state), differentiable with respect to every input, so the oracle tests
(helpers.check_against_oracle) can hold it to the single-process op.

How: in LASP-2 every message a rank sends depends on its own slice only (forward: its
(M_r, E_r); backward: its c_r and d final_state). Pass one runs each rank on a plain
LoopbackComm, which records what it sends (its results are discarded: it gathered copies of
itself); pass two runs each rank on a LoopbackComm whose inbox is pass one's records, which
is what a real group would have delivered. The backward runs both passes' backward the same
way (pass one's first, so that its records hold the backward messages pass two gathers).
"""
from __future__ import annotations

import torch

from linattn.parallel import lasp
from linattn.parallel.comm import LoopbackComm

PER_TOKEN = ("q", "k", "v", "beta", "g")


class _Simulated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, names, *values):
        op, world, lengths, kw, wire, want_final = spec
        x = dict(zip(names, values))
        const_gate = x.get("g") is not None and x["g"].dim() == 1
        starts = [sum(lengths[:r]) for r in range(world)]

        def cut(name, r):
            t = x[name]
            if t is None:
                return None
            if name in PER_TOKEN and not (name == "g" and const_gate):
                t = t[:, starts[r]: starts[r] + lengths[r]]
            return t.detach().requires_grad_(True)

        fn = lasp.delta_rule_on if op == "delta" else lasp.linear_attention_on
        recorders = [LoopbackComm(r, world) for r in range(world)]
        inbox = [c.sent for c in recorders]  # filled as pass one runs
        runs = []
        for comm in recorders + [LoopbackComm(r, world, inbox, wire_dtype=wire) for r in range(world)]:
            mine = {n: cut(n, comm.rank) for n in names}
            with torch.enable_grad():
                o, st = fn(comm, **mine, output_final_state=want_final, **kw)
            runs.append((comm.rank, mine, o, st))
        ctx.runs, ctx.names, ctx.starts, ctx.lengths, ctx.const_gate = runs, names, starts, lengths, const_gate
        real = runs[world:]
        final = real[0][3].detach() if want_final else real[0][2].new_zeros(0)
        return torch.cat([o.detach() for _, _, o, _ in real], dim=1), final

    @staticmethod
    def backward(ctx, do, dfinal):
        world = len(ctx.lengths)
        grads = {n: [] for n in ctx.names}
        for i, (rank, mine, o, st) in enumerate(ctx.runs):
            sl = slice(ctx.starts[rank], ctx.starts[rank] + ctx.lengths[rank])
            outs, cots = [o], [do[:, sl]]
            if st is not None:
                outs.append(st)
                cots.append(dfinal if rank == 0 else torch.zeros_like(dfinal))  # the sum counts
            leaves = [mine[n] for n in ctx.names if mine[n] is not None and mine[n].requires_grad]
            got = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
            if i >= world:  # pass two: the real gradients
                by_name = dict(zip([n for n in ctx.names if mine[n] is not None and mine[n].requires_grad], got))
                for n in ctx.names:
                    grads[n].append(by_name.get(n))
        out = []
        for n in ctx.names:
            parts = grads[n]
            if not parts or all(p is None for p in parts):
                out.append(None)
            elif n in PER_TOKEN and not (n == "g" and ctx.const_gate):
                out.append(torch.cat(parts, dim=1))
            else:  # a constant gate: the ranks' parts add up; initial_state: rank 0's
                out.append(sum(p for p in parts if p is not None))
        ctx.runs = None
        return (None, None, *out)


def simulated(op: str, world: int, lengths: list[int], wire_dtype=None, **kw):
    """fn(**inputs, output_final_state=True) -> (o [B, T, H, V], final_state or None): the W
    ranks of the sequence-parallel op ("linear" or "delta") over slices of the given lengths,
    the messages delivered in wire_dtype (LoopbackComm's); kw goes to linear_attention_on /
    delta_rule_on (backend, sums, fuse_dim, form, scale)."""
    def fn(output_final_state=True, **inputs):
        names = tuple(inputs)
        spec = (op, world, list(lengths), kw, wire_dtype, bool(output_final_state))
        o, final = _Simulated.apply(spec, names, *inputs.values())
        return o, (final if output_final_state else None)
    return fn
