"""linattn: linear-attention sequence models.

Ops (the public API, see linattn.ops.api for the full contract):
    linattn.linear_attention(q, k, v, g=None, ...)   none / constant / scalar / per-key decay
    linattn.delta_rule(q, k, v, beta, g=None, ...)   DeltaNet and Gated DeltaNet
    linattn.mlstm(q, k, v, i, f, input_gate=...)     xLSTM's mLSTM (exp or sigmoid input gate)
Each returns (o, final_state); layout [B, T, H, D].
"""
from .ops.api import delta_rule, linear_attention, mlstm

__version__ = "0.1.0"
__all__ = ["linear_attention", "delta_rule", "mlstm", "__version__"]
