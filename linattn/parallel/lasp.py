"""LASP-2 sequence parallelism for linear attention and the delta rule.

The sequence is cut along time into W contiguous slices, rank r holding the r-th. Over its
slice a rank's effect on the state is affine:

    S_out = M_r S_in + E_r

(M_r the product of the slice's step maps, last step leftmost; E_r the state the slice
builds from zero). Each rank computes (M_r, E_r) locally, ONE all-gather gives every rank
all W pairs, and rank r folds pairs 0..r-1 into its incoming state S_in (and all W into the
final state), in the state dtype (float32; float64 for float64 inputs). The initial state is
folded into rank 0's pair (E_0 <- M_0 S_0 + E_0), so only rank 0's copy of initial_state is
read.

Backward, with the chain S_in[r+1] = M_r S_in[r] + E_r and the final state S_in[W]:

    dS_in[r] = c_r + M_r^T dS_in[r+1],   dS_in[W] = sum over ranks of d(final_state)

where c_r is what rank r's outputs send into its incoming state (computable locally, before
any communication). ONE all-gather of (c_r, d final_state_r) gives every rank what it needs
to form dS_out[r] = dS_in[r+1] by folding ranks W-1..r+1.

A rank's local work, per op kind (the extra work over the single-GPU op on the slice):

    gated linear attention (M_r = diag(decay_r), per key row):
        forward:  E_r = sum_t exp(b_T - b_t) k_t v_t^T (one pass over k, v; not on the last
                  rank without a final state, whose pair nobody reads), the all-gather, then
                  the op on the slice from S_in (the kernels take an initial state at no
                  extra cost), with its final state where a gradient reaches it
        backward: c_r = scale sum_t (q_t exp(b_t)) do_t^T (one pass over q, do; not on
                  rank 0), the all-gather, then the op's backward from (do, dS_out)
    delta rule (M_r dense K x K), form="states" (the default): two passes over the slice
        without autograd, o~, M_r = the op on v = 0 from I (the transition pass: o~_t =
        scale P_t^T q_t, P_t the product of the maps through t, M_r = P_T) and E_r = the
        states-only forward on v from zero (prep and the state scan, no output kernel), then
        the op with autograd on v from S_in; on the Triton kernels all three share one prep
        launch. Each rank runs only what its role needs:
            rank 0          the op from S0 alone: its payload is [0 | its final state] (M_0
                            is never read: the folds start from zero, and rank 0's incoming
                            gradient comes from its op's backward), sent after the op
            middle ranks    the transition pass (on a second CUDA stream) beside the
                            states-only pass, the all-gather, the op from S_in; on the
                            Triton kernels its chunk states come from the two passes'
                            by linearity (h_c = h_E,c + h~_c S_in, U' = U'_E + U'~ S_in:
                            batched matmuls instead of a third scan) and only its output
                            kernel runs
            the last rank   without a final state: the transition pass (for o~) while the
                            all-gather is in flight, on a second CUDA stream beside the op
                            from S_in; with one: as a middle rank
        backward: c_r = sum_t o~_t do_t^T (not on rank 0), the all-gather, the op's own
        backward
    form="twice": the op without autograd on v' = [0 | v] from [I | S0] (one call of
        V' = K + V columns; two calls when K + V > fuse_dim), whose final state is
        [M_r | E_r] and output's first K columns o~, then the op with autograd on v from S_in;
        every rank runs both (and computes the output's V columns nobody reads)
    form="once" runs the op ONCE, with autograd, on v' from [I | 0] and forms
        o = o_0 + o~ S_in (o_0 the output from zero); its backward is the op's own on
        (do' = [do S_in^T | do], dS' = [dS_out S_in^T | dS_out]). It does less arithmetic
        on paper, but the op on K + V value columns backward costs more than a second
        forward on V (PERF_NOTES.md, "Sequence parallelism: the one-GPU rank
        simulation").

The passes over time (E_r, c_r) run on a Triton kernel split over time on the Triton
backend (linattn.ops.triton.outer_sum: at B = 1 a batched matmul over time has one [K, V]
output per head to spread over the GPU, and the PyTorch form also stages float32 copies),
on chunked float32 PyTorch sums elsewhere (sums="torch").

Collectives go through a communicator value (linattn.parallel.comm): ProcessGroupComm for a
torch.distributed group, LoopbackComm to run one rank's work in a single process (timing,
tests). Each all-gather is launched before the local work that does not need its result and
waited for after: in the forward rank 0's op (its incoming state is the initial state;
the delta rule's form="states" sends rank 0's final state, so there the op comes first) and
the delta rule's transition pass on the last rank; in the backward the delta rule's
do S_in^T ("once"), and the whole backward of the last rank when no final state is asked for
(no gradient flows into it).

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

import contextlib
import os

import torch

from ..ops import api as _api
from ..ops.api import MAX_HEAD_DIM
from .comm import ProcessGroupComm

# Tokens per block when summing outer products over a slice (sums="torch"): bounds float32
# temporaries to ~BLOCK * H * D elements whatever the slice length.
BLOCK_TOKENS = 16384
SUMS = ("auto", "triton", "torch")
DELTA_FORMS = ("states", "twice", "once")


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
    that matter (L near 0) are never the difference of two large sums. (PyTorch; the Triton
    backend's form is linattn.ops.triton.outer_sum.)"""
    B, T, H, K = a.shape
    V = b.shape[-1]
    # 16-bit inputs on CUDA: TF32 tensor cores (10-bit mantissa, finer than the inputs'
    # 8 bits; float32 accumulation)
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


