"""Mixture-of-Memories (MoM, Du et al., 2025): several memory states, tokens routed to top-k.

A router sends each token to its top-k of M memories; each memory is a Gated DeltaNet (or
DeltaNet, or GLA) recurrence with its own key/value/beta/gate projections, updated only by
the tokens routed to it; an optional shared memory sees every token. The read-outs mix by
the router weights:

    p_t = softmax(x_t W_r)                           [M] router probabilities (no noise)
    I_t = top-k(p_t),  w_tm = p_tm / sum_{m' in I_t} p_tm'    for m in I_t
    for each memory m, over the tokens routed to it (t in order; the short conv and the
    recurrence see only those tokens):
        q, k, v = silu(shortconv_m(x W_q, x W_k^m, x W_v^m));  q, k = l2norm(q), l2norm(k)
        beta = sigmoid(x W_b^m + b_b^m);  g = -exp(A_log) softplus(x W_a^m + dt_bias)
        S^m_t = exp(g) (I - beta k k^T) S^m_{t-1} + beta k v^T,   o^m_t = S^m_t^T q / sqrt(K)
    o_t = sum_{m in I_t} w_tm o^m_t + o^shared_t     (the shared memory: every token, weight 1)
    y_t = W_o (rmsnorm(o_t) * silu(x_t W_z))

As in the paper's code, W_q, the short conv's weights, A_log and dt_bias are shared by the
memories (the conv runs along each memory's own token sequence, with its own cache), and
k, v, beta and the gate have one projection per memory.

How it runs: the (token, memory) pairs are permuted into packed per-memory sequences,
ordered by (sequence, memory, time), and the op (linattn.delta_rule / linear_attention)
runs ONCE over all of them with cu_seqlens; the outputs are permuted back and mixed. The
per-memory projections are computed for every token and memory as one matmul and the
routed pairs gathered from it (M / top_k times the needed projection FLOPs, but no host
sync and one GEMM); every gather and scatter is a permutation or a gather of distinct
indices, so forward and backward stay deterministic.

Decoding: a short call (1 <= T <= linattn.ops.api.STEP_KERNEL_MAX_T tokens, no cu_seqlens)
with no gradient to record runs every (row, memory) pair as one lane of a batch of B*M' lanes
instead: lane (b, m) holds the tokens of row b routed to m, in time order, then padding
slots. The short conv runs on the lanes through its cache path (each lane's new cache is
the last W-1 of its old cache and its routed tokens, one gather), and the op runs ONCE over
[B*M', T, H, ...] without cu_seqlens, which the Triton backend serves with its fused step
kernel (linattn.ops.decode), as every other mixer decodes. A padding slot is an exact
identity step (beta = 0 and g = 0; for GLA k = 0 and g = 0), so a memory no token was
routed to keeps its state. The lanes are the state's own [B*M'] rows, read once and
written once by the kernel. Gathering only the S chosen states into a batch of B*S and
scattering the new ones back would not move fewer bytes: the returned state is a new
tensor, so every one of the M' states is read and written anyway, and the gather and
scatter would add 4S state copies per row. The step on the M' - S unchosen lanes costs
that same read and write, no more, since the step is bound by memory traffic. Each pair's
read-out is then gathered from its lane and slot and mixed as above. The tokens of one call
may route differently, and the lanes carry them all in one op call with no loop over tokens.
Longer calls, calls with cu_seqlens and calls that record gradients take the packed path,
unless the layer was built with layout="lanes": then every call without cu_seqlens takes the
lanes, training included. The trade: the packed path reads the per-memory sequence lengths on
the host (one device-to-host sync per layer and call, and a new chunk layout copied to the
device, since the router changes them every batch), which a CUDA graph cannot capture; the
lanes have static shapes (B*M' lanes of T slots), no sync, and capture under
torch.compile(mode="reduce-overhead"), at the price of running the op (and the conv) over
M' / S times the pairs (padding slots included: 5 / 3 at the defaults). The results are the
same either way (tests/layers/test_mom.py compares them, gradients included). With
save_for_backward="recompute" the lanes recompute the op's chunk states but keep q, k, v: the
packed path's one node of conv and op (which keeps only the conv's input) is not used there.

Load balancing: after each forward, `self.aux_loss` holds the Switch-Transformer loss over
the call's tokens, M * sum_m f_m P_m with f_m the fraction of the top-k assignments that
went to memory m and P_m the mean router probability of m (1 at perfect balance); the
trainer adds it times TrainConfig.aux_loss_coef.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.api import STEP_KERNEL_MAX_T, delta_rule, linear_attention
from .base import Mixer, gate_dtype, make_dims, projection_input
from .deltanet import mamba2_decay_params, mamba2_log_decay
from .norms import GatedOutputNorm
from .short_conv import ShortConv

RECURRENCES = ("gated_deltanet", "deltanet", "gla")
LAYOUTS = ("packed", "lanes")  # how calls without cu_seqlens run (module docstring)


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, num_memories: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss.

    probs: [N, M] router probabilities (float32/float64); chosen: [N, k] int64 top-k indices.
    Returns the scalar M * sum_m f_m P_m, f_m = (assignments to m) / (N k), P_m = mean_n p_nm.
    """
    N, k = chosen.shape
    # assignments per memory, [M]: a comparison sum, as bincount reads its input's max on the
    # host (a device sync that CUDA graphs cannot capture)
    memories = torch.arange(num_memories, device=chosen.device)
    counts = (chosen.reshape(-1, 1) == memories).sum(0).to(probs.dtype)
    f = counts / max(N * k, 1)
    P = probs.mean(0) if N else probs.new_zeros(num_memories)
    return num_memories * (f * P).sum()


