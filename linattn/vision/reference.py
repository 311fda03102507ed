"""The vision mixers written again with their T x T score matrices: the oracle of the tests.

reference_mixer(name, params, x, grid, n_heads) computes what MIXERS[name](...)(x, grid)
computes, from the mixer's parameters (its state_dict: qkv.weight, qkv.bias, proj.weight,
proj.bias, and lepe.weight / dwc.weight (+ bias)), forming every score A[b, h, i, j] and
summing A v explicitly, in whatever dtype the inputs have (float64 for the oracle). The
depthwise convolutions are loops over the kernel's taps, not F.conv2d.
"""
from __future__ import annotations

import torch

from .grid import rope_2d

EPS = 1e-6


def _heads(t, n_heads):  # [B, T, C] -> [B, H, T, D]
    return t.unflatten(-1, (n_heads, t.shape[-1] // n_heads)).transpose(1, 2)


def _merge(t):  # [B, H, T, D] -> [B, T, C]
    return t.transpose(1, 2).flatten(2)


def _rope(x, sin, cos):  # x [B, H, T, D]; sin, cos [T, D]; pairs (x0, x1) rotated
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos[:, 0::2] - x[..., 1::2] * sin[:, 0::2]
    out[..., 1::2] = x[..., 1::2] * cos[:, 1::2] + x[..., 0::2] * sin[:, 1::2]
    return out


def depthwise_taps(x, weight, bias, grid):
    """x [B, T, C] on grid (H, W) convolved per channel with weight [C, 1, k, k] (zero padding
    k // 2), summing the k * k shifted copies; + bias [C] when given. Returns [B, T, C]."""
    B, T, C = x.shape
    h, w = grid
    k = weight.shape[-1]
    p = k // 2
    img = x.reshape(B, h, w, C)
    padded = x.new_zeros(B, h + 2 * p, w + 2 * p, C)
    padded[:, p:p + h, p:p + w] = img
    out = x.new_zeros(B, h, w, C)
    for di in range(k):
        for dj in range(k):
            out = out + padded[:, di:di + h, dj:dj + w] * weight[:, 0, di, dj]
    if bias is not None:
        out = out + bias
    return out.reshape(B, T, C)


def _scores(name, q, k, grid, rope: bool = True):
    """[B, H, T, T] scores A with y = A v, for the attention-like part of mixer `name`
    (q, k [B, H, T, D] before the feature map). rope=False leaves MALA's RoPE out, to
    inspect its scores (each row then sums to 1)."""
    D, T = q.shape[-1], k.shape[-2]  # T: the number of keys
    if name == "attention":
        return torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5, dim=-1)
    if name in ("linear", "lit"):
        phi = (lambda t: torch.nn.functional.elu(t) + 1) if name == "linear" else torch.relu
        a = phi(q) @ phi(k).transpose(-1, -2)
        return a / (a.sum(-1, keepdim=True) + EPS)
    if name == "mala":
        s = D ** -0.5
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        z = s * (q @ k.transpose(-1, -2)).mean(-1, keepdim=True)  # [B, H, T, 1]
        if rope:
            sin, cos = rope_2d(grid, D, dtype=q.dtype)
            q, k = _rope(q, sin, cos), _rope(k, sin, cos)
        a = q @ k.transpose(-1, -2) * (s / T)
        return (1 + 1 / (z + EPS)) * a - z / T
    raise ValueError(f"no reference for mixer {name!r}")


def reference_mixer(name: str, params: dict, x: torch.Tensor, grid, n_heads: int) -> torch.Tensor:
    """MIXERS[name]'s output [B, T, C] for x [B, T, C] on grid (H, W), from its state_dict
    `params` (tensors of x's dtype), with explicit T x T scores."""
    C = x.shape[-1]
    proj = x @ params["qkv.weight"].T + params["qkv.bias"]
    parts = proj.split(C, dim=-1)
    q, k, v = (_heads(t, n_heads) for t in parts[:3])
    y = _merge(_scores(name, q, k, grid) @ v)  # [B, T, C]
    if name == "lit":
        y = y + depthwise_taps(parts[2], params["dwc.weight"], params.get("dwc.bias"), grid)
    if name == "mala":
        y = parts[3] * (y + depthwise_taps(parts[2], params["lepe.weight"], params.get("lepe.bias"), grid))
    return y @ params["proj.weight"].T + params["proj.bias"]
