"""Ops: the float64 reference (oracle), the chunked PyTorch path, and Triton kernels."""
from .api import delta_rule, linear_attention, mlstm

__all__ = ["linear_attention", "delta_rule", "mlstm"]
