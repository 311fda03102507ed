"""Plain (ungated) linear attention with a choice of feature map (see feature_maps.py)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.api import linear_attention
from .base import Mixer, projection_input
from .feature_maps import FeatureMap
from .norms import GatedOutputNorm


class LinearAttention(Mixer):
    """Linear attention (Katharopoulos et al.), Hedgehog and TransNormer's NormAttention.

        phi = feature map on q and k (per head; Hedgehog's is trainable, one for q, one for k)
        S_t = S_{t-1} + phi(k_t) v_t^T
        o_t = S_t^T phi(q_t) / (phi(q_t) . sum_{s<=t} phi(k_s) + eps)     maps with a denominator
        o_t = rmsnorm(S_t^T phi(q_t) / sqrt(K))                          feature_map="norm"

    The ops have no denominator: this layer runs the op once with v augmented by a column of
    ones, so the op's last output column is the denominator and the state carries sum phi(k).

    Args:
        d_model, n_heads, backend, layer_idx, n_layers: see Mixer.
        feature_map: "identity" | "elu" (default) | "hedgehog" | "norm".
        eps: added to the denominator.
        conv_size: kernel of a short conv on q, k and v before the feature maps (0, the
            default: none): q, k, v = silu(shortconv(x W_q, x W_k, x W_v)), as GLA's. It
            gives the layer the shift from a key to the value after it that recall tasks
            need (Zoology's attention-free models have a conv before the mixer).

    forward(x [B, T, d_model], state=None, cu_seqlens=None, return_state=False)
        -> (y [B, T, d_model], state or None), as in linattn.layers.base. The state is the op's
        [B, H, F, D+1] float32 tensor (F the feature width; the last column holds sum phi(k))
        for maps with a denominator, [B, H, F, D] for "norm"; [N, ...] with cu_seqlens. With
        conv_size > 0 it is the dict {"S": that tensor, "conv": [B or N, conv_size-1, 3 d_model]
        the conv's last inputs}.
    """

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, save_for_backward: str = "states",
                 feature_map: str = "elu", eps: float = 1e-6, conv_size: int = 0):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers,
                         save_for_backward=save_for_backward)
        D = self.head_dim
        self.eps = eps
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.set_qkv_conv(conv_size, (d_model, d_model, d_model))
        self.q_map = FeatureMap(feature_map, n_heads, D)
        self.k_map = FeatureMap(feature_map, n_heads, D)
        self.out_norm = None if self.q_map.uses_denominator else GatedOutputNorm(D, activation=None)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        D = self.head_dim
        xin = projection_input(x)
        q, k, v, _, S0, conv_state = self.qkv_projections(
            xin, (self.q_proj, self.k_proj, self.v_proj), state=state, cu_seqlens=cu_seqlens,
            return_state=return_state)
        q = self.q_map(self.heads(q, D))                # [B, T, H, F]
        k = self.k_map(self.heads(k, D))                # [B, T, H, F]
        v = self.heads(v, D)                            # [B, T, H, D]
        q, k = q.to(v.dtype), k.to(v.dtype)  # autocast runs elu / softmax maps in float32
        kw = dict(initial_state=S0, output_final_state=return_state, cu_seqlens=cu_seqlens,
                  backend=self.backend, save_for_backward=self.save_for_backward)
        run = linear_attention if self.sequence_parallel is None else self.parallel_op("linear_attention")
        if self.out_norm is not None:
            o, S = run(q, k, v, **kw)
            return self.out_norm(o, None, self.o_proj), self.state_with_conv(S, conv_state)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)       # [B, T, H, D+1]
        o, S = run(q, k, v1, scale=1.0, **kw)  # scale cancels
        o = (o[..., :D] / (o[..., D:] + self.eps)).flatten(-2)         # [B, T, H * D]
        return self.o_proj(o), self.state_with_conv(S, conv_state)
