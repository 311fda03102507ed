"""LASP-2 sequence parallelism for linear attention and the delta rule.

The sequence is cut along time into W contiguous slices, rank r holding the r-th. Over its
slice a rank's effect on the state is affine:

    S_out = M_r S_in + E_r

(M_r the product of the slice's step maps, last step leftmost; E_r the state the slice
builds from zero). Each rank computes (M_r, E_r) locally, ONE all-gather gives every rank
all W pairs, and rank r folds pairs 0..r-1 into its incoming state S_in (and all W into the
final state), in the state dtype (float32; float64 for float64 inputs). It then runs the
ordinary single-GPU op on its slice from S_in. The initial state is folded into rank 0's
pair (E_0 <- M_0 S_0 + E_0), so only rank 0's copy of initial_state is read.

Backward, with the chain S_in[r+1] = M_r S_in[r] + E_r and the final state S_in[W]:

    dS_in[r] = c_r + M_r^T dS_in[r+1],   dS_in[W] = sum over ranks of d(final_state)

where c_r is what rank r's outputs send into its incoming state (computable locally, before
any communication). ONE all-gather of (c_r, d final_state_r) gives every rank what it needs
to form dS_out[r] = dS_in[r+1] by folding ranks W-1..r+1; the local op then backpropagates
(do, dS_out) into q, k, v, gates and (on rank 0) initial_state.

Gradients of inputs shared by all ranks are split by use, as for any parameter under
sequence parallelism: a constant gate g [H] gets on each rank the part from its own slice
(all-reduce them with SUM for the single-process gradient), and initial_state's gradient
arrives on rank 0 (zeros on the other ranks). final_state is the same tensor on every rank
and its gradients from all ranks add up.

Requirements: every rank calls with the same B, H, K, V, dtype, gate kind,
output_final_state and requires_grad pattern (the collectives must match), in the same
order; slices may have any length (not a multiple of any chunk size).
"""
from __future__ import annotations

import torch

from ..ops import api as _api
from ..ops.api import MAX_HEAD_DIM
from .comm import all_gather_stacked, check_group, rank_and_world

# Tokens per block when summing outer products over a slice: bounds float32 temporaries
# to ~BLOCK * H * D elements whatever the slice length.
BLOCK_TOKENS = 16384


def state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- gated sums

def _log_decay_steps(g, B, T, H):
    """Any gate -> a per-step log-decay broadcastable to [B, T, H, K]: [B|1, T, H, 1|K] (None: None)."""
    if g is None:
        return None
    if g.dim() == 1:  # [H] constant
        return g.view(1, 1, H, 1).expand(1, T, H, 1)
    if g.dim() == 3:  # [B, T, H] scalar
        return g.unsqueeze(-1)  # [B, T, H, 1]
    return g  # [B, T, H, K]


def weighted_outer_sum(a, b, logd, *, reverse: bool, dtype):
    """sum_t (a_t * exp(L_t)) b_t^T over the slice, in dtype, with the log-weights L_t:

        reverse=False:  L_t = sum_{s <= t} logd_s   (decay from the slice start to t, inclusive)
        reverse=True:   L_t = sum_{s > t} logd_s    (decay from after t to the slice end)

    a: [B, T, H, K]; b: [B, T, H, V]; logd: None or broadcastable [B|1, T, H, 1|K].
    Returns (sum [B, H, K, V], total log-decay of the slice broadcast to [B, H, K] or None).
    Partial sums run per block of BLOCK_TOKENS tokens with a carried offset, so the weights
    that matter (L near 0) are never the difference of two large sums."""
    B, T, H, K = a.shape
    V = b.shape[-1]
    # 16-bit inputs on CUDA: TF32 tensor cores (10-bit mantissa, finer than the inputs'
    # 8 bits; float32 accumulation), else these sums would cost a sizeable part of the op.
    tf32 = a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32
    prev = torch.get_float32_matmul_precision()
    if tf32:
        torch.set_float32_matmul_precision("high")
    try:
        return _weighted_outer_sum_blocks(a, b, logd, reverse, dtype)
    finally:
        if tf32:
            torch.set_float32_matmul_precision(prev)


