"""Token mixers as nn.Modules, one per member of the family, plus softmax attention.

MIXERS maps a mixer's name to its class. Every class is built as
``cls(d_model, n_heads, *, backend="auto", layer_idx=0, n_layers=1, **options)`` and called as
``y, new_state = mixer(x, state=None, cu_seqlens=None, return_state=False)`` with x and y
[B, T, d_model] (see linattn.layers.base for the convention, and each class for its options
and its state's layout). ``mixer.set_sequence_parallel(sp)`` runs a mixer sequence-parallel
(LASP-2, linattn.parallel) on this rank's slice of the sequence (see linattn.layers.base);
mLSTMexp, mom and linearized cannot (ValueError).
"""
from .attention import Attention
from .base import Mixer
from .deltanet import DeltaNet, GatedDeltaNet
from .feature_maps import FEATURE_MAPS, FeatureMap, HedgehogMap
from .gla import GatedLinearAttention
from .hgrn2 import HGRN2
from .lightning import LightningAttention
from .linear import LinearAttention
from .linearized import LinearizedAttention
from .mlstm import MLSTM, MLSTMSig
from .mom import MixtureOfMemories
from .norms import GatedOutputNorm, RMSNorm
from .short_conv import ShortConv

MIXERS = {
    "linear": LinearAttention,
    "lightning": LightningAttention,
    "gla": GatedLinearAttention,
    "hgrn2": HGRN2,
    "mlstm": MLSTM,
    "mlstm_sig": MLSTMSig,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "attention": Attention,
    "mom": MixtureOfMemories,
    "linearized": LinearizedAttention,
}

__all__ = ["MIXERS", "Mixer", "LinearAttention", "LightningAttention", "GatedLinearAttention",
           "HGRN2", "MLSTM", "MLSTMSig", "DeltaNet", "GatedDeltaNet", "Attention", "MixtureOfMemories",
           "LinearizedAttention",
           "FEATURE_MAPS", "FeatureMap", "HedgehogMap", "RMSNorm", "GatedOutputNorm", "ShortConv"]
