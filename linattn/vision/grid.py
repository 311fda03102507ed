"""2-D token grids: the positional pieces the vision mixers use.

Tokens of an H x W grid of patches are laid out row-major: token t = r * W + c.

    rope_2d      MALA's 2-D rotary embedding: the first half of each head's channels rotates
                 with the row index, the second half with the column index
    depthwise    a depthwise k x k convolution over the grid (LePE, LiT's DWC, CPE)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_2d(grid: tuple[int, int], head_dim: int, *, device=None, dtype=torch.float32):
    """(sin, cos), each [H*W, head_dim] in `dtype`: angles 10000^-(i/(n-1)) for n = head_dim/4
    frequencies, each used for a pair of channels; channels [0, head_dim/2) take the row
    index, [head_dim/2, head_dim) the column index (MALA's RoPE). head_dim % 4 == 0."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    h, w = grid
    n = head_dim // 4
    angle = 1.0 / (10000 ** torch.linspace(0, 1, n, dtype=torch.float64, device=device))  # [n]
    angle = angle.repeat_interleave(2)  # [head_dim/2]: one angle per channel pair
    rows = torch.arange(h, dtype=torch.float64, device=device)[:, None] * angle  # [h, D/2]
    cols = torch.arange(w, dtype=torch.float64, device=device)[:, None] * angle  # [w, D/2]
    theta = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], -1)
    theta = theta.reshape(h * w, head_dim)  # [T, D]
    return theta.sin().to(dtype), theta.cos().to(dtype)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated pairwise: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) per
    channel pair; sin, cos [T, D]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)  # [B, T, H, D]
    return x * cos[:, None, :].to(x.dtype) + rotated * sin[:, None, :].to(x.dtype)


def depthwise(x: torch.Tensor, conv: nn.Conv2d, grid: tuple[int, int]) -> torch.Tensor:
    """conv (a depthwise Conv2d, 'same' padding) over tokens x [B, T, C] laid out on grid
    (H, W), T = H * W; returns [B, T, C]."""
    B, T, C = x.shape
    h, w = grid
    img = x.transpose(1, 2).reshape(B, C, h, w)
    return F.conv2d(img, conv.weight.to(x.dtype), None if conv.bias is None else conv.bias.to(x.dtype),
                    padding=conv.padding, groups=conv.groups).reshape(B, C, T).transpose(1, 2)


def check_grid(x: torch.Tensor, grid) -> tuple[int, int]:
    """grid as (H, W), ValueError unless x is [B, H*W, C]."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
    h, w = (int(g) for g in grid)
    if h * w != x.shape[1]:
        raise ValueError(f"grid {h}x{w} has {h * w} tokens but x has T = {x.shape[1]}")
    return h, w
