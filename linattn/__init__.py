"""linattn: linear-attention sequence models.

Ops (the public API, see linattn.ops.api for the full contract):
    linattn.linear_attention(q, k, v, g=None, ...)   none / constant / scalar / per-key decay
    linattn.delta_rule(q, k, v, beta, g=None, ...)   DeltaNet and Gated DeltaNet
    linattn.mlstm(q, k, v, i, f, input_gate=...)     xLSTM's mLSTM (exp or sigmoid input gate)
Each returns (o, final_state); layout [B, T, H, D].

Decoding (inference, a state in and the new state out, optionally in place):
    linattn.linear_attention_decode, linattn.delta_rule_decode, linattn.mlstm_decode
"""
from .ops.api import delta_rule, linear_attention, mlstm
from .ops.decode import delta_rule_decode, linear_attention_decode, mlstm_decode

__version__ = "0.1.0"
__all__ = ["linear_attention", "delta_rule", "mlstm", "linear_attention_decode",
           "delta_rule_decode", "mlstm_decode", "__version__"]
