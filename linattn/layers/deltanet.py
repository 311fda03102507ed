"""DeltaNet and Gated DeltaNet (Yang et al., 2024/2025): the delta rule as a token mixer."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.api import delta_rule
from .base import Mixer, gate_dtype, make_dims, projection_input
from .norms import GatedOutputNorm
from .short_conv import ShortConv


def mamba2_decay_params(n_heads: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(A_log, dt_bias), each [n_heads] float32: A = exp(A_log) uniform in [1, 16] and
    dt = softplus(dt_bias) log-uniform in [1e-3, 1e-1], as Mamba-2 initialises them."""
    A_log = nn.Parameter(torch.empty(n_heads).uniform_(1.0, 16.0).log())
    dt = torch.exp(torch.empty(n_heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
    return A_log, nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)


def mamba2_log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """g = -exp(A_log) * softplus(a + dt_bias): a [..., H] in the gate dtype -> g [..., H] <= 0."""
    return -A_log.to(a.dtype).exp() * F.softplus(a + dt_bias.to(a.dtype))


class DeltaNet(Mixer):
    """DeltaNet's token mixer, as the Gated DeltaNet paper builds it:

        q, k, v = silu(shortconv(x W_qkv))          causal depthwise conv, kernel conv_size
        q, k = l2norm(q), l2norm(k)                  [B, T, H, K]; v [B, T, H, V]
                                                     (per head, fused into the conv)
        beta = sigmoid(x W_b + b_b)                  [B, T, H]
        g = -exp(A_log) * softplus(x W_a + dt_bias)  [B, T, H]   (Gated DeltaNet only)
        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T q_t / sqrt(K)
        y = W_o (rmsnorm(o) * silu(x W_z))

    Gated DeltaNet initialises A = exp(A_log) uniform in [1, 16] and dt = softplus(dt_bias)
    log-uniform in [1e-3, 1e-1], as Mamba-2 does.

    Args:
        d_model, n_heads, backend, layer_idx, n_layers: see Mixer.
        expand_v: V = head_dim * expand_v (default 1); K = head_dim.
        conv_size: the short conv's kernel (4).
        gated: add the decay g (GatedDeltaNet sets it).

    forward: as in linattn.layers.base. The state is the dict {"S": [B, H, K, V] float32
    delta-rule state, "conv": [B, conv_size-1, 2HK+HV] the short conv's last inputs}
    (N rows with cu_seqlens).
    """

    default_gated = False

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, save_for_backward: str = "states",
                 expand_v: float = 1.0, conv_size: int = 4,
                 gated: bool | None = None):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers,
                         save_for_backward=save_for_backward)
        self.gated = self.default_gated if gated is None else bool(gated)
        self.key_dim = self.head_dim
        self.value_dim = make_dims(self.head_dim, expand_v, "expand_v")
        HK, HV = n_heads * self.key_dim, n_heads * self.value_dim
        self.qkv_proj = nn.Linear(d_model, 2 * HK + HV, bias=False)
        # the conv L2-normalises q and k per head of K channels after its SiLU
        self.conv = ShortConv(2 * HK + HV, conv_size, activation="silu", norm_channels=2 * HK,
                              norm_group=self.key_dim)
        self.b_proj = nn.Linear(d_model, n_heads, bias=True)
        if self.gated:
            self.a_proj = nn.Linear(d_model, n_heads, bias=False)
            self.A_log, self.dt_bias = mamba2_decay_params(n_heads)
        self.z_proj = nn.Linear(d_model, HV, bias=False)
        self.out_norm = GatedOutputNorm(self.value_dim, activation="silu")
        self.o_proj = nn.Linear(HV, d_model, bias=False)
        with torch.no_grad():
            self.b_proj.bias.zero_()

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        HK = self.n_heads * self.key_dim
        S0, conv0 = self.split_conv_state(state)
        xin = projection_input(x)
        qkv, b, a, z = self.project(xin)
        gdt = gate_dtype(x)
        beta = torch.sigmoid(b.to(gdt))                                  # [B, T, H]
        g = None
        if self.gated:
            g = mamba2_log_decay(a.to(gdt), self.A_log, self.dt_bias)
        if self.save_for_backward == "recompute" and self.sequence_parallel is None:
            # the conv and the op as one node that keeps the conv's input, not q, k, v
            o, S, conv_state = self.conv.delta_rule(
                qkv, beta, g, heads=self.n_heads, key_dim=self.key_dim,
                value_dim=self.value_dim, cache=conv0, cu_seqlens=cu_seqlens,
                return_cache=return_state, initial_state=S0, output_final_state=return_state,
                backend=self.backend)
        else:
            qkv, conv_state = self.run_conv(qkv, conv0, cu_seqlens, return_state)
            q, k, v = qkv.split([HK, HK, self.n_heads * self.value_dim], dim=-1)
            q = self.heads(q, self.key_dim)                              # [B, T, H, K] unit rows
            k = self.heads(k, self.key_dim)                              # [B, T, H, K] unit rows
            v = self.heads(v, self.value_dim)                            # [B, T, H, V]
            run = delta_rule if self.sequence_parallel is None else self.parallel_op("delta_rule")
            o, S = run(q, k, v, beta, g, initial_state=S0, output_final_state=return_state,
                       cu_seqlens=cu_seqlens, backend=self.backend,
                       save_for_backward=self.save_for_backward)
        y = self.gated_output(o, xin, self.z_proj, gate=z)
        return y, self.state_with_conv(S, conv_state)

    def project(self, xin):
        """The input projections of x = xin() (Mixer.input_projections: one GEMM when they
        are plain nn.Linear): (qkv [B, T, 2HK + HV], b [B, T, H], a [B, T, H] or None without
        the decay, z [B, T, HV] or None where gated_output projects it)."""
        if self.gated:
            return self.input_projections(xin, self.qkv_proj, self.b_proj, self.a_proj,
                                          gate_proj=self.z_proj)
        qkv, b, z = self.input_projections(xin, self.qkv_proj, self.b_proj, gate_proj=self.z_proj)
        return qkv, b, None, z


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: DeltaNet with the Mamba-2-style decay g; see DeltaNet."""

    default_gated = True