def _sums_impl(sums: str, backend: str, x: torch.Tensor) -> str:
    """"triton" where the local op runs on Triton (and the inputs are not float64), else "torch"."""
    if x.dtype == torch.float64:
        return "torch"
    if sums != "auto":
        return sums
    on_triton = backend == "triton" or (backend == "auto" and x.is_cuda and _api._triton_available())
    return "triton" if on_triton else "torch"


def _outer_sum_triton(a, b, g, reverse):
    from ..ops.triton.outer_sum import weighted_outer_sum as kernel_sum
    return kernel_sum(a, b, g, reverse=reverse)


# ----------------------------------------------------------------------------- op kinds

class _Local:
    """What a rank keeps between its forward and backward (filled by the op kind)."""

    def __init__(self, leaves):
        self.leaves = leaves
        self.payload = None


class _Kind:
    """What every op kind shares: the hooks _LASP2 calls that most kinds leave empty."""

    def overlap(self, st):
        """Local work that needs no incoming state, run while the forward's all-gather is in
        flight (ranks > 0)."""

    def payload_from_output(self, st):
        """The payload of a rank whose local() left it None (its own op's final state)."""
        raise NotImplementedError


class _LinearAttentionKind(_Kind):
    """Gated linear attention: M_r = diag(decay_r) (per key row), payload [B, H, K, V + 1] = [E_r | decay_r]."""

    def __init__(self, scale, backend, V, sums="auto"):
        self.scale, self.backend, self.V, self.sums = scale, backend, V, sums

    def _sum(self, a, b, g, reverse):
        """(sum_t exp(L_t) a_t^T b_t [B, H, K, V], the slice's total log-decay [B, H, K] or
        None), both in the state dtype; L as weighted_outer_sum defines it."""
        B, T, H, K = a.shape
        sdt = state_dtype(a)
        if _sums_impl(self.sums, self.backend, a) == "triton":
            out, total = _outer_sum_triton(a, b, g, reverse)
            return out.to(sdt), None if total is None else total.to(sdt)
        return weighted_outer_sum(a, b, _log_decay_steps(g, B, T, H), reverse=reverse, dtype=sdt)

    def local(self, leaves, S0, need_payload, first_rank=False, s0_grad=False):
        q, k, v, g = leaves
        B, _, H, K = q.shape
        st = _Local(leaves)
        if not need_payload:  # the last rank without a final state: nobody reads its pair
            st.payload = torch.zeros(B, H, K, self.V + 1, dtype=state_dtype(q), device=q.device)
            return st
        with torch.no_grad():
            E, total = self._sum(k, v, g, reverse=True)
            decay = torch.ones(B, H, K, dtype=E.dtype, device=q.device) if total is None else torch.exp(total)
            if S0 is not None:
                E = decay.unsqueeze(-1) * S0.to(E.dtype) + E
            st.payload = torch.cat([E, decay.unsqueeze(-1)], dim=-1)  # [B, H, K, V + 1]
        return st

    def apply(self, p, S):  # M S + E
        return p[..., : self.V] + p[..., self.V:] * S

    def apply_transposed(self, p, dS):  # M^T dS
        return p[..., self.V:] * dS

    def output(self, st, S_in, s0_grad, need_state):
        """The op on the slice from S_in (a leaf needing grad on rank 0 with s0_grad)."""
        q, k, v, g = st.leaves
        return _run_from_state(st, S_in, s0_grad, lambda s_leaf: _api.linear_attention(
            q, k, v, g, scale=self.scale, initial_state=s_leaf, output_final_state=need_state,
            backend=self.backend))

    def incoming_grad(self, st, do, first_rank):
        """c_r = d(sum_t <do_t, o_t>)/dS_in = sum_t scale (q_t * exp(b_t)) do_t^T (zeros on
        rank 0, whose c nobody reads: its initial state's gradient comes from the op)."""
        q, g = st.leaves[0], st.leaves[3]
        if first_rank:
            B, _, H, K = q.shape
            return torch.zeros(B, H, K, self.V, dtype=state_dtype(q), device=q.device)
        with torch.no_grad():
            c, _ = self._sum(q.detach(), do, None if g is None else g.detach(), reverse=False)
        return c * self.scale

    def before_grads(self, st, do):
        pass

    def grads(self, st, do, dS, targets):
        return _grads_from_state(st, do, dS, targets)


