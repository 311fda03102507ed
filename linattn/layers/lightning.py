"""Lightning Attention (TransNormerLLM): linear attention with a constant per-head decay."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.api import linear_attention
from .base import Mixer, gate_dtype, projection_input
from .norms import GatedOutputNorm


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's head slopes [H] (float64): 2^(-8h/H) for h = 1..H when H is a power of two,
    interleaved from the next power of two otherwise (Press et al.)."""
    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]
    if math.log2(n_heads).is_integer():
        s = pow2(n_heads)
    else:
        p = 2 ** math.floor(math.log2(n_heads))
        s = pow2(p) + pow2(2 * p)[0::2][: n_heads - p]
    return torch.tensor(s, dtype=torch.float64)


class LightningAttention(Mixer):
    """TransNormerLLM's token mixer on Lightning Attention:

        q = silu(x W_q), k = silu(x W_k), v = x W_v                          (per head)
        S_t = lambda_h S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t / sqrt(K)
        y = W_o (rmsnorm(o) * sigmoid(x W_u))

    with the fixed decay log(lambda_h) = -slope_h * (1 - l / (L - 1) + 1e-5) (ALiBi slopes,
    shallower layers forget faster; l = layer_idx, L = n_layers; factor 1 when L == 1).
    The decay is a non-persistent buffer ``log_decay`` [H] (float64 at construction; it
    follows the module's dtype casts), not trained.

    Args:
        d_model, n_heads, backend, layer_idx, n_layers: see Mixer.
        conv_size: kernel of a short conv on q, k and v (0, the default: none, as
            TransNormerLLM's): with conv_size > 0, q, k, v = silu(shortconv(x W_q, x W_k,
            x W_v)) before the silu above, as GLA's conv (the key-to-value shift recall needs).
    forward: as in linattn.layers.base; the state is the op's [B, H, D, D] float32 tensor
    ([N, ...] with cu_seqlens), or with conv_size > 0 the dict {"S": that tensor, "conv":
    [B or N, conv_size-1, 3 d_model] the conv's last inputs}.
    """

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, save_for_backward: str = "states", conv_size: int = 0):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers,
                         save_for_backward=save_for_backward)
        depth = 1.0 - layer_idx / (n_layers - 1) + 1e-5 if n_layers > 1 else 1.0
        # [H], fixed by (n_heads, layer_idx, n_layers): a buffer, not in the state dict
        self.register_buffer("log_decay", -alibi_slopes(n_heads) * depth, persistent=False)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.set_qkv_conv(conv_size, (d_model, d_model, d_model))
        self.u_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_norm = GatedOutputNorm(self.head_dim, activation="sigmoid")
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        D = self.head_dim
        xin = projection_input(x)
        q, k, v, u, S0, conv_state = self.qkv_projections(
            xin, (self.q_proj, self.k_proj, self.v_proj), gate_proj=self.u_proj, state=state,
            cu_seqlens=cu_seqlens, return_state=return_state)
        q = F.silu(self.heads(q, D))                # [B, T, H, D]
        k = F.silu(self.heads(k, D))
        v = self.heads(v, D)
        g = self.log_decay.to(gate_dtype(x))        # [H]
        run = linear_attention if self.sequence_parallel is None else self.parallel_op("linear_attention")
        o, S = run(q, k, v, g, initial_state=S0, output_final_state=return_state,
                   cu_seqlens=cu_seqlens, backend=self.backend,
                   save_for_backward=self.save_for_backward)
        return self.gated_output(o, xin, self.u_proj, gate=u), self.state_with_conv(S, conv_state)
