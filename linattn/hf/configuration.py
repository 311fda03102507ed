"""LinAttnConfig: linattn's LMConfig as a transformers PretrainedConfig (model_type "linattn")."""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from ..models import LMConfig

# LMConfig's fields, in order; LinAttnConfig carries each under the same name.
LM_FIELDS = tuple(f.name for f in dataclasses.fields(LMConfig))


class LinAttnConfig(PretrainedConfig):
    """A linattn causal LM's configuration for transformers.

    It takes LMConfig's fields under their own names (vocab_size, d_model, n_layers, n_heads,
    mixer, layers, hybrid, mlp_ratio, max_seq_len, sliding_window, feature_map, backend,
    tie_embeddings, norm_eps, init_std, mixer_options, mlp_hidden, norm, pos_embed, identity_mlp,
    embed_dropout, init, save_for_backward; see linattn.models.LMConfig), with
    transformers' names as aliases: hidden_size -> d_model, num_hidden_layers -> n_layers,
    num_attention_heads -> n_heads. LMConfig's defaults apply (vocab_size defaults to 257, the
    byte-level text task's vocabulary).

    task: the linattn task the model was trained on (Task.to_dict()), or None; `linattn
        generate` and the tokenizer choice read it.
    bos/eos/pad_token_id default to 0 (token 0 is BOS and padding in every linattn task;
        the text task also ends each document with it). eos_token_id None never stops early.

    The embedding tie is LMConfig's tie_embeddings (the LM reads its head from the embedding
    matrix, no second parameter), so transformers' tie_word_embeddings is always False.
    """

    model_type = "linattn"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers",
                     "num_attention_heads": "n_heads"}

    def __init__(self, vocab_size: int = 257, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 mixer: str = "gated_deltanet", layers: list | None = None, hybrid: int | None = None,
                 mlp_ratio: float = 4.0, max_seq_len: int = 2048, sliding_window: int | None = None,
                 feature_map: str = "elu", backend: str = "auto", tie_embeddings: bool = True,
                 norm_eps: float = 1e-6, init_std: float = 0.02, mixer_options: dict | None = None,
                 mlp_hidden: int | None = None, norm: str = "rms", pos_embed: str = "none",
                 identity_mlp: bool = False, embed_dropout: float = 0.0, init: str = "default",
                 save_for_backward: str = "states", task: dict | None = None, bos_token_id: int | None = 0, eos_token_id: int | None = 0,
                 pad_token_id: int | None = 0, use_cache: bool = True, **kwargs):
        kwargs.pop("tie_word_embeddings", None)
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.mixer = mixer
        self.layers = None if layers is None else list(layers)
        self.hybrid, self.mlp_ratio, self.max_seq_len = hybrid, mlp_ratio, max_seq_len
        self.sliding_window, self.feature_map, self.backend = sliding_window, feature_map, backend
        self.tie_embeddings, self.norm_eps, self.init_std = tie_embeddings, norm_eps, init_std
        self.mixer_options = dict(mixer_options or {})
        self.mlp_hidden = mlp_hidden
        self.norm, self.pos_embed, self.identity_mlp = norm, pos_embed, identity_mlp
        self.embed_dropout, self.init = embed_dropout, init
        self.save_for_backward = save_for_backward
        self.task = task
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=False, **kwargs)
        self.to_lm_config()  # validates: a bad field is a ValueError naming it

    def to_lm_config(self) -> LMConfig:
        """The LMConfig these fields describe (validated; ValueError names a bad field)."""
        return LMConfig.from_dict({name: getattr(self, name) for name in LM_FIELDS})

    @classmethod
    def from_lm_config(cls, lm_config: LMConfig, **kwargs) -> "LinAttnConfig":
        """A LinAttnConfig with lm_config's fields; kwargs add transformers' settings (task, eos_token_id, ...)."""
        return cls(**lm_config.to_dict(), **kwargs)