def routing_plan(mem: torch.Tensor, B: int, T: int, n_mem: int, cu_seqlens):
    """Where each (token, slot) pair goes in the packed per-memory sequences.

    mem: [B*T, S] int64 memory of each token's S slots (distinct within a token).
    Returns (perm [P], inv [P], cu [R*n_mem + 1] int32, R) with P = B*T*S: pair p (token
    p // S, slot p % S) sits at position inv[p] of the packed stream, perm = inv^-1; the
    stream is ordered by (row, memory, time), sequence n = row * n_mem + memory, with R the
    rows: B, or the N packed sequences of cu_seqlens.
    """
    dev = mem.device
    BT, S = mem.shape
    tok = torch.arange(BT, device=dev)
    if cu_seqlens is None:
        R, row = B, tok // max(T, 1)
    else:
        cu = cu_seqlens.to(device=dev, dtype=torch.long)
        R = cu.numel() - 1
        row = torch.repeat_interleave(torch.arange(R, device=dev), cu[1:] - cu[:-1], output_size=BT)
    seq = (row[:, None] * n_mem + mem).reshape(-1)                       # [P] packed sequence id
    key = seq * BT + tok.repeat_interleave(S)                            # unique: (seq, time)
    perm = torch.argsort(key)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=dev)
    counts = torch.bincount(seq, minlength=R * n_mem)
    cu_out = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return perm, inv, cu_out, R


