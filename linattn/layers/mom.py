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

Load balancing: after each forward, `self.aux_loss` holds the Switch-Transformer loss over
the call's tokens, M * sum_m f_m P_m with f_m the fraction of the top-k assignments that
went to memory m and P_m the mean router probability of m (1 at perfect balance); the
trainer adds it times TrainConfig.aux_loss_coef.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.api import delta_rule, linear_attention
from .base import Mixer, gate_dtype, make_dims
from .deltanet import l2norm, mamba2_decay_params, mamba2_log_decay
from .norms import GatedOutputNorm
from .short_conv import ShortConv

RECURRENCES = ("gated_deltanet", "deltanet", "gla")


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, num_memories: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss.

    probs: [N, M] router probabilities (float32/float64); chosen: [N, k] int64 top-k indices.
    Returns the scalar M * sum_m f_m P_m, f_m = (assignments to m) / (N k), P_m = mean_n p_nm.
    """
    N, k = chosen.shape
    counts = torch.bincount(chosen.reshape(-1), minlength=num_memories).to(probs.dtype)  # [M]
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

    forward: as in linattn.layers.base. The state is the dict {"S": [R, M', H, K, V] float32
    per-memory states, "conv": [R, M', conv_size-1, 2HK+HV] per-memory conv caches}, R = B
    (N with cu_seqlens), M' = M (+1 for the shared memory, last). A memory no token of a call
    was routed to keeps its state. Sequence parallelism is not supported (ValueError).
    After every forward, `aux_loss` is the load-balancing loss (a scalar tensor).
    """

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, num_memories: int = 4, top_k: int = 2, shared_memory: bool = True,
                 recurrence: str = "gated_deltanet", expand_v: float = 1.0, conv_size: int = 4):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers)
        if isinstance(num_memories, bool) or not isinstance(num_memories, int) or num_memories < 1:
            raise ValueError(f"num_memories must be a positive int, got {num_memories!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_memories:
            raise ValueError(f"top_k must be an int in [1, num_memories={num_memories}], got {top_k!r}")
        if recurrence not in RECURRENCES:
            raise ValueError(f"recurrence must be one of {RECURRENCES}, got {recurrence!r}")
        self.num_memories, self.top_k = num_memories, top_k
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
        self.conv = ShortConv(2 * HK + HV, conv_size, activation="silu")
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

    def route(self, x: torch.Tensor):
        """Router of x [B, T, d]: (probs [B*T, M], memory of each slot [B*T, S] int64, weight
        of each slot [B*T, S]) in the gate dtype, S = top_k (+1: the shared memory, weight 1)."""
        probs = torch.softmax(self.router(x).to(gate_dtype(x)), dim=-1).flatten(0, 1)  # [BT, M]
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

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        B, T, _ = x.shape
        H, K, V, n = self.n_heads, self.key_dim, self.value_dim, self.n_mem
        gdt = gate_dtype(x)
        probs, mem, w = self.route(x)                                     # [BT, M], [BT, S], [BT, S]
        self.aux_loss = load_balancing_loss(probs, mem[:, :self.top_k], self.num_memories)
        BT, S = mem.shape
        with torch.no_grad():
            perm, inv, cu, R = routing_plan(mem, B, T, n, cu_seqlens)
        S0, conv0 = self._state_in(state, R)
        xf = x.reshape(BT, self.d_model)

        def per_memory(proj, width):
            """[BT, S, width]: proj's block of each slot's memory (distinct indices)."""
            out = proj(xf).view(BT, n, width)
            return out.gather(1, mem[:, :, None].expand(BT, S, width))

        q = self.q_proj(xf)[:, None].expand(BT, S, H * K)
        qkv = torch.cat([q, per_memory(self.k_proj, H * K), per_memory(self.v_proj, H * V)], -1)
        packed = qkv.reshape(BT * S, qkv.shape[-1])[perm][None]                # [1, P, 2HK + HV]
        packed, conv_state = self.conv(packed, conv0, cu, return_cache=return_state)
        q, k, v = packed.split([H * K, H * K, H * V], dim=-1)
        q, k, v = q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V))

        def gate(proj, width):
            """[1, P, width] packed per-memory gate pre-activations in the gate dtype."""
            return per_memory(proj, width).reshape(BT * S, width)[perm][None].to(gdt)

        if self.recurrence == "gla":
            g = (F.logsigmoid(gate(self.gk_proj, H * K)) / 16.0).unflatten(-1, (H, K))
            o, S_new = linear_attention(q, k, v, g, initial_state=S0, output_final_state=return_state,
                                        cu_seqlens=cu, backend=self.backend)
        else:
            q, k = l2norm(q).to(v.dtype), l2norm(k).to(v.dtype)
            beta = torch.sigmoid(gate(self.b_proj, H))                    # [1, P, H]
            g = None
            if self.recurrence == "gated_deltanet":
                g = mamba2_log_decay(gate(self.a_proj, H), self.A_log, self.dt_bias)
            o, S_new = delta_rule(q, k, v, beta, g, initial_state=S0, output_final_state=return_state,
                                  cu_seqlens=cu, backend=self.backend)
        o = o[0][inv].view(BT, S, H, V)                                   # back to (token, slot)
        o = (o * w.to(o.dtype)[:, :, None, None]).sum(1).view(B, T, H, V)
        y = self.o_proj(self.out_norm(o, self.z_proj(x)))
        if not return_state:
            return y, None
        return y, {"S": S_new.unflatten(0, (R, n)), "conv": conv_state.unflatten(0, (R, n))}
