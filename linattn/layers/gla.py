"""Gated Linear Attention (Yang et al., 2024): a data-dependent per-key decay."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..ops.api import linear_attention
from .base import Mixer, gate_dtype, make_dims
from .norms import GatedOutputNorm


class GatedLinearAttention(Mixer):
    """GLA's token mixer:

        q = x W_q, k = x W_k  [H, K];  v = x W_v  [H, V]
        g = logsigmoid(x W_g1 W_g2 + b) / gate_normalizer      per-key log-decay [B, T, H, K]
        S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t / sqrt(K)
        y = W_o (rmsnorm(o) * silu(x W_r))

    Args:
        d_model, n_heads, backend, layer_idx, n_layers: see Mixer.
        expand_k: K = head_dim * expand_k (default 0.5, as in the paper).
        expand_v: V = head_dim * expand_v (default 1).
        gate_low_rank: rank of the gate projection (16).
        gate_normalizer: divides logsigmoid (16), so decays start near 1 (long memory).

    forward: as in linattn.layers.base; the state is the op's [B, H, K, V] float32 tensor
    ([N, ...] with cu_seqlens).
    """

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, save_for_backward: str = "states",
                 expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank: int = 16, gate_normalizer: float = 16.0):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers,
                         save_for_backward=save_for_backward)
        self.key_dim = make_dims(self.head_dim, expand_k, "expand_k")
        self.value_dim = make_dims(self.head_dim, expand_v, "expand_v")
        self.gate_normalizer = gate_normalizer
        HK, HV = n_heads * self.key_dim, n_heads * self.value_dim
        self.q_proj = nn.Linear(d_model, HK, bias=False)
        self.k_proj = nn.Linear(d_model, HK, bias=False)
        self.v_proj = nn.Linear(d_model, HV, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank, bias=False),
                                     nn.Linear(gate_low_rank, HK, bias=True))
        self.r_proj = nn.Linear(d_model, HV, bias=False)
        self.out_norm = GatedOutputNorm(self.value_dim, activation="silu")
        self.o_proj = nn.Linear(HV, d_model, bias=False)

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        q = self.heads(self.q_proj(x), self.key_dim)    # [B, T, H, K]
        k = self.heads(self.k_proj(x), self.key_dim)    # [B, T, H, K]
        v = self.heads(self.v_proj(x), self.value_dim)  # [B, T, H, V]
        gk = self.heads(self.gk_proj(x), self.key_dim).to(gate_dtype(x))
        g = F.logsigmoid(gk) / self.gate_normalizer     # [B, T, H, K]
        run = linear_attention if self.sequence_parallel is None else self.parallel_op("linear_attention")
        o, new_state = run(q, k, v, g, initial_state=state,
                           output_final_state=return_state,
                           cu_seqlens=cu_seqlens, backend=self.backend,
                           save_for_backward=self.save_for_backward)
        return self.o_proj(self.out_norm(o, self.r_proj(x))), new_state