class MixtureOfMemories(Mixer):
    """MoM's token mixer; see the module docstring for the math.

    Args:
        d_model, n_heads, backend, layer_idx, n_layers: see Mixer.
        num_memories: M routed memories (4).
        top_k: memories per token (2), 1 <= top_k <= M.
        shared_memory: add the memory every token updates (True).
        recurrence: "gated_deltanet" (default), "deltanet" or "gla" (per-key decay
            logsigmoid(x W_gk^m + b) / 16, no beta, no key normalisation).
        expand_v: V = head_dim * expand_v (1); K = head_dim.
        conv_size: the short conv's kernel (4).
        layout: "packed" (default): calls run the routed pairs as packed per-memory sequences
            (short gradient-free calls excepted); "lanes": every call without cu_seqlens runs
            the B*M' (row, memory) lanes, static shapes for CUDA graphs (module docstring).

    forward: as in linattn.layers.base. The state is the dict {"S": [R, M', H, K, V] float32
    per-memory states, "conv": [R, M', conv_size-1, 2HK+HV] per-memory conv caches}, R = B
    (N with cu_seqlens), M' = M (+1 for the shared memory, last). A memory no token of a call
    was routed to keeps its state. Sequence parallelism is not supported (ValueError).
    After every forward, `aux_loss` is the load-balancing loss (a scalar tensor).
    Compiles with torch.compile's default mode; CUDA graphs ("reduce-overhead") are refused
    with layout "packed" (cuda_graphs_refused says why) and run with layout "lanes".
    """

    cuda_graphs_refused = (
        "mom routes tokens into packed per-memory sequences whose lengths the router decides "
        "batch by batch; the op reads those lengths on the host to lay out its chunks, which a "
        "CUDA graph cannot replay. Compile it with mode 'default', or build it with "
        "layout='lanes' (mixer_options {\"mom\": {\"layout\": \"lanes\"}})")

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, save_for_backward: str = "states",
                 num_memories: int = 4, top_k: int = 2, shared_memory: bool = True,
                 recurrence: str = "gated_deltanet", expand_v: float = 1.0, conv_size: int = 4,
                 layout: str = "packed"):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers,
                         save_for_backward=save_for_backward)
        if isinstance(num_memories, bool) or not isinstance(num_memories, int) or num_memories < 1:
            raise ValueError(f"num_memories must be a positive int, got {num_memories!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_memories:
            raise ValueError(f"top_k must be an int in [1, num_memories={num_memories}], got {top_k!r}")
        if recurrence not in RECURRENCES:
            raise ValueError(f"recurrence must be one of {RECURRENCES}, got {recurrence!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.num_memories, self.top_k, self.layout = num_memories, top_k, layout
        if layout == "lanes":
            self.cuda_graphs_refused = None  # static shapes, no host sync
        self.shared_memory, self.recurrence = bool(shared_memory), recurrence
        self.n_mem = num_memories + self.shared_memory  # memories with a state
        self.key_dim = self.head_dim
        self.value_dim = make_dims(self.head_dim, expand_v, "expand_v")
        H, n = n_heads, self.n_mem
        HK, HV = H * self.key_dim, H * self.value_dim
        self.router = nn.Linear(d_model, num_memories, bias=False)
        self.q_proj = nn.Linear(d_model, HK, bias=False)
        self.k_proj = nn.Linear(d_model, n * HK, bias=False)  # memory m: columns [m HK, (m+1) HK)
        self.v_proj = nn.Linear(d_model, n * HV, bias=False)
        # the delta rules' q and k: L2-normalised per head of K channels inside the conv
        nc = 2 * HK if recurrence != "gla" else 0
        self.conv = ShortConv(2 * HK + HV, conv_size, activation="silu", norm_channels=nc,
                              norm_group=self.key_dim)
        if recurrence == "gla":
            self.gk_proj = nn.Linear(d_model, n * HK, bias=True)
        else:
            self.b_proj = nn.Linear(d_model, n * H, bias=True)
            with torch.no_grad():
                self.b_proj.bias.zero_()
            if recurrence == "gated_deltanet":
                self.a_proj = nn.Linear(d_model, n * H, bias=False)
                self.A_log, self.dt_bias = mamba2_decay_params(H)
        self.z_proj = nn.Linear(d_model, HV, bias=False)
        self.out_norm = GatedOutputNorm(self.value_dim, activation="silu")
        self.o_proj = nn.Linear(HV, d_model, bias=False)
        self.aux_loss = None

    def __getstate__(self):
        """Copies and pickles leave out the last forward's aux_loss (a tensor in its graph)."""
        state = dict(super().__getstate__())
        state["aux_loss"] = None
        return state

    def check_sequence_parallel(self, sp) -> None:
        super().check_sequence_parallel(sp)
        if sp is not None:
            raise ValueError("mom (Mixture-of-Memories) cannot run sequence-parallel: its per-memory "
                             "sequences are routed token subsets; call set_sequence_parallel(None)")

    def route(self, x: torch.Tensor, x_proj: torch.Tensor | None = None):
        """Router of x [B, T, d]: (probs [B*T, M], memory of each slot [B*T, S] int64, weight
        of each slot [B*T, S]) in the gate dtype, S = top_k (+1: the shared memory, weight 1).
        x_proj: x as the router projection takes it (projection_input), x by default."""
        logits = self.router(x if x_proj is None else x_proj)
        probs = torch.softmax(logits.to(gate_dtype(x)), dim=-1).flatten(0, 1)  # [BT, M]
        w, mem = probs.topk(self.top_k, dim=-1)                               # [BT, k]
        w = w / w.sum(-1, keepdim=True)
        if self.shared_memory:
            mem = torch.cat([mem, mem.new_full((mem.shape[0], 1), self.num_memories)], 1)
            w = torch.cat([w, w.new_ones(w.shape[0], 1)], 1)
        return probs, mem, w

    def _state_in(self, state, R: int):
        if state is None:
            return None, None
        H, K, V = self.n_heads, self.key_dim, self.value_dim
        want_S = (R, self.n_mem, H, K, V)
        want_c = (R, self.n_mem, self.conv.kernel_size - 1, self.conv.channels)
        if not isinstance(state, dict) or set(state) != {"S", "conv"}:
            raise ValueError('mom state must be the dict {"S", "conv"} a previous call returned')
        if tuple(state["S"].shape) != want_S or tuple(state["conv"].shape) != want_c:
            raise ValueError(f"mom state: S must be {want_S} and conv {want_c} (R = B, or N with "
                             f"cu_seqlens), got {tuple(state['S'].shape)} and {tuple(state['conv'].shape)}")
        return state["S"].flatten(0, 1), state["conv"].flatten(0, 1)

    def _runs_in_lanes(self, x, state, cu_seqlens) -> bool:
        """Calls without cu_seqlens take the lanes with layout "lanes"; with "packed" only the
        short, gradient-free ones (the step kernel's decoding)."""
        if cu_seqlens is not None or x.shape[1] < 1:
            return False
        if self.layout == "lanes":
            return True
        if x.shape[1] > STEP_KERNEL_MAX_T:
            return False
        if not torch.is_grad_enabled():
            return True
        given = list(state.values()) if isinstance(state, dict) else []
        return not any(isinstance(t, torch.Tensor) and t.requires_grad
                       for t in [x, *given, *self.parameters()])

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        B, T, _ = x.shape
        H, V = self.n_heads, self.value_dim
        xin = projection_input(x)  # the projections share one autocast copy of x
        probs, mem, w = self.route(x, xin())                              # [BT, M], [BT, S], [BT, S]
        self.aux_loss = load_balancing_loss(probs, mem[:, :self.top_k], self.num_memories)
        run = self._lanes if self._runs_in_lanes(x, state, cu_seqlens) else self._packed
        o, new_state = run(x, xin, mem, state, cu_seqlens, return_state)  # o: [BT, S, H, V]
        o = (o * w.to(o.dtype)[:, :, None, None]).sum(1).view(B, T, H, V)
        y = self.gated_output(o, xin, self.z_proj)
        return y, new_state

    def _packed(self, x, xin, mem, state, cu_seqlens, return_state):
        """The (token, memory) pairs as packed per-memory sequences, one op call with
        cu_seqlens. Returns (each pair's read-out [BT, S, H, V], the new state or None)."""
        B, T, _ = x.shape
        H, K, V, n = self.n_heads, self.key_dim, self.value_dim, self.n_mem
        gdt = gate_dtype(x)
        BT, S = mem.shape
        with torch.no_grad():
            perm, inv, cu, R = routing_plan(mem, B, T, n, cu_seqlens)
        S0, conv0 = self._state_in(state, R)

        def per_memory(proj, width):
            """[BT, S, width]: proj's block of each slot's memory (distinct indices)."""
            out = proj(xin()).view(BT, n, width)
            return out.gather(1, mem[:, :, None].expand(BT, S, width))

        q = self.q_proj(xin()).view(BT, 1, H * K).expand(BT, S, H * K)
        qkv = torch.cat([q, per_memory(self.k_proj, H * K), per_memory(self.v_proj, H * V)], -1)
        packed = qkv.reshape(BT * S, qkv.shape[-1])[perm][None]                # [1, P, 2HK + HV]

        def gate(proj, width):
            """[1, P, width] packed per-memory gate pre-activations in the gate dtype."""
            return per_memory(proj, width).reshape(BT * S, width)[perm][None].to(gdt)

        if self.recurrence != "gla":
            beta = torch.sigmoid(gate(self.b_proj, H))                    # [1, P, H]
            g = None
            if self.recurrence == "gated_deltanet":
                g = mamba2_log_decay(gate(self.a_proj, H), self.A_log, self.dt_bias)
        if self.recurrence != "gla" and self.save_for_backward == "recompute":
            # the conv and the op as one node that keeps the conv's input, not q, k, v
            o, S_new, conv_state = self.conv.delta_rule(
                packed, beta, g, heads=H, key_dim=K, value_dim=V, cache=conv0, cu_seqlens=cu,
                return_cache=return_state, initial_state=S0, output_final_state=return_state,
                backend=self.backend)
            return self._unpacked(o, S_new, conv_state, inv, BT, S, R, return_state)
        packed, conv_state = self.conv(packed, conv0, cu, return_cache=return_state)
        q, k, v = packed.split([H * K, H * K, H * V], dim=-1)
        q, k, v = q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V))
        if self.recurrence == "gla":
            g = (F.logsigmoid(gate(self.gk_proj, H * K)) / 16.0).unflatten(-1, (H, K))
            o, S_new = linear_attention(q, k, v, g, initial_state=S0, output_final_state=return_state,
                                        cu_seqlens=cu, backend=self.backend,
                                        save_for_backward=self.save_for_backward)
        else:
            o, S_new = delta_rule(q, k, v, beta, g, initial_state=S0, output_final_state=return_state,
                                  cu_seqlens=cu, backend=self.backend,
                                  save_for_backward=self.save_for_backward)
        return self._unpacked(o, S_new, conv_state, inv, BT, S, R, return_state)

    def _unpacked(self, o, S_new, conv_state, inv, BT, S, R, return_state):
        """_packed's results from the op's on the packed stream: (each pair's read-out
        [BT, S, H, V], the new state or None)."""
        o = o[0][inv].view(BT, S, self.n_heads, self.value_dim)          # back to (token, slot)
        if not return_state:
            return o, None
        n = self.n_mem
        return o, {"S": S_new.unflatten(0, (R, n)), "conv": conv_state.unflatten(0, (R, n))}

    def _lanes(self, x, xin, mem, state, cu_seqlens, return_state):
        """Every (row, memory) pair as one lane of a [B*M'] batch, one op call without
        cu_seqlens (short calls: the step kernel on Triton); see the module docstring. Called
        only with cu_seqlens None (the argument keeps _packed's signature). Returns (each
        pair's read-out [BT, S, H, V], the new state or None)."""
        B, T, _ = x.shape
        H, K, V, n = self.n_heads, self.key_dim, self.value_dim, self.n_mem
        HK, HV, W = H * K, H * V, self.conv.kernel_size
        gdt = gate_dtype(x)
        BT, S = mem.shape
        S0, conv0 = self._state_in(state, B)                              # [B M', H, K, V], [B M', W-1, C]
        routed = torch.zeros(BT, n, dtype=torch.bool, device=x.device).scatter_(1, mem, True)
        routed = routed.view(B, T, n)                                     # token (b, t) updates memory m
        if T == 1:
            order, keep = None, routed                                    # one slot: the token, or padding
            slot = torch.zeros_like(mem)                                  # [BT, S] each pair's slot
        else:
            # lane (b, m)'s slot j holds token order[b, j, m]: its routed tokens first, in time order
            order = torch.sort((~routed).to(torch.int8), dim=1, stable=True).indices   # [B, T, n]
            keep = routed.gather(1, order)                                # slot j holds a routed token
            slot = (routed.cumsum(1) - 1).view(BT, n).gather(1, mem)      # [BT, S]

        def lanes(t):
            """[B, T, n, c] per (token, memory) -> [B n, T, c], each lane in slot order."""
            if order is not None:
                t = t.gather(1, order[..., None].expand_as(t))
            return t.transpose(1, 2).reshape(B * n, T, t.shape[-1])

        def gate(proj, width):
            """[B n, T, width] per-lane gate pre-activations in the gate dtype."""
            return lanes(proj(xin()).view(B, T, n, width).to(gdt))

        q = self.q_proj(xin()).view(B, T, 1, HK).expand(B, T, n, HK)
        qkv = torch.cat([q, self.k_proj(xin()).view(B, T, n, HK), self.v_proj(xin()).view(B, T, n, HV)], -1)
        qkv = lanes(qkv)                                                  # [B n, T, 2HK + HV]
        conved, _ = self.conv(qkv, conv0)                                 # [B n, T, 2HK + HV]
        q, k, v = conved.split([HK, HK, HV], dim=-1)
        q, k, v = q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V))
        real = keep.transpose(1, 2).reshape(B * n, T, 1)                  # [B n, T, 1] slot holds a token
        if self.recurrence == "gla":
            g = (F.logsigmoid(gate(self.gk_proj, HK)) / 16.0).unflatten(-1, (H, K))
            g = torch.where(real[..., None], g, 0.0)                      # [B n, T, H, K]
            k = torch.where(real[..., None], k, 0.0)                      # padding: S <- S exp(0) + 0 v^T
            o, S_new = linear_attention(q, k, v, g, initial_state=S0, output_final_state=return_state,
                                        backend=self.backend,
                                        save_for_backward=self.save_for_backward)
        else:
            beta = torch.where(real, torch.sigmoid(gate(self.b_proj, H)), 0.0)    # padding: beta = 0
            g = None
            if self.recurrence == "gated_deltanet":
                g = torch.where(real, mamba2_log_decay(gate(self.a_proj, H), self.A_log, self.dt_bias), 0.0)
            o, S_new = delta_rule(q, k, v, beta, g, initial_state=S0, output_final_state=return_state,
                                  backend=self.backend, save_for_backward=self.save_for_backward)
        row = torch.arange(B, device=x.device).repeat_interleave(T)[:, None]  # [BT, 1]
        o = o.reshape(B * n * T, H, V)[(((row * n + mem) * T) + slot).view(-1)].view(BT, S, H, V)
        if not return_state:
            return o, None
        # each lane's new cache: the last W-1 of (its cache, its routed tokens)
        prev = conv0.to(qkv.dtype) if conv0 is not None else qkv.new_zeros(B * n, W - 1, qkv.shape[-1])
        last = keep.sum(1).view(B * n, 1) + torch.arange(W - 1, device=x.device)    # [B n, W-1]
        conv_new = torch.cat([prev, qkv], 1).gather(1, last[..., None].expand(-1, -1, qkv.shape[-1]))
        return o, {"S": S_new.unflatten(0, (B, n)), "conv": conv_new.unflatten(0, (B, n))}
