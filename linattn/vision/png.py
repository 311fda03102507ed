"""A grid of grey images written as a PNG with zlib alone (no imaging library)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch


def image_grid(pixels: torch.Tensor, columns: int = 8, zoom: int = 4, gap: int = 1) -> torch.Tensor:
    """pixels uint8 [N, S, S] -> uint8 [rows * (S*zoom + gap) + gap, columns * (...) + gap]:
    the images enlarged zoom times, row-major, on a white background."""
    if pixels.dim() != 3 or pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8 [N, S, S], got {pixels.dtype} {tuple(pixels.shape)}")
    n, s = pixels.shape[0], pixels.shape[1] * zoom
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    big = pixels.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
    canvas = torch.full((rows * (s + gap) + gap, columns * (s + gap) + gap), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[gap + r * (s + gap):gap + r * (s + gap) + s, gap + c * (s + gap):gap + c * (s + gap) + s] = big[i]
    return canvas


def write_png(path, grey: torch.Tensor) -> Path:
    """Writes grey uint8 [H, W] as an 8-bit greyscale PNG at path."""
    h, w = grey.shape
    raw = b"".join(b"\x00" + bytes(grey[r].tolist()) for r in range(h))  # filter 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path = Path(path)
    path.write_bytes(png)
    return path