def _weighted_outer_sum_blocks(a, b, logd, reverse, dtype):
    B, T, H, K = a.shape
    V = b.shape[-1]
    acc = torch.zeros(B, H, K, V, dtype=dtype, device=a.device)
    carry = None if logd is None else torch.zeros(
        (logd.shape[0], 1, H, logd.shape[-1]), dtype=dtype, device=a.device)
    starts = list(range(0, T, BLOCK_TOKENS))
    for s in (reversed(starts) if reverse else starts):
        e = min(s + BLOCK_TOKENS, T)
        a_blk, b_blk = a[:, s:e].to(dtype), b[:, s:e].to(dtype)
        if logd is not None:
            gb = logd[:, s:e].to(dtype)  # [B|1, n, H, 1|K]
            if reverse:
                incl = gb.flip(1).cumsum(1).flip(1)  # sum_{s' >= t} within the block
                excl = torch.cat([incl[:, 1:], torch.zeros_like(incl[:, :1])], dim=1)
                a_blk = a_blk * torch.exp(carry + excl)
                carry = carry + incl[:, :1]
            else:
                incl = carry + gb.cumsum(1)
                a_blk = a_blk * torch.exp(incl)
                carry = incl[:, -1:]
        acc += torch.einsum("bthk,bthv->bhkv", a_blk, b_blk)
    total = None if carry is None else carry[:, 0].expand(B, H, K)
    return acc, total


# ----------------------------------------------------------------------------- op kinds

class _LinearAttentionKind:
    """Gated linear attention: M_r = diag(decay_r) (per key row), payload [B, H, K, V + 1] = [E_r | decay_r]."""

    def __init__(self, scale, backend, V):
        self.scale, self.backend, self.V = scale, backend, V

    def transition(self, args, S0):
        q, k, v, g = args
        B, T, H, K = q.shape
        sdt = state_dtype(q)
        E, total = weighted_outer_sum(k, v, _log_decay_steps(g, B, T, H), reverse=True, dtype=sdt)
        decay = torch.ones(B, H, K, dtype=sdt, device=q.device) if total is None else torch.exp(total)
        if S0 is not None:
            E = decay.unsqueeze(-1) * S0.to(sdt) + E
        return torch.cat([E, decay.unsqueeze(-1)], dim=-1), None  # [B, H, K, V + 1]

    def apply(self, p, S):  # M S + E
        return p[..., : self.V] + p[..., self.V:] * S

    def apply_transposed(self, p, dS):  # M^T dS
        return p[..., self.V:] * dS

    def incoming_grad(self, args, saved, do):
        """c_r = d(sum_t <do_t, o_t>)/dS_in = sum_t scale (q_t * exp(b_t)) do_t^T."""
        q, g = args[0], args[3]
        B, T, H, _ = q.shape
        c, _ = weighted_outer_sum(q, do, _log_decay_steps(g, B, T, H), reverse=False,
                                  dtype=state_dtype(q))
        return c * self.scale

    def run(self, args, S_in):
        q, k, v, g = args
        return _api.linear_attention(q, k, v, g, scale=self.scale, initial_state=S_in,
                                     output_final_state=True, backend=self.backend)


class _DeltaRuleKind:
    """(Gated) delta rule: M_r dense [B, H, K, K], payload [B, H, K, K + V] = [M_r | E_r].

    M_r is the op run with v = 0 from initial_state = I (a K x K state); its output is then
    o~_t = scale P_t^T q_t (P_t the product of the maps up to t), kept for the backward:
    c_r = sum_t o~_t do_t^T. With K + V <= MAX_HEAD_DIM the two runs are one op call on
    v' = [0 | v] from [I | S0]."""

    def __init__(self, scale, backend, V):
        self.scale, self.backend, self.V = scale, backend, V

    def _op(self, q, k, v, beta, g, S0):
        return _api.delta_rule(q, k, v, beta, g, scale=self.scale, initial_state=S0,
                               output_final_state=True, backend=self.backend)

    def transition(self, args, S0):
        q, k, v, beta, g = args
        B, T, H, K = q.shape
        V, sdt = self.V, state_dtype(q)
        eye = torch.eye(K, dtype=sdt, device=q.device).expand(B, H, K, K)
        zeros_v = torch.zeros(B, T, H, K, dtype=v.dtype, device=v.device)
        if K + V <= MAX_HEAD_DIM:
            S0_part = torch.zeros(B, H, K, V, dtype=sdt, device=q.device) if S0 is None else S0.to(sdt)
            o2, st = self._op(q, k, torch.cat([zeros_v, v], dim=-1), beta, g,
                              torch.cat([eye, S0_part], dim=-1))  # o2 [B, T, H, K + V], st [B, H, K, K + V]
            return st.to(sdt), o2[..., :K].contiguous()  # o~ [B, T, H, K]
        o_tilde, M = self._op(q, k, zeros_v, beta, g, eye.contiguous())
        _, E = self._op(q, k, v, beta, g, None if S0 is None else S0.to(sdt))
        return torch.cat([M.to(sdt), E.to(sdt)], dim=-1), o_tilde

    def apply(self, p, S):
        K = p.shape[-1] - self.V
        return p[..., :K] @ S + p[..., K:]

    def apply_transposed(self, p, dS):
        K = p.shape[-1] - self.V
        return p[..., :K].transpose(-1, -2) @ dS

    def incoming_grad(self, args, o_tilde, do):
        c, _ = weighted_outer_sum(o_tilde, do, None, reverse=False, dtype=state_dtype(args[0]))
        return c

    def run(self, args, S_in):
        return self._op(*args, S_in)


