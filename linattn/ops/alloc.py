"""Output allocation for the fast paths, with a test-only NaN-poison switch.

Kernels allocate their outputs and gradients through `empty`. Tests set `POISON = True`
(or LINATTN_POISON=1) so every buffer starts as NaN: an element a kernel forgets to write
then fails the comparison instead of passing by luck.
"""
import os

import torch

POISON = os.environ.get("LINATTN_POISON", "0") == "1"


def empty(*shape, dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor when POISON is on."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return empty(x.shape, dtype=dtype or x.dtype, device=x.device)