def _run_from_state(st, S_in, s0_grad, call):
    """(o detached) of call(s_leaf) -> (o, S_out), the op on the slice from S_in with autograd,
    s_leaf a leaf of S_in that needs a gradient with s0_grad (rank 0's initial state)."""
    st.s_leaf = None if S_in is None else S_in.detach().requires_grad_(s0_grad)
    with torch.enable_grad():
        st.o, st.S_out = call(st.s_leaf)
    return st.o.detach()


def _grads_from_state(st, do, dS, targets):
    """Gradients of targets (and dS_in, of rank 0's initial state) from (do, dS_out) through
    the op _run_from_state ran."""
    outs, cots = [st.o], [do]
    if dS is not None and st.S_out is not None:
        outs.append(st.S_out)
        cots.append(dS.to(st.S_out.dtype))
    want = list(targets)
    if st.s_leaf is not None and st.s_leaf.requires_grad:
        want.append(st.s_leaf)
    got = torch.autograd.grad(outs, want, cots, allow_unused=True) if want else []
    dS_in = got[-1] if len(want) > len(targets) else None
    return list(got[: len(targets)]), dS_in


class _DeltaRuleKind(_Kind):
    """(Gated) delta rule: M_r dense [B, H, K, K], payload [B, H, K, K + V] = [M_r | E_r].

    form="once": the op runs once per rank, with autograd, on v' = [0 | v] from [I | 0] (see
    the module docstring); when K + V > fuse_dim the two halves are two op calls. The other
    forms subclass it."""

    def __init__(self, scale, backend, V, sums="auto", fuse_dim=MAX_HEAD_DIM):
        self.scale, self.backend, self.V, self.sums, self.fuse_dim = scale, backend, V, sums, fuse_dim

    def _op(self, q, k, v, beta, g, S0):
        return _api.delta_rule(q, k, v, beta, g, scale=self.scale, initial_state=S0,
                               output_final_state=True, backend=self.backend)

    def _start(self, leaves):
        """(the rank's _Local, I [B, H, K, K] and zeros [B, T, H, K] in the state's and v's
        dtypes, (B, T, H, K, V), the state dtype): what both forms' v' = [0 | v] from [I | .]
        start from."""
        q, k, v, beta, g = leaves
        B, T, H, K = q.shape
        sdt = state_dtype(q)
        eye = torch.eye(K, dtype=sdt, device=q.device).expand(B, H, K, K)
        zeros_v = torch.zeros(B, T, H, K, dtype=v.dtype, device=v.device)
        return _Local(leaves), eye, zeros_v, (B, T, H, K, self.V), sdt

    def local(self, leaves, S0, need_payload, first_rank=False, s0_grad=False):
        q, k, v, beta, g = leaves
        st, eye, zeros_v, (B, T, H, K, V), sdt = self._start(leaves)
        st.fused = K + V <= self.fuse_dim
        with torch.enable_grad():
            if st.fused:
                h0 = torch.cat([eye, torch.zeros(B, H, K, V, dtype=sdt, device=q.device)], dim=-1)
                o2, s2 = self._op(q, k, torch.cat([zeros_v, v], dim=-1), beta, g, h0)
                st.outs = [o2, s2]                          # [B, T, H, K + V], [B, H, K, K + V]
                st.o_t, st.o_0, st.M, E = o2[..., :K], o2[..., K:], s2[..., :K], s2[..., K:]
            else:
                st.o_t, st.M = self._op(q, k, zeros_v, beta, g, eye.contiguous())
                st.o_0, E = self._op(q, k, v, beta, g, None)
                st.outs = [st.o_t, st.M, st.o_0, E]
        with torch.no_grad():
            M, E = st.M.detach().to(sdt), E.detach().to(sdt)
            if S0 is not None:
                E = M @ S0.to(sdt) + E
            st.payload = torch.cat([M, E], dim=-1)
        return st

    def apply(self, p, S):
        K = p.shape[-1] - self.V
        return p[..., :K] @ S + p[..., K:]

    def apply_transposed(self, p, dS):
        K = p.shape[-1] - self.V
        return p[..., :K].transpose(-1, -2) @ dS

    def output(self, st, S_in, s0_grad, need_state):
        """o = o_0 + o~ S_in (o~ [B, T, H, K] and S_in [B, H, K, V] in the inputs' dtype)."""
        st.S_in, st.s0_grad = S_in, s0_grad
        with torch.no_grad():
            o0 = st.o_0.detach()
            if S_in is None:
                return o0.contiguous()
            o_t = st.o_t.detach()
            corr = torch.einsum("bthk,bhkv->bthv", o_t, S_in.to(o_t.dtype))  # [B, H, T, V] in memory
            return torch.add(o0, corr, out=torch.empty(o0.shape, dtype=o0.dtype, device=o0.device))

    def incoming_grad(self, st, do, first_rank):
        """c_r = sum_t o~_t do_t^T (zeros on rank 0 unless its initial state needs a gradient)."""
        with torch.no_grad():
            o_t = st.o_t.detach()
            if first_rank and not st.s0_grad:
                B, _, H, K = o_t.shape
                return torch.zeros(B, H, K, self.V, dtype=state_dtype(o_t), device=o_t.device)
            if _sums_impl(self.sums, self.backend, o_t) == "triton":
                return _outer_sum_triton(o_t, do, None, False)[0].to(state_dtype(o_t))
            c, _ = weighted_outer_sum(o_t, do, None, reverse=False, dtype=state_dtype(o_t))
        return c

    def before_grads(self, st, do):
        """do S_in^T, the cotangent of o~ (needs no communication: runs while the gather does)."""
        st.do_t = None
        if st.S_in is not None:
            with torch.no_grad():
                st.do_t = torch.einsum("bthv,bhkv->bthk", do, st.S_in.to(do.dtype))

    def grads(self, st, do, dS, targets):
        q = st.leaves[0]
        B, _, H, K = q.shape
        d_ot = st.do_t if st.do_t is not None else torch.zeros_like(st.o_t)
        dM = None
        if dS is not None:
            dM = (dS @ st.S_in.to(dS.dtype).transpose(-1, -2) if st.S_in is not None
                  else torch.zeros(B, H, K, K, dtype=dS.dtype, device=dS.device))
        if st.fused:
            outs, cots = [st.outs[0]], [torch.cat([d_ot, do.to(d_ot.dtype)], dim=-1)]
            if dS is not None:
                outs.append(st.outs[1])
                cots.append(torch.cat([dM, dS], dim=-1).to(st.outs[1].dtype))
        else:
            outs, cots = [st.outs[0], st.outs[2]], [d_ot, do]
            if dS is not None:
                outs += [st.outs[1], st.outs[3]]
                cots += [dM.to(st.outs[1].dtype), dS.to(st.outs[3].dtype)]
        got = torch.autograd.grad(outs, list(targets), cots, allow_unused=True) if targets else []
        dS_in = None
        if st.s0_grad:  # rank 0's initial state: dS_in = c_0 + M^T dS_out
            dS_in = st.c if dS is None else st.c + st.M.detach().to(dS.dtype).transpose(-1, -2) @ dS
        return list(got), dS_in


