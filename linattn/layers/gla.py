"""Gated Linear Attention (Yang et al., 2024): a data-dependent per-key decay."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..ops.api import linear_attention
from .base import Mixer, gate_dtype, make_dims, projection_input
from .norms import GatedOutputNorm


class GatedLinearAttention(Mixer):
    """GLA's token mixer:

        q = x W_q, k = x W_k  [H, K];  v = x W_v  [H, V]
            (with conv_size > 0: q, k, v = silu(shortconv(x W_q, x W_k, x W_v)), a causal
            depthwise conv per channel, as fla's use_short_conv)
        g = logsigmoid(x W_g1 W_g2 + b) / gate_normalizer      per-key log-decay [B, T, H, K]
        S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t / sqrt(K)
        y = W_o (rmsnorm(o) * silu(x W_r))

    Args:
        d_model, n_heads, backend, layer_idx, n_layers: see Mixer.
        expand_k: K = head_dim * expand_k (default 0.5, as in the paper).
        expand_v: V = head_dim * expand_v (default 1).
        gate_low_rank: rank of the gate projection (16).
        gate_normalizer: divides logsigmoid (16), so decays start near 1 (long memory).
        conv_size: kernel of a short conv on q, k and v (0, the default: none, as the paper's
            and fla's default). Without it nothing in the layer lets a token see the one
            before it except the decay, which starts near 1: on recall tasks the conv (or
            a conv layer before it, as Zoology's GLA models) gives the key-to-value shift.

    forward: as in linattn.layers.base; the state is the op's [B, H, K, V] float32 tensor
    ([N, ...] with cu_seqlens), or with conv_size > 0 the dict {"S": that tensor, "conv":
    [B or N, conv_size-1, 2HK+HV] the conv's last inputs}.
    """

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, save_for_backward: str = "states",
                 expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank: int = 16, gate_normalizer: float = 16.0, conv_size: int = 0):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers,
                         save_for_backward=save_for_backward)
        self.key_dim = make_dims(self.head_dim, expand_k, "expand_k")
        self.value_dim = make_dims(self.head_dim, expand_v, "expand_v")
        self.gate_normalizer = gate_normalizer
        HK, HV = n_heads * self.key_dim, n_heads * self.value_dim
        self.q_proj = nn.Linear(d_model, HK, bias=False)
        self.k_proj = nn.Linear(d_model, HK, bias=False)
        self.v_proj = nn.Linear(d_model, HV, bias=False)
        self.set_qkv_conv(conv_size, (HK, HK, HV))
        self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank, bias=False),
                                     nn.Linear(gate_low_rank, HK, bias=True))
        self.r_proj = nn.Linear(d_model, HV, bias=False)
        self.out_norm = GatedOutputNorm(self.value_dim, activation="silu")
        self.o_proj = nn.Linear(HV, d_model, bias=False)

    def low_rank_gate(self):
        """(the gate projection's part that reads x, the part after it or None): gk_proj's
        two linears when it is a plain nn.Sequential (no hooks of its own), whose first one
        the input projections' GEMM can take; else (gk_proj, None), called whole."""
        seq = self.gk_proj
        if type(seq) is nn.Sequential and len(seq) == 2 and not seq._forward_pre_hooks \
                and not seq._forward_hooks:
            return seq[0], seq[1]
        return seq, None

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        xin = projection_input(x)
        gate_in, gate_out = self.low_rank_gate()
        q, k, v, gk, r, S0, conv_state = self.qkv_projections(
            xin, (self.q_proj, self.k_proj, self.v_proj), gate_in, gate_proj=self.r_proj,
            state=state, cu_seqlens=cu_seqlens, return_state=return_state)
        if gate_out is not None:  # a copy of the low-rank columns, which gate_out keeps
            gk = gate_out(gk.contiguous())
        q = self.heads(q, self.key_dim)    # [B, T, H, K]
        k = self.heads(k, self.key_dim)    # [B, T, H, K]
        v = self.heads(v, self.value_dim)  # [B, T, H, V]
        gk = self.heads(gk, self.key_dim).to(gate_dtype(x))
        g = F.logsigmoid(gk) / self.gate_normalizer     # [B, T, H, K]
        run = linear_attention if self.sequence_parallel is None else self.parallel_op("linear_attention")
        o, S = run(q, k, v, g, initial_state=S0, output_final_state=return_state,
                   cu_seqlens=cu_seqlens, backend=self.backend,
                   save_for_backward=self.save_for_backward)
        y = self.gated_output(o, xin, self.r_proj, gate=self.gate_to_keep(r))
        return y, self.state_with_conv(S, conv_state)
