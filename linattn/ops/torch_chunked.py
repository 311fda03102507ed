"""Chunkwise-parallel PyTorch path (work in progress: delegates to the reference for now)."""
from .reference import delta_rule, linear_attention, mlstm  # noqa: F401
