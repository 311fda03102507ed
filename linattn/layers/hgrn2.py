"""HGRN-2 (Qin et al., 2024): a gated linear RNN whose key is one minus its forget gate."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.api import linear_attention
from .base import Mixer, gate_dtype, make_dims, projection_input
from .norms import GatedOutputNorm


class HGRN2(Mixer):
    """HGRN-2's token mixer (state expansion through outer products):

        forget f_t = lb + (1 - lb) sigmoid(x W_f)   per key [B, T, H, K];  g = log f
        k_t = 1 - f_t,  q = silu(x W_q),  v = x W_i
        S_t = diag(f_t) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t   (scale 1)
        y = W_o rmsnorm(o)

    Args:
        d_model, n_heads, backend, layer_idx, n_layers: see Mixer.
        expand_k: K = head_dim * expand_k (the state expansion; default 1).
        lower_bound: lb in [0, 1), the forget gate's floor (0: plain sigmoid).

    forward: as in linattn.layers.base; the state is the op's [B, H, K, D] float32 tensor
    ([N, ...] with cu_seqlens).
    """

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, save_for_backward: str = "states",
                 expand_k: float = 1.0, lower_bound: float = 0.0):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers,
                         save_for_backward=save_for_backward)
        if not 0.0 <= lower_bound < 1.0:
            raise ValueError(f"lower_bound must be in [0, 1), got {lower_bound}")
        self.key_dim = make_dims(self.head_dim, expand_k, "expand_k")
        self.lower_bound = lower_bound
        HK = n_heads * self.key_dim
        self.q_proj = nn.Linear(d_model, HK, bias=False)
        self.f_proj = nn.Linear(d_model, HK, bias=False)
        self.i_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_norm = GatedOutputNorm(self.head_dim, activation=None)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        xin = projection_input(x)
        q, f, v, _ = self.input_projections(xin, self.q_proj, self.f_proj, self.i_proj)
        # silu keeps its input: q's own copy, where a view would keep the GEMM output's f
        # and v columns alive too (the op keeps its own copy of v)
        q = F.silu(self.heads(q.contiguous(), self.key_dim))                     # [B, T, H, K]
        f = self.heads(f, self.key_dim).to(gate_dtype(x))                        # [B, T, H, K]
        lb = self.lower_bound
        if lb == 0.0:
            g, k = F.logsigmoid(f), torch.sigmoid(-f)       # log f, 1 - f without cancellation
        else:
            g = torch.logaddexp(torch.full_like(f, math.log(lb)), math.log1p(-lb) + F.logsigmoid(f))
            k = (1.0 - lb) * torch.sigmoid(-f)
        v = self.heads(v, self.head_dim)                                         # [B, T, H, D]
        run = linear_attention if self.sequence_parallel is None else self.parallel_op("linear_attention")
        o, new_state = run(q, k.to(q.dtype), v, g, scale=1.0, initial_state=state,
                           output_final_state=return_state,
                           cu_seqlens=cu_seqlens, backend=self.backend,
                           save_for_backward=self.save_for_backward)
        return self.out_norm(o, None, self.o_proj), new_state