# ----------------------------------------------------------------------------- autograd

class _LASP2(torch.autograd.Function):
    """One all-gather of per-rank (M_r, E_r) forward, one all-gather of (c_r, dfinal_r) backward."""

    @staticmethod
    def forward(ctx, kind, group, want_final, S0, *args):
        rank, world = rank_and_world(group)
        S0_used = S0 if rank == 0 else None
        with torch.no_grad():
            payload, saved = kind.transition(args, S0_used)
            pays = all_gather_stacked(payload, group)  # [W, B, H, K, P]
            S_in = S0_used
            if rank > 0:
                S_in = torch.zeros_like(payload[..., : kind.V])
                for j in range(rank):
                    S_in = kind.apply(pays[j], S_in)
            final = None
            if want_final:
                final = torch.zeros_like(payload[..., : kind.V])
                for j in range(world):
                    final = kind.apply(pays[j], final)

        needs = ctx.needs_input_grad[4:]
        leaves = [a.detach().requires_grad_(n) if a is not None else None for a, n in zip(args, needs)]
        s_leaf = None
        if S_in is not None:
            s_leaf = S_in.detach().requires_grad_(rank == 0 and ctx.needs_input_grad[3])
        with torch.enable_grad():
            o, S_out = kind.run(leaves, s_leaf)

        ctx.kind, ctx.group, ctx.rank, ctx.world, ctx.want_final = kind, group, rank, world, want_final
        ctx.pays, ctx.saved, ctx.o, ctx.S_out = pays, saved, o, S_out
        ctx.leaves, ctx.s_leaf = leaves, s_leaf
        ctx.S0_like = None if S0 is None else (S0.shape, S0.dtype, S0.device)
        if final is None:
            final = payload.new_zeros(0)
        return o.detach(), final

    @staticmethod
    def backward(ctx, do, dfinal):
        kind, rank, world, V = ctx.kind, ctx.rank, ctx.world, ctx.kind.V
        with torch.no_grad():
            c = kind.incoming_grad(ctx.leaves, ctx.saved, do)  # [B, H, K, V]
            msg = torch.cat([c, dfinal.to(c.dtype)], dim=-1) if ctx.want_final else c
            got = all_gather_stacked(msg, ctx.group)  # [W, B, H, K, V or 2V]
            dS = got[..., V:].sum(0) if ctx.want_final else torch.zeros_like(c)
            for j in range(world - 1, rank, -1):
                dS = kind.apply_transposed(ctx.pays[j], dS) + got[j, ..., :V]

        targets = [x for x in ctx.leaves if x is not None and x.requires_grad]
        if ctx.s_leaf is not None and ctx.s_leaf.requires_grad:
            targets.append(ctx.s_leaf)
        grads = {}
        if targets:
            outs = torch.autograd.grad([ctx.o, ctx.S_out], targets, [do, dS.to(ctx.S_out.dtype)],
                                       allow_unused=True)
            grads = {id(t): gr for t, gr in zip(targets, outs)}
        arg_grads = [None if x is None else grads.get(id(x)) for x in ctx.leaves]
        dS0 = None
        if ctx.needs_input_grad[3]:
            dS0 = grads.get(id(ctx.s_leaf)) if rank == 0 else None
            if dS0 is None:
                shape, dtype, device = ctx.S0_like
                dS0 = torch.zeros(shape, dtype=dtype, device=device)
        return (None, None, None, dS0, *arg_grads)


# ----------------------------------------------------------------------------- public API

def _check_common(group, backend, q, v, initial_state):
    check_group(group)
    if backend not in _api.BACKENDS:
        raise ValueError(f"backend must be one of {_api.BACKENDS}, got {backend!r}")
    if initial_state is not None:
        B, _, H, K = q.shape
        _api._check_state("initial_state", initial_state, q, (B, H, K, v.shape[-1]), "[B, H, K, V]")


