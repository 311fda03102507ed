"""xLSTM's mLSTM as a token mixer: mLSTMexp ("mlstm") and mLSTMsig ("mlstm_sig")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.api import INPUT_GATES, mlstm
from .base import Mixer, gate_dtype, projection_input
from .norms import GatedOutputNorm


class MLSTM(Mixer):
    """The mLSTM cell with per-head scalar gates, then a gated output norm:

        q, k, v = x W_q, x W_k, x W_v      [H, D]
            (with conv_size > 0: q, k, v = silu(shortconv(x W_q, x W_k, x W_v)), as GLA's;
            i, f and z are not convolved)
        i = x W_i + b_i,  f = x W_f + b_f  [B, T, H] pre-activations (forget bias starts in
                                            [3, 6] across heads: long memory at first)
        o = mlstm(q, k, v, i, f, input_gate)   (see linattn.mlstm: "exp" is stabilised and
                                                normalised, "sigmoid" has no normaliser)
        y = W_o (rmsnorm(o) * silu(x W_z))

    Args:
        d_model, n_heads, backend, layer_idx, n_layers: see Mixer.
        input_gate: "exp" (mLSTMexp, the default here) or "sigmoid" (mLSTMsig).
        forget_bias: (low, high) of the forget-gate bias, spread linearly over the heads.
        conv_size: kernel of a short conv on q, k and v (0, the default: none), the
            key-to-value shift recall tasks need; xLSTM's block has a causal conv of kernel 4
            before q and k, this one convolves v too, as GLA's.

    forward: as in linattn.layers.base. The state is the op's: the tuple (C [B, H, D, D],
    n [B, H, D], m [B, H]) for "exp", C [B, H, D, D] for "sigmoid" (float32; N rows with
    cu_seqlens); with conv_size > 0 the dict {"S": that state, "conv": [B or N,
    conv_size-1, 3 d_model] the conv's last inputs}.

    Sequence parallelism (set_sequence_parallel): "sigmoid" only. mLSTMsig is linear attention
    with g = logsigmoid(f) and keys scaled by sigmoid(i), which linattn.parallel runs (LASP-2);
    mLSTMexp's running-max stabiliser m is not an affine map of the state, so LASP-2 cannot
    fold it across ranks (ValueError).
    """

    default_input_gate = "exp"

    init_kept = ("f_proj.bias",)  # the forget gates start open

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, save_for_backward: str = "states",
                 input_gate: str | None = None,
                 forget_bias: tuple[float, float] = (3.0, 6.0), conv_size: int = 0):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers,
                         save_for_backward=save_for_backward)
        input_gate = self.default_input_gate if input_gate is None else input_gate
        if input_gate not in INPUT_GATES:
            raise ValueError(f"input_gate must be one of {INPUT_GATES}, got {input_gate!r}")
        self.input_gate = input_gate
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.set_qkv_conv(conv_size, (d_model, d_model, d_model))
        self.i_proj = nn.Linear(d_model, n_heads, bias=True)
        self.f_proj = nn.Linear(d_model, n_heads, bias=True)
        self.z_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_norm = GatedOutputNorm(self.head_dim, activation="silu")
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():
            self.i_proj.bias.zero_()
            self.f_proj.bias.copy_(torch.linspace(forget_bias[0], forget_bias[1], n_heads))

    def check_sequence_parallel(self, sp) -> None:
        super().check_sequence_parallel(sp)
        if sp is not None and self.input_gate == "exp":
            raise ValueError("mLSTMexp (input_gate='exp') cannot run sequence-parallel: its stabiliser "
                             "is not supported by linattn.parallel; use mlstm_sig (input_gate='sigmoid')")

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        D = self.head_dim
        xin = projection_input(x)
        q, k, v, i, f, z, S0, conv_state = self.qkv_projections(
            xin, (self.q_proj, self.k_proj, self.v_proj), self.i_proj, self.f_proj,
            gate_proj=self.z_proj, state=state, cu_seqlens=cu_seqlens, return_state=return_state)
        q, k, v = (self.heads(t, D) for t in (q, k, v))  # [B, T, H, D]
        i, f = i.to(gate_dtype(x)), f.to(gate_dtype(x))  # [B, T, H]
        if self.sequence_parallel is None:
            o, S = mlstm(q, k, v, i, f, input_gate=self.input_gate, initial_state=S0,
                         output_final_state=return_state, cu_seqlens=cu_seqlens,
                         backend=self.backend, save_for_backward=self.save_for_backward)
        else:  # mLSTMsig as gated linear attention: C_t = sigmoid(f) C_{t-1} + (sigmoid(i) k_t) v_t^T
            k_in = k * torch.sigmoid(i).unsqueeze(-1).to(k.dtype)  # [B, T, H, D]
            o, S = self.sequence_parallel.linear_attention(q, k_in, v, F.logsigmoid(f),
                                                           backend=self.backend)
        return (self.gated_output(o, xin, self.z_proj, gate=self.gate_to_keep(z)),
                self.state_with_conv(S, conv_state))


class MLSTMSig(MLSTM):
    """MLSTM with the sigmoid input gate (mLSTMsig, TFLA paper) by default; see MLSTM."""

    default_input_gate = "sigmoid"