class _DeltaRuleTwiceKind(_DeltaRuleKind):
    """The delta rule in two op calls per rank: a forward without autograd on v' = [0 | v]
    from [I | S0] for (M_r, E_r) and o~, then the op with autograd on v from S_in (the
    single-GPU op's own handling of the incoming state). form="twice" of delta_rule_on."""

    def local(self, leaves, S0, need_payload, first_rank=False, s0_grad=False):
        q, k, v, beta, g = leaves
        st, eye, zeros_v, (B, T, H, K, V), sdt = self._start(leaves)
        with torch.no_grad():
            q, k, v, beta = q.detach(), k.detach(), v.detach(), beta.detach()
            g = None if g is None else g.detach()
            S0_part = torch.zeros(B, H, K, V, dtype=sdt, device=q.device) if S0 is None else S0.to(sdt)
            if K + V <= self.fuse_dim:
                o2, s2 = self._op(q, k, torch.cat([zeros_v, v], dim=-1), beta, g,
                                  torch.cat([eye, S0_part], dim=-1))
                st.o_t, st.M = o2[..., :K], s2[..., :K]
                st.payload = s2.to(sdt)
            else:
                st.o_t, st.M = self._op(q, k, zeros_v, beta, g, eye.contiguous())
                _, E = self._op(q, k, v, beta, g, None if S0 is None else S0_part)
                st.payload = torch.cat([st.M.to(sdt), E.to(sdt)], dim=-1)
        return st

    def output(self, st, S_in, s0_grad, need_state):
        st.s0_grad = s0_grad
        q, k, v, beta, g = st.leaves
        return _run_from_state(st, S_in, s0_grad, lambda s_leaf: _api.delta_rule(
            q, k, v, beta, g, scale=self.scale, initial_state=s_leaf,
            output_final_state=need_state, backend=self.backend))

    def before_grads(self, st, do):
        pass

    def grads(self, st, do, dS, targets):
        return _grads_from_state(st, do, dS, targets)


