"""Causal language models built from a layer pattern of linattn.layers mixers.

    cfg = LMConfig(vocab_size=64, d_model=128, n_layers=4, mixer="gla", hybrid=1)
    model = CausalLM(cfg)            # layers: gla, attention, gla, attention
    logits = model(input_ids)        # [B, T, 64] float32
"""
from .config import LMConfig
from .lm import Block, CausalLM, SwiGLU

__all__ = ["LMConfig", "CausalLM", "Block", "SwiGLU"]