def _run(kind, group, initial_state, output_final_state, args, single):
    rank, world = rank_and_world(group)
    if world == 1:
        return single()
    o, final = _LASP2.apply(kind, group, bool(output_final_state), initial_state, *args)
    return o, (final if output_final_state else None)


def linear_attention(q, k, v, g=None, *, group=None, scale=None, initial_state=None,
                     output_final_state=False, backend="auto"):
    """Sequence-parallel linattn.linear_attention (LASP-2): S_t = exp(g_t) S_{t-1} + k_t v_t^T.

    Each rank passes its contiguous slice of the sequence: rank r of group holds the r-th
    block of time steps (any lengths, equal or not).

    Args:
        q, k: [B, T_r, H, K]; v: [B, T_r, H, V]; one dtype (float32, bfloat16, float16, float64).
        g: log-decay (<= 0), float32 or q's dtype: None, [H] (constant; the same on every
            rank), [B, T_r, H] (scalar) or [B, T_r, H, K] (per key), this rank's slice.
        group: a torch.distributed ProcessGroup (None: the default group; without an
            initialised default group this is the single-process op).
        scale: multiplies q (default K ** -0.5).
        initial_state: [B, H, K, V], the state before rank 0's slice. Pass it on every rank
            (None on ranks > 0 is allowed too): only rank 0's copy is read, and its gradient
            arrives on rank 0 (zeros elsewhere).
        output_final_state: return the state after the whole sequence on every rank.
        backend: the local op's backend ("auto", "triton", "torch", "reference").

    Returns:
        o: [B, T_r, H, V] in v's dtype, this rank's slice; final_state: [B, H, K, V] float32
        (float64 for float64 inputs), identical on every rank, or None.

    Communication (W ranks, 4 bytes per float32 element, 8 for float64):
        forward: one all-gather; each rank sends B*H*K*(V+1) elements (E_r and the slice's
            total per-key decay); independent of T.
        backward: one all-gather; each rank sends B*H*K*V elements (c_r), twice that with
            output_final_state=True (plus its d final_state).
    A constant gate's gradient is this rank's part: all-reduce it (SUM) across the group,
    as for any parameter under sequence parallelism.
    """
    _api._check_qkv(q, k, v)
    B, T, H, K = q.shape
    scale = _api._check_scale(scale, K)
    _api._check_log_decay(g, q)
    _check_common(group, backend, q, v, initial_state)
    kind = _LinearAttentionKind(scale, backend, v.shape[-1])
    return _run(kind, group, initial_state, output_final_state, (q, k, v, g),
                lambda: _api.linear_attention(q, k, v, g, scale=scale, initial_state=initial_state,
                                              output_final_state=output_final_state, backend=backend))


def delta_rule(q, k, v, beta, g=None, *, group=None, scale=None, initial_state=None,
               output_final_state=False, backend="auto"):
    """Sequence-parallel linattn.delta_rule (LASP-2): DeltaNet (g None), Gated DeltaNet (g [B, T_r, H]).

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t)

    Args:
        q, k: [B, T_r, H, K]; v: [B, T_r, H, V]; one dtype. Keys as given (L2-normalised by callers).
        beta: [B, T_r, H] in (0, 1); g: None or [B, T_r, H] log-decay; float32 or q's dtype.
        group, scale, initial_state, output_final_state, backend: as linear_attention.

    Returns:
        o: [B, T_r, H, V] in v's dtype; final_state: [B, H, K, V] float32 (float64 for
        float64 inputs) on every rank, or None.

    Communication (W ranks, 4 bytes per float32 element, 8 for float64):
        forward: one all-gather; each rank sends B*H*K*(K+V) elements (the dense K x K map
            M_r and E_r); independent of T.
        backward: one all-gather; each rank sends B*H*K*V elements, 2*B*H*K*V with
            output_final_state=True.
    Extra local work over the single-GPU op: one forward of the op on v' = [0 | v] (V' = K + V,
    or two calls when K + V > 256) without autograd, to form (M_r, E_r).
    """
    _api._check_qkv(q, k, v)
    B, T, H, K = q.shape
    scale = _api._check_scale(scale, K)
    _api._check_step_gate("beta", beta, q)
    _api._check_log_decay(g, q, allowed=("none", "scalar"))
    _check_common(group, backend, q, v, initial_state)
    kind = _DeltaRuleKind(scale, backend, v.shape[-1])
    return _run(kind, group, initial_state, output_final_state, (q, k, v, beta, g),
                lambda: _api.delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                        output_final_state=output_final_state, backend=backend))
