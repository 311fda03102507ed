"""The token mixer of a linearized Transformer (Liger, Liger Attention, Hedgehog, LoLCATs).

A pretrained softmax attention layer keeps its q/k/v/o projections (GQA included: k and v
have n_kv_heads heads, each shared by n_heads / n_kv_heads query heads, as in Llama) and its
softmax is replaced by a recurrence over the same q, k, v, optionally next to sliding-window
softmax attention inside the layer. linattn.convert builds these from a Llama checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.api import delta_rule, linear_attention
from ..ops.fused import l2_normalize
from .attention import rope
from .base import Mixer, gate_dtype
from .feature_maps import FeatureMap

RECURRENCES = ("linear", "gla", "gated_deltanet")
LINEARIZED_MAPS = ("softmax", "hedgehog", "elu", "identity")
COMBINES = ("mix", "shared")
# LoLCATs' initial window factor: sigmoid(-2.197...) = 0.1 weighs the window's softmax terms
WINDOW_FACTOR_INIT = -2.1972245773362196




class LinearizedAttention(Mixer):
    """Softmax attention's projections around a linear recurrence (+ optional window attention).

        q = x W_q [B, T, H, D];  k, v = x W_k, x W_v [B, T, H_kv, D]  (bias with qkv_bias)
        q_r, k_r = RoPE(q), RoPE(k)                         (Llama's rotate-half, rope_theta)
        linear branch on phi(q'), phi(k') with q', k' = (q_r, k_r) if rope_linear else (q, k):
          "linear"          S_t = S_{t-1} + phi(k_t) v_t^T
          "gla"             S_t = diag(exp(g_t)) S_{t-1} + phi(k_t) v_t^T,
                            g_t = logsigmoid(k_t) / gate_normalizer per key feature (Liger:
                            the gate is the key projection itself, no new parameter; a
                            feature width 2D (Hedgehog) repeats it)
          "gated_deltanet"  the delta rule on l2norm(phi(q)), l2norm(phi(k)) with the scalar
                            gate g_t = logsigmoid(mean_d k_t) / gate_normalizer and
                            beta_t = sigmoid(mean_d k_t) (pooled keys; no denominator)
          o_lin = S_t^T phi(q_t) / (phi(q_t) . z_t + eps), z_t the same recurrence on ones;
          with normalize=False (Liger) o_lin = S_t^T phi(q_t), no denominator
        window branch (window W): softmax(q_r k_r^T / sqrt(D)) over keys t - W < s <= t
          combine "mix" (Liger Attention): o = mix * o_lin + (1 - mix) * o_window
          combine "shared" (LoLCATs): one normalisation over both,
            o = (gamma_h sum_win e_ts v_s + sum_{s <= t-W} phi_ts v_s)
                / (gamma_h sum_win e_ts + sum_{s <= t-W} phi_ts),
            e_ts = exp(q_r.k_r / sqrt(D) - max_win), phi_ts = phi(q_t).phi(k_s),
            gamma_h = sigmoid(window_factor_h) (trainable, per head, starting at 0.1:
            WINDOW_FACTOR_INIT); the linear terms outside the window are the full
            recurrence minus the window's terms.
        y = o W_o (+ bias with o_bias)

    With window >= T and mix = 0 ("mix") or any gamma ("shared") the layer is exactly the
    softmax attention it came from.

    Args:
        d_model, n_heads, backend, layer_idx, n_layers: see Mixer (head_dim even for RoPE).
        n_kv_heads: key/value heads (None: n_heads); must divide n_heads.
        qkv_bias, o_bias: biases of the q/k/v and of the output projections.
        recurrence: one of RECURRENCES.  feature_map: one of LINEARIZED_MAPS ("softmax":
            softmax over the head dim; "hedgehog": linattn.layers.HedgehogMap, trainable).
        map_dim, map_init: the Hedgehog maps' feature_dim (None: head_dim; width 2 map_dim)
            and init ("identity" or "kaiming"); "gla" needs a width that is a multiple of D.
        rope_linear: rotate q, k before the feature map.  rope_theta: RoPE base.
        window: sliding-window length of the softmax branch (None: no window branch).
        combine: "mix" or "shared" (see above).  mix: weight of the linear branch ("mix").
        gate_normalizer: divides the gates' logsigmoid (16, as GLA).  eps: denominator's eps.
        normalize: divide the linear branch by its denominator (False: Liger's plain GLA
            output; not with combine "shared" or the delta rule, which has none).
        window_block: queries per block of the window branch, whose scores are then
            [window_block, window_block + W - 1] per head: memory O(T W), not O(T^2).

    forward: as in linattn.layers.base; no sequence parallelism. The state is the dict
    {"S": the op's float32 state [B, H, F, D(+1)], "pos": [B] int64 next position} plus,
    with a window, the last W-1 tokens: {"k": [B, W-1, H_kv, D] rotated keys, "v": [B, W-1,
    H_kv, D], "fk": [B, W-1, H_kv, F] featurised keys ("shared" only), "kpos": [B, W-1]
    int64 positions, -1 where empty}. With cu_seqlens the sequences run one after another.
    """

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "auto", layer_idx: int = 0,
                 n_layers: int = 1, save_for_backward: str = "states",
                 n_kv_heads: int | None = None, qkv_bias: bool = False,
                 o_bias: bool = False, recurrence: str = "gla", feature_map: str = "softmax",
                 rope_linear: bool = False, rope_theta: float = 10000.0, window: int | None = None,
                 combine: str = "mix", mix: float = 0.5, gate_normalizer: float = 16.0,
                 eps: float = 1e-6, window_block: int = 256, normalize: bool = True,
                 map_dim: int | None = None, map_init: str = "identity"):
        super().__init__(d_model, n_heads, backend=backend, layer_idx=layer_idx, n_layers=n_layers,
                         save_for_backward=save_for_backward)
        D = self.head_dim
        if D % 2:
            raise ValueError(f"linearized attention needs an even head dim for RoPE, got {D}")
        n_kv = n_heads if n_kv_heads is None else n_kv_heads
        if isinstance(n_kv, bool) or not isinstance(n_kv, int) or n_kv < 1 or n_heads % n_kv:
            raise ValueError(f"n_kv_heads must be a positive divisor of n_heads={n_heads}, got {n_kv_heads!r}")
        for name, val, allowed in (("recurrence", recurrence, RECURRENCES),
                                   ("feature_map", feature_map, LINEARIZED_MAPS), ("combine", combine, COMBINES)):
            if val not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {val!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or a positive int, got {window!r}")
        if combine == "shared" and recurrence == "gated_deltanet":
            raise ValueError("combine='shared' needs an additive recurrence ('linear' or 'gla'), "
                             "got recurrence='gated_deltanet'")
        if not normalize and combine == "shared" and window is not None:
            raise ValueError("combine='shared' needs the linear branch's denominator (normalize=True)")
        if isinstance(window_block, bool) or not isinstance(window_block, int) or window_block < 1:
            raise ValueError(f"window_block must be a positive int, got {window_block!r}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix!r}")
        self.n_kv_heads, self.recurrence, self.rope_linear = n_kv, recurrence, bool(rope_linear)
        self.rope_theta, self.window, self.combine, self.mix = rope_theta, window, combine, float(mix)
        self.gate_normalizer, self.eps, self.feature_map = gate_normalizer, eps, feature_map
        self.window_block = window_block
        self.normalize = bool(normalize) and recurrence != "gated_deltanet"
        self.q_proj = nn.Linear(d_model, n_heads * D, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv * D, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv * D, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * D, d_model, bias=o_bias)
        base_map = "identity" if feature_map == "softmax" else feature_map
        self.q_map = FeatureMap(base_map, n_heads, D, map_dim, map_init)
        self.k_map = FeatureMap(base_map, n_kv, D, map_dim, map_init)
        self.feature_dim = self.q_map.out_dim
        if recurrence == "gla" and self.feature_dim % D:
            raise ValueError(f"recurrence 'gla' repeats the key gate over the features: the feature width "
                             f"{self.feature_dim} must be a multiple of head_dim {D}")
        self.window_factor = (nn.Parameter(torch.full((n_heads,), WINDOW_FACTOR_INIT))
                              if window is not None and combine == "shared" else None)

    def check_sequence_parallel(self, sp) -> None:
        super().check_sequence_parallel(sp)
        if sp is not None:
            raise ValueError("linearized attention does not run sequence-parallel")

    def _phi(self, fmap: FeatureMap, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, h, D] -> [B, T, h, F] in x's dtype."""
        if self.feature_map == "softmax":
            return torch.softmax(x.to(gate_dtype(x)), dim=-1).to(x.dtype)
        return fmap(x).to(x.dtype)

    def _kv_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H_kv, .] -> [B, T, H, .]: each key/value head serves n_heads/H_kv query heads."""
        rep = self.n_heads // self.n_kv_heads
        return x if rep == 1 else x.repeat_interleave(rep, dim=2)

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        self.check_input(x, cu_seqlens, state, return_state)
        if cu_seqlens is None:
            return self._forward(x, state, return_state)
        cu = [int(c) for c in cu_seqlens]
        ys, states = [], []
        for n in range(len(cu) - 1):
            s_n = None if state is None else {key: val[n:n + 1] for key, val in state.items()}
            y, s = self._forward(x[:, cu[n]:cu[n + 1]], s_n, return_state)
            ys.append(y)
            states.append(s)
        new_state = None
        if return_state:
            new_state = {key: torch.cat([s[key] for s in states]) for key in states[0]}
        return torch.cat(ys, dim=1), new_state

    def _forward(self, x, state, return_state):
        B, T, _ = x.shape
        D, dev = self.head_dim, x.device
        if T == 0:
            if return_state and state is None:
                state = self.empty_state(B, x)
            return self.o_proj(x.new_zeros(B, 0, self.n_heads * D)), (state if return_state else None)
        q = self.heads(self.q_proj(x), D)                                      # [B, T, H, D]
        k = self.k_proj(x).unflatten(-1, (self.n_kv_heads, D))                 # [B, T, H_kv, D]
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, D))                 # [B, T, H_kv, D]
        start = torch.zeros(B, dtype=torch.long, device=dev) if state is None else state["pos"]
        pos = start[:, None] + torch.arange(T, device=dev)                     # [B, T]
        qr, kr = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
        fq = self._phi(self.q_map, qr if self.rope_linear else q)              # [B, T, H, F]
        fk = self._phi(self.k_map, kr if self.rope_linear else k)              # [B, T, H_kv, F]
        num, den, S = self._linear(k, fq, fk, v, None if state is None else state["S"], return_state)
        new_state = {"S": S, "pos": start + T} if return_state else None
        if self.window is None:
            o = num / (den + self.eps) if den is not None else num             # [B, T, H, D]
            return self.o_proj(o.to(x.dtype).flatten(-2)), new_state
        with torch.autocast(x.device.type, enabled=False):  # the window's sums stay in float32
            o, win = self._window(qr, kr, v, fq, fk, pos, num, den, state)
        if return_state:
            new_state.update(win)
        return self.o_proj(o.to(x.dtype).flatten(-2)), new_state

    def empty_state(self, B: int, x: torch.Tensor) -> dict:
        """The state before any token, for B rows (x gives the device and dtype)."""
        H, D, Fd, dev, gdt = self.n_heads, self.head_dim, self.feature_dim, x.device, gate_dtype(x)
        V = D + 1 if self.normalize else D
        state = {"S": torch.zeros(B, H, Fd, V, device=dev, dtype=gdt),
                 "pos": torch.zeros(B, dtype=torch.long, device=dev)}
        if self.window is not None:
            L, kv = self.window - 1, self.n_kv_heads
            state.update(k=x.new_zeros(B, L, kv, D), v=x.new_zeros(B, L, kv, D),
                         kpos=torch.full((B, L), -1, dtype=torch.long, device=dev))
            if self.combine == "shared":
                state["fk"] = x.new_zeros(B, L, kv, Fd)
        return state

    def attention_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both attentions' weights on x [B, T, d_model] from the start of a sequence, for
        attention-weight matching (Hedgehog): (softmax(q_r k_r^T / sqrt(D)) causal, and the
        linear attention's phi(q_t).phi(k_s) / sum_{s' <= t} phi(q_t).phi(k_s')), each
        [B, H, T, T] float32 (float64 for float64 x), 0 above the diagonal. Needs
        recurrence "linear" and no window (ValueError otherwise)."""
        if self.recurrence != "linear" or self.window is not None or not self.normalize:
            raise ValueError("attention weights exist for recurrence='linear' without a window, normalised, only; "
                             f"got recurrence={self.recurrence!r}, window={self.window!r}, normalize={self.normalize}")
        B, T, _ = x.shape
        D, gdt = self.head_dim, gate_dtype(x)
        q = self.heads(self.q_proj(x), D)                                      # [B, T, H, D]
        k = self.k_proj(x).unflatten(-1, (self.n_kv_heads, D))                 # [B, T, H_kv, D]
        pos = torch.arange(T, device=x.device).expand(B, T)
        qr, kr = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = torch.einsum("bthd,bshd->bhts", qr.to(gdt), self._kv_to_heads(kr).to(gdt)) * D ** -0.5
        soft = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        fq = self._phi(self.q_map, qr if self.rope_linear else q).to(gdt)     # [B, T, H, F]
        fk = self._kv_to_heads(self._phi(self.k_map, kr if self.rope_linear else k)).to(gdt)
        lin = torch.einsum("bthf,bshf->bhts", fq, fk) * causal
        return soft, lin / (lin.sum(-1, keepdim=True) + self.eps)

    def _linear(self, k, fq, fk, v, S0, return_state):
        """The recurrence. Returns (numerator [B, T, H, D], denominator [B, T, H, 1] or None
        for the delta rule, final state or None); float32 when the "shared" combine subtracts
        the window's terms from them (cancellation), else v's dtype."""
        gdt = gate_dtype(v)
        fk_h, v_h = self._kv_to_heads(fk), self._kv_to_heads(v)                # [B, T, H, F], [B, T, H, D]
        kw = dict(initial_state=S0, output_final_state=return_state, backend=self.backend,
                  save_for_backward=self.save_for_backward)
        if self.recurrence == "gated_deltanet":
            pooled = self._kv_to_heads(k.to(gdt).mean(-1, keepdim=True))[..., 0]  # [B, T, H]
            g = F.logsigmoid(pooled) / self.gate_normalizer
            qn, kn = l2_normalize(fq, eps=1e-6).to(v.dtype), l2_normalize(fk_h, eps=1e-6).to(v.dtype)
            o, S = delta_rule(qn, kn, v_h, torch.sigmoid(pooled), g, **kw)
            return o, None, S
        g = None
        if self.recurrence == "gla":
            gk = self._kv_to_heads(F.logsigmoid(k.to(gdt)) / self.gate_normalizer)  # [B, T, H, D]
            g = gk.repeat(1, 1, 1, self.feature_dim // self.head_dim)             # [B, T, H, F]
        dt = gdt if (self.window is not None and self.combine == "shared") else v.dtype
        if not self.normalize:
            o, S = linear_attention(fq.to(dt), fk_h.to(dt), v_h.to(dt), g, scale=1.0, **kw)
            return o, None, S
        v1 = torch.cat([v_h, torch.ones_like(v_h[..., :1])], dim=-1)              # [B, T, H, D+1]
        o, S = linear_attention(fq.to(dt), fk_h.to(dt), v1.to(dt), g, scale=1.0, **kw)
        D = self.head_dim
        return o[..., :D], o[..., D:], S

    def _window_block(self, qr, pos, num, den, fq, ks, vs, kpos, fks):
        """The window branch and the combination for queries qr [B, t, H, D] at positions pos
        [B, t], against keys ks, vs [B, s, H_kv, D] at kpos [B, s] (-1: empty), fks their
        features ("shared"); num, den the linear branch's rows. Returns o [B, t, H, D] float32."""
        D, W, gdt = qr.shape[-1], self.window, gate_dtype(qr)
        d = pos[:, :, None] - kpos[:, None, :]                                 # [B, t, s]
        allowed = (kpos[:, None, :] >= 0) & (d >= 0) & (d < W)
        kh, vh = self._kv_to_heads(ks).to(gdt), self._kv_to_heads(vs).to(gdt)  # [B, s, H, D]
        scores = torch.einsum("bthd,bshd->bhts", qr.to(gdt), kh) * D ** -0.5
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))         # [B, H, t, s]
        if self.combine == "mix":
            o_win = torch.einsum("bhts,bshd->bthd", torch.softmax(scores, -1), vh)
            o_lin = num.to(gdt) / (den.to(gdt) + self.eps) if den is not None else num.to(gdt)
            return self.mix * o_lin + (1.0 - self.mix) * o_win
        e = torch.exp(scores - scores.amax(-1, keepdim=True).detach())       # [B, H, t, s]
        lin = torch.einsum("bthf,bshf->bhts", fq.to(gdt), self._kv_to_heads(fks).to(gdt))
        lin = lin * allowed[:, None]                                           # the window's linear terms
        num_out = num.to(gdt) - torch.einsum("bhts,bshd->bthd", lin, vh)
        den_out = den.to(gdt) - lin.sum(-1).transpose(1, 2)[..., None]         # [B, t, H, 1]
        gamma = torch.sigmoid(self.window_factor.to(gdt))[:, None]             # [H, 1]
        return (gamma * torch.einsum("bhts,bshd->bthd", e, vh) + num_out) \
            / (gamma * e.sum(-1).transpose(1, 2)[..., None] + den_out)

    def _window(self, qr, kr, v, fq, fk, pos, num, den, state):
        """The sliding-window softmax branch and its combination with the linear branch.
        Returns (o [B, T, H, D], the window part of the new state)."""
        W = self.window
        shared = self.combine == "shared"
        if state is None or "k" not in state:
            ks, vs, kpos = kr, v, pos
            fks = fk if shared else None
        else:
            ks, vs = torch.cat([state["k"].to(kr.dtype), kr], 1), torch.cat([state["v"].to(v.dtype), v], 1)
            kpos = torch.cat([state["kpos"], pos], 1)                          # [B, L + T]
            fks = torch.cat([state["fk"].to(fk.dtype), fk], 1) if shared else None
        L, T = ks.shape[1] - qr.shape[1], qr.shape[1]
        outs = []
        for a in range(0, T, self.window_block):  # query blocks: scores [block, block + W - 1]
            b = min(T, a + self.window_block)
            lo = max(0, L + a - W + 1)
            outs.append(self._window_block(
                qr[:, a:b], pos[:, a:b], num[:, a:b], None if den is None else den[:, a:b],
                fq[:, a:b], ks[:, lo:L + b], vs[:, lo:L + b], kpos[:, lo:L + b],
                None if fks is None else fks[:, lo:L + b]))
        o = torch.cat(outs, 1)
        keep = W - 1
        pad = max(0, keep - ks.shape[1])

        def last(z, fill=0):  # the last W-1 columns, left-padded (kpos -1: empty) when fewer
            z = z[:, max(0, z.shape[1] - keep):]
            return F.pad(z, (0, 0) * (z.dim() - 2) + (pad, 0), value=fill) if pad else z
        win = {"k": last(ks), "v": last(vs), "kpos": last(kpos, -1)}
        if shared:
            win["fk"] = last(fks)
        return o, win
