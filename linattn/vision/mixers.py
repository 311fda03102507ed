"""Non-causal token mixers for 2-D grids of patch tokens (ViT, DiT), registered in MIXERS.

Every mixer maps x [B, T, C] on a grid (H, W), T = H * W, to [B, T, C] and mixes all tokens
with all tokens (no causal mask). The linear ones use linattn.linear_attention(...,
causal=False): Triton on CUDA tensors with backend "auto", chunked PyTorch on the CPU.
linattn.vision.reference states each one again with its T x T score matrix, in float64.

    attention  softmax attention (SDPA), ViT's: no positional term of its own (the model's
               position embedding)
    linear     linear attention with phi = ELU + 1, normalised by phi(q) . sum phi(k)
    mala       MALA (Fan et al. 2025): phi = ELU + 1; scores beta_i phi(q_i)phi(k_j)/N' -
               gamma_i that keep the query's magnitude (see MALA); 2-D RoPE on phi(q),
               phi(k), LePE (5x5 depthwise conv of v) and an output gate; its block adds a
               3x3 depthwise conv positional encoding (CPE) to the residual stream
    lit        LiT (Wang et al. 2025): ReLU kernel, normalised, plus a 5x5 depthwise conv of
               v (DWC), few heads (2 by default)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import linear_attention
from .grid import apply_rope, check_grid, depthwise, rope_2d

EPS = 1e-6  # in the linear mixers' denominators


class VisionMixer(nn.Module):
    """Base: qkv projection [C -> width * C], heads of C / n_heads, an output projection.
    Subclasses implement mix(x [B, T, C], grid) -> [B, T, C] before the output projection."""

    name = "mixer"
    default_heads = 4
    block_cpe = False  # whether the block adds a 3x3 depthwise positional conv (MALA's CPE)
    width = 3  # q, k, v

    def __init__(self, dim: int, n_heads: int = 0, backend: str = "auto"):
        super().__init__()
        n_heads = n_heads or self.default_heads
        if dim % n_heads:
            raise ValueError(f"d_model {dim} is not divisible by n_heads {n_heads}")
        self.dim, self.n_heads, self.head_dim, self.backend = dim, n_heads, dim // n_heads, backend
        self.qkv = nn.Linear(dim, self.width * dim)
        self.proj = nn.Linear(dim, dim)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, T, n_heads, head_dim]."""
        return t.unflatten(-1, (self.n_heads, self.head_dim))

    def forward(self, x: torch.Tensor, grid) -> torch.Tensor:
        """x [B, T, C] (T = H * W of grid) -> [B, T, C], x's dtype."""
        grid = check_grid(x, grid)
        return self.proj(self.mix(x, grid))

    def mix(self, x, grid):
        raise NotImplementedError


class SoftmaxAttention(VisionMixer):
    name = "attention"

    def mix(self, x, grid):
        q, k, v = (self.heads(t).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # [B, H, T, D]
        o = F.scaled_dot_product_attention(q, k, v)  # non-causal
        return o.transpose(1, 2).flatten(2)


def normalised_linear(q, k, v, backend):
    """phi-mapped q, k [B, T, H, D], v [B, T, H, D] -> q_i (sum_j k_j v_j^T) / (q_i . sum_j k_j
    + EPS), [B, T, H, D]; the numerator through linear_attention(causal=False)."""
    num, _ = linear_attention(q, k, v, scale=1.0, causal=False, backend=backend)
    den = (q * k.sum(dim=1, keepdim=True)).sum(-1, keepdim=True) + EPS  # [B, T, H, 1]
    return num / den


class LinearAttention(VisionMixer):
    name = "linear"

    def mix(self, x, grid):
        q, k, v = (self.heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        return normalised_linear(F.elu(q) + 1, F.elu(k) + 1, v, self.backend).flatten(2)


class LiTAttention(VisionMixer):
    """LiT's simplified linear attention: ReLU(q), ReLU(k), normalised, plus DWC(v)."""

    name = "lit"
    default_heads = 2

    def __init__(self, dim, n_heads=0, backend="auto", kernel: int = 5):
        super().__init__(dim, n_heads, backend)
        self.dwc = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def mix(self, x, grid):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        o = normalised_linear(F.relu(self.heads(q)), F.relu(self.heads(k)), self.heads(v), self.backend)
        return o.flatten(2) + depthwise(v, self.dwc, grid)


class MALA(VisionMixer):
    """Magnitude-Aware Linear Attention. With phi = ELU + 1, s = head_dim^-1/2, N tokens,
    z_i = s phi(q_i) . mean_j phi(k_j), beta_i = 1 + 1 / z_i, gamma_i = z_i / N:

        y_i = sum_j (beta_i s phi~(q_i) . phi~(k_j) / N - gamma_i) v_j      (phi~: after 2-D RoPE)

    whose scores sum to 1 (without RoPE) and sharpen as |phi(q_i)| grows, as softmax's do.
    Output: proj(o * (y + LePE(v))), o a fourth projection (the gate)."""

    name = "mala"
    block_cpe = True
    width = 4  # q, k, v, gate

    def __init__(self, dim, n_heads=0, backend="auto", kernel: int = 5):
        super().__init__(dim, n_heads, backend)
        if self.head_dim % 4:
            raise ValueError(f"mala's 2-D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        self.lepe = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def mix(self, x, grid):
        q, k, v, gate = self.qkv(x).chunk(4, dim=-1)
        T, s = x.shape[1], self.head_dim ** -0.5
        q, k, vh = F.elu(self.heads(q)) + 1, F.elu(self.heads(k)) + 1, self.heads(v)  # [B, T, H, D]
        z = s * (q * k.mean(dim=1, keepdim=True)).sum(-1, keepdim=True)  # [B, T, H, 1]
        rope_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        sin, cos = rope_2d(grid, self.head_dim, device=x.device, dtype=rope_dtype)
        num, _ = linear_attention(apply_rope(q, sin, cos), apply_rope(k, sin, cos), vh, scale=s / T,
                                  causal=False, backend=self.backend)  # [B, T, H, D]
        y = num * (1 + 1 / (z + EPS)) - z * vh.mean(dim=1, keepdim=True)
        return gate * (y.flatten(2) + depthwise(v, self.lepe, grid))


MIXERS: dict[str, type[VisionMixer]] = {c.name: c for c in (SoftmaxAttention, LinearAttention, MALA, LiTAttention)}


def make_mixer(name: str, dim: int, n_heads: int = 0, backend: str = "auto") -> VisionMixer:
    """The mixer `name` of MIXERS; ValueError naming the choices for an unknown name."""
    if name not in MIXERS:
        raise ValueError(f"unknown vision mixer {name!r}; choose one of {', '.join(MIXERS)}")
    return MIXERS[name](dim, n_heads, backend)