class _SideStream:
    """A second CUDA stream for a rank's work that needs no communication and no incoming
    state, so that it runs on the GPU alongside the stream's own work (at B = 1 a state scan
    has a program per (head, V block) only, and two scans side by side take little more
    than one). Off CUDA, run() is the current stream and join() does nothing.

    Ordering: run() starts after everything the current stream has queued (the side work
    reads its tensors), and join() makes the current stream wait for the side work, so that
    the side stream's tensors are complete, and memory the current stream frees later is not
    still read there. Tensors made on the side stream are returned to its pool when freed,
    which later side work only reuses after run()'s wait."""

    _streams: dict = {}  # device index -> the side stream (created once)

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pending = False
        if self.cuda:
            self.main = torch.cuda.current_stream(device)
            key = device.index if device.index is not None else torch.cuda.current_device()
            if key not in self._streams:
                self._streams[key] = torch.cuda.Stream(device)
            self.side = self._streams[key]

    @contextlib.contextmanager
    def run(self):
        if not self.cuda:
            yield
            return
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            yield
        self.pending = True

    def join(self):
        if self.pending:
            self.main.wait_stream(self.side)
            self.pending = False


class _DeltaPasses:
    """The delta rule's passes over one rank's slice (inputs detached): the transition pass,
    the states-only pass and the op. On the Triton kernels (float32 / 16-bit inputs) they
    share one prep launch (linattn.ops.triton.delta_api.prepare) and the states-only pass
    skips the output kernel; elsewhere each is a call of the backend's op."""

    def __init__(self, kind, q, k, beta, g):
        self.scale, self.backend = kind.scale, kind.backend
        self.q, self.k, self.beta, self.g = q, k, beta, g
        impl = _api._backend_module(kind.backend, q)
        self.prep = None
        if (getattr(impl, "__name__", "") == "linattn.ops.triton" and q.dtype != torch.float64
                and not torch.compiler.is_compiling()):
            from ..ops.triton import delta_api
            self._delta_api = delta_api
            with torch.no_grad():
                self.prep = delta_api.prepare(k, beta, g)
        self.side = _SideStream(q.device)

    def _op(self, v, S0, want_final, q=None, k=None, beta=None, g=None):
        q, k = (self.q if q is None else q), (self.k if k is None else k)
        beta, g = (self.beta if beta is None else beta), (self.g if g is None else g)
        if self.prep is not None:
            return self._delta_api.delta_rule(q, k, v, beta, g, scale=self.scale,
                                              initial_state=S0, output_final_state=want_final,
                                              prep=self.prep)
        return _api.delta_rule(q, k, v, beta, g, scale=self.scale, initial_state=S0,
                               output_final_state=want_final, backend=self.backend)

    def transitions(self, keep=False):
        """(o~ [B, T, H, K] in the inputs' dtype, M [B, H, K, K] in the state dtype, the
        pass's chunk states when keep on the Triton kernels, else None): the op without
        autograd on v = 0 from I (o~_t = scale P_t^T q_t, M = P_T)."""
        B, T, H, K = self.q.shape
        sdt = state_dtype(self.q)
        with torch.no_grad():
            eye = torch.eye(K, dtype=sdt, device=self.q.device).expand(B, H, K, K).contiguous()
            zeros = torch.zeros(B, T, H, K, dtype=self.q.dtype, device=self.q.device)
            if self.prep is None:
                o_t, M = self._op(zeros, eye, True)
                return o_t, M.to(sdt), None
            cs = self._delta_api.chunk_states(self.k, zeros, self.beta, prep=self.prep,
                                              initial_state=eye)
            o_t = self._delta_api.output(self.q, self.k, cs, prep=self.prep, scale=self.scale)
        return o_t, cs.final.to(sdt), (cs if keep else None)

    def states(self, v, S0, keep=False):
        """(the state after the slice from S0 (None: zeros), [B, H, K, V] in the state dtype;
        the pass's chunk states when keep on the Triton kernels, else None), without autograd
        and, on the Triton kernels, without the output kernel."""
        with torch.no_grad():
            if self.prep is None:
                return self._op(v, S0, True)[1].to(state_dtype(v)), None
            cs = self._delta_api.chunk_states(self.k, v, self.beta, prep=self.prep,
                                              initial_state=S0)
        return cs.final.to(state_dtype(v)), (cs if keep else None)

    def compose(self, cs_e, cs_t, S_in):
        """The chunk states of the scan on v from S_in, from the states-only pass's (from
        zero, cs_e) and the transition pass's (cs_t), by linearity in the incoming state:

            h_c = h_E,c + h~_c S_in,   U' = U'_E + U'~ S_in,   final = M S_in + E

        formed in place in cs_e's tensors (per sequence and head, one batched matmul over the
        chunks and one over the tokens, in the stored dtype with float32 accumulation)."""
        B, T, H, K = self.q.shape
        V = S_in.shape[-1]
        nc = -(-T // self._delta_api.delta_fwd.BT)  # chunks per sequence
        if cs_e.h.shape[0] != B * (nc + 1):
            raise ValueError(f"chunk states of {cs_e.h.shape[0]} slots for {B} x {nc} chunks")
        h_e, h_t = cs_e.h.view(B, nc + 1, H, K, V), cs_t.h.view(B, nc + 1, H, K, K)
        u_e, u_t = cs_e.vnew.view(B, T, H, V), cs_t.vnew.view(B, T, H, K)
        with torch.no_grad():
            S_h, S_u = S_in.to(h_e.dtype), S_in.to(u_e.dtype)
            for n in range(B):
                for hh in range(H):
                    h_e[n, :nc, hh].baddbmm_(h_t[n, :nc, hh], S_h[n, hh].expand(nc, K, V))
                    u_e[n, :, hh].addmm_(u_t[n, :, hh], S_u[n, hh])
            final = torch.matmul(cs_t.final, S_in.to(cs_t.final.dtype)) + cs_e.final
        return cs_e._replace(final=final)

    def op(self, leaves, S_in, want_final, states=None):
        """The op with autograd on the slice's leaves from S_in; with states (on the Triton
        kernels: the chunk states from S_in, compose) the output kernel alone."""
        q, k, v, beta, g = leaves
        if states is not None:
            return self._delta_api.delta_rule(q, k, v, beta, g, scale=self.scale,
                                              initial_state=S_in,
                                              output_final_state=want_final, prep=self.prep,
                                              states=states)
        return self._op(v, S_in, want_final, q, k, beta, g)


class _DeltaRuleStatesKind(_DeltaRuleKind):
    """form="states" of delta_rule_on (the default): per rank, only the passes its role needs,
    over one prep on the Triton kernels (the module docstring's table)."""

    def local(self, leaves, S0, need_payload, first_rank=False, s0_grad=False):
        q, k, v, beta, g = leaves
        st = _Local(leaves)
        st.o_t = st.cs_t = st.cs_e = None
        det = [None if x is None else x.detach() for x in leaves]
        st.passes = _DeltaPasses(self, det[0], det[1], det[3], det[4])
        if first_rank:  # the payload is its own op's final state (payload_from_output)
            return st
        if not need_payload:  # the last rank without a final state: o~ in overlap()
            B, _, H, K = q.shape
            st.payload = torch.zeros(B, H, K, K + self.V, dtype=state_dtype(q), device=q.device)
            return st
        # a middle rank: both passes, side by side, keeping their chunk states (Triton) to
        # form the op's from S_in (compose) instead of scanning again
        with st.passes.side.run():
            st.o_t, M, st.cs_t = st.passes.transitions(keep=True)
        E, st.cs_e = st.passes.states(det[2], None, keep=True)
        st.passes.side.join()
        st.payload = torch.cat([M, E], dim=-1)
        return st

    def overlap(self, st):
        if st.o_t is None:
            with st.passes.side.run():
                st.o_t, _, _ = st.passes.transitions()

    def output(self, st, S_in, s0_grad, need_state):
        st.s0_grad = s0_grad
        states = None
        if st.cs_e is not None and S_in is not None:
            states = st.passes.compose(st.cs_e, st.cs_t, S_in.to(st.cs_e.final.dtype))
        st.cs_e = st.cs_t = None
        o = _run_from_state(st, S_in, s0_grad,
                            lambda s_leaf: st.passes.op(st.leaves, s_leaf, need_state, states))
        st.passes.side.join()
        st.passes = None  # the op's backward keeps what it reads of prep
        return o

    def payload_from_output(self, st):
        E = st.S_out.detach().to(state_dtype(st.leaves[0]))
        B, H, K, _ = E.shape
        return torch.cat([torch.zeros(B, H, K, K, dtype=E.dtype, device=E.device), E], dim=-1)

    def incoming_grad(self, st, do, first_rank):
        """c_r = sum_t o~_t do_t^T; zeros on rank 0, whose c_0 nobody reads (its initial
        state's gradient comes from its op's backward)."""
        if first_rank:
            q = st.leaves[0]
            B, _, H, K = q.shape
            return torch.zeros(B, H, K, self.V, dtype=state_dtype(q), device=q.device)
        return super().incoming_grad(st, do, first_rank)

    def before_grads(self, st, do):
        pass

    def grads(self, st, do, dS, targets):
        return _grads_from_state(st, do, dS, targets)


# ----------------------------------------------------------------------------- autograd

class _LASP2(torch.autograd.Function):
    """One all-gather of per-rank (M_r, E_r) forward, one all-gather of (c_r, dfinal_r) backward,
    over the communicator comm (linattn.parallel.comm)."""

    @staticmethod
    def forward(ctx, kind, comm, want_final, S0, *args):
        rank, world = comm.rank, comm.world
        S0_used = S0 if rank == 0 else None
        needs = ctx.needs_input_grad[4:]
        leaves = [a.detach().requires_grad_(n) if a is not None else None for a, n in zip(args, needs)]
        s0_grad = S0_used is not None and ctx.needs_input_grad[3]
        need_state = rank < world - 1 or want_final
        st = kind.local(leaves, S0_used, need_payload=need_state, first_rank=rank == 0,
                        s0_grad=s0_grad)
        if st.payload is None:  # rank 0 sending its own op's final state: the op first
            o = kind.output(st, S0_used, s0_grad, need_state)
            st.payload = kind.payload_from_output(st)
            pays = comm.start_all_gather(st.payload).wait()
        elif rank == 0:  # its incoming state is S0 (or none): the op overlaps the gather
            pending = comm.start_all_gather(st.payload)  # [W, B, H, K, P] once waited for
            o = kind.output(st, S0_used, s0_grad, need_state)
            pays = pending.wait()
        else:
            pending = comm.start_all_gather(st.payload)
            kind.overlap(st)
            pays = pending.wait()
            with torch.no_grad():
                S_in = torch.zeros_like(st.payload[..., : kind.V])
                for j in range(rank):
                    S_in = kind.apply(pays[j], S_in)
            o = kind.output(st, S_in, s0_grad, need_state)
        final = None
        if want_final:
            with torch.no_grad():
                final = torch.zeros_like(st.payload[..., : kind.V])
                for j in range(world):
                    final = kind.apply(pays[j], final)

        ctx.kind, ctx.comm, ctx.want_final, ctx.st, ctx.pays = kind, comm, want_final, st, pays
        ctx.S0_like = None if S0 is None else (S0.shape, S0.dtype, S0.device)
        if final is None:
            final = st.payload.new_zeros(0)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        kind, comm, st, V = ctx.kind, ctx.comm, ctx.st, ctx.kind.V
        rank, world = comm.rank, comm.world
        st.c = c = kind.incoming_grad(st, do, first_rank=rank == 0)  # [B, H, K, V]
        with torch.no_grad():
            msg = torch.cat([c, dfinal.to(c.dtype)], dim=-1) if ctx.want_final else c
        pending = comm.start_all_gather(msg)
        kind.before_grads(st, do)  # local work that overlaps the gather
        targets = [x for x in st.leaves if x is not None and x.requires_grad]
        if rank == world - 1 and not ctx.want_final:  # nothing flows in: the op's backward overlaps the gather
            grads, dS_in = kind.grads(st, do, None, targets)
            pending.wait()
        else:
            got = pending.wait()  # [W, B, H, K, V or 2V]
            with torch.no_grad():
                dS = got[..., V:].sum(0) if ctx.want_final else None
                for j in range(world - 1, rank, -1):
                    dS = got[j, ..., :V] if dS is None else kind.apply_transposed(ctx.pays[j], dS) + got[j, ..., :V]
            grads, dS_in = kind.grads(st, do, dS, targets)
        by_id = {id(t): gr for t, gr in zip(targets, grads)}
        arg_grads = [None if x is None else by_id.get(id(x)) for x in st.leaves]
        dS0 = None
        if ctx.needs_input_grad[3]:
            dS0 = dS_in if rank == 0 else None
            shape, dtype, device = ctx.S0_like
            dS0 = torch.zeros(shape, dtype=dtype, device=device) if dS0 is None else dS0.to(dtype)
        ctx.st = None
        return (None, None, None, dS0, *arg_grads)


# ----------------------------------------------------------------------------- public API

def _check_common(comm, backend, sums, q, v, initial_state):
    if not hasattr(comm, "start_all_gather"):
        raise TypeError(f"comm must be a communicator (linattn.parallel.comm.ProcessGroupComm or "
                        f"LoopbackComm), got {type(comm).__name__}")
    if backend not in _api.BACKENDS:
        raise ValueError(f"backend must be one of {_api.BACKENDS}, got {backend!r}")
    if sums not in SUMS:
        raise ValueError(f"sums must be one of {SUMS}, got {sums!r}")
    if sums == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("sums='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         f"triton is imported); q is on {q.device}")
    if initial_state is not None:
        B, _, H, K = q.shape
        _api._check_state("initial_state", initial_state, q, (B, H, K, v.shape[-1]), "[B, H, K, V]")


def _run(kind, comm, initial_state, output_final_state, args, single):
    if comm.world == 1:
        return single()
    o, final = _LASP2.apply(kind, comm, bool(output_final_state), initial_state, *args)
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
    return linear_attention_on(ProcessGroupComm(group), q, k, v, g, scale=scale,
                               initial_state=initial_state,
                               output_final_state=output_final_state, backend=backend)


def linear_attention_on(comm, q, k, v, g=None, *, scale=None, initial_state=None,
                        output_final_state=False, backend="auto", sums="auto"):
    """linear_attention over a communicator (ProcessGroupComm, LoopbackComm): the rank and the
    group are comm's. sums: how the passes over time run, "auto" (the Triton kernel where the
    op runs on Triton), "triton" or "torch" (chunked PyTorch). Other arguments: as
    linear_attention."""
    _api._check_qkv(q, k, v)
    B, T, H, K = q.shape
    scale = _api._check_scale(scale, K)
    _api._check_log_decay(g, q)
    _check_common(comm, backend, sums, q, v, initial_state)
    kind = _LinearAttentionKind(scale, backend, v.shape[-1], sums)
    return _run(kind, comm, initial_state, output_final_state, (q, k, v, g),
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
    Local work (delta_rule_on's form="states"): besides the single-GPU op on v from the
    incoming state, a transition pass on v = 0 (K columns; not on rank 0) and a states-only
    pass (no outputs; not on rank 0 nor, without a final state, on the last rank).
    """
    return delta_rule_on(ProcessGroupComm(group), q, k, v, beta, g, scale=scale,
                         initial_state=initial_state, output_final_state=output_final_state,
                         backend=backend)


def delta_rule_on(comm, q, k, v, beta, g=None, *, scale=None, initial_state=None,
                  output_final_state=False, backend="auto", sums="auto", fuse_dim=MAX_HEAD_DIM,
                  form="states"):
    """delta_rule over a communicator (see linear_attention_on). form: "states" (the default:
    per rank only the passes its role needs, a states-only pass for E_r and the transition
    pass on v = 0 for (o~, M_r), then the op from S_in, over one prep on the Triton kernels),
    "twice" (a forward on v' = [0 | v] without autograd, then the op on v from S_in with
    autograd) or "once" (the op once on v' with autograd); see the module docstring.
    fuse_dim ("twice", "once"): the widest K + V run as one op call on v' (above it: two
    calls)."""
    if form not in DELTA_FORMS:
        raise ValueError(f"form must be one of {DELTA_FORMS}, got {form!r}")
    _api._check_qkv(q, k, v)
    B, T, H, K = q.shape
    scale = _api._check_scale(scale, K)
    _api._check_step_gate("beta", beta, q)
    _api._check_log_decay(g, q, allowed=("none", "scalar"))
    _check_common(comm, backend, sums, q, v, initial_state)
    kind = {"states": _DeltaRuleStatesKind, "twice": _DeltaRuleTwiceKind,
            "once": _DeltaRuleKind}[form](scale, backend, v.shape[-1], sums, fuse_dim)
    return _run(kind, comm, initial_state, output_final_state, (q, k, v, beta, g),
                lambda: _api.delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                        output_final_state=output_final_state, backend=backend))
