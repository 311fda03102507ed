"""LinAttnForCausalLM: a linattn CausalLM as a transformers PreTrainedModel with generate()."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ..layers.lightning import LightningAttention, alibi_slopes
from ..models import CausalLM, LMConfig
from .cache import LinAttnCache, is_padded_attention_state, padded_attention_step, stack_rows
from .configuration import LinAttnConfig


@dataclass
class LinAttnCausalLMOutput(ModelOutput):
    """loss: scalar float32 (with labels); logits [B, T', vocab] float32 (T' = logits_to_keep or
    T); cache: LinAttnCache (use_cache) or None; past_key_values: the same cache, under the
    name transformers releases before 5.2x read it by."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: LinAttnCache | None = None
    past_key_values: LinAttnCache | None = None


class LinAttnPreTrainedModel(PreTrainedModel):
    config_class = LinAttnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = False

    def _init_weights(self, module):
        """CausalLM initialises its own weights when built; what transformers builds on the
        meta device and does not load (Lightning's fixed decays, a non-persistent buffer) is
        recomputed here."""
        if isinstance(module, LightningAttention):
            n = module.n_layers
            depth = 1.0 - module.layer_idx / (n - 1) + 1e-5 if n > 1 else 1.0
            module.log_decay = (-alibi_slopes(module.n_heads) * depth).to(
                device=module.q_proj.weight.device)


class LinAttnForCausalLM(LinAttnPreTrainedModel, GenerationMixin):
    """A linattn CausalLM (`self.model`, linattn.models.CausalLM) behind transformers' API.

    forward(input_ids [B, T] int64, attention_mask [B, T_total] 0/1 (None: all ones),
            cache LinAttnCache (None: start), use_cache, labels [B, T] int64 (-100 ignored),
            inputs_embeds [B, T, d_model] instead of input_ids, logits_to_keep int)
        -> LinAttnCausalLMOutput(loss, logits [B, T or logits_to_keep, vocab] float32, cache).

    labels give transformers' shifted loss: mean cross-entropy of logits[:, t] against
    labels[:, t + 1] over labels != -100.

    attention_mask covers the cache's columns and the new ones (as generate() builds it). The
    first call (no cache) may be left-padded: rows are then run one at a time on their own
    tokens, so padding never enters a state, and logits at padded positions are 0. Calls that
    continue a cache take new tokens without padding (ValueError otherwise).

    generate(): transformers' generate with this model's LinAttnCache (greedy, sampling,
    top-k/top-p, repetition penalty, stopping criteria, beam search, streamers...). Each step
    is one call of every mixer with T = 1, which on CUDA runs linattn's fused decode step
    kernels (linattn.ops.decode) under no_grad.
    """

    def __init__(self, config: LinAttnConfig):
        super().__init__(config)
        lm_config = config.to_lm_config()
        if lm_config.pos_embed != "none":
            raise ValueError(f"linattn.hf runs models without learned positions (pos_embed 'none'), "
                             f"got pos_embed {lm_config.pos_embed!r}: its cache keeps no position")
        self.model = CausalLM(lm_config)
        self.post_init()

    @classmethod
    def from_causal_lm(cls, model: CausalLM, **config_kwargs) -> "LinAttnForCausalLM":
        """Wraps a trained CausalLM (its weights copied bitwise); config_kwargs go to LinAttnConfig."""
        hf = cls(LinAttnConfig.from_lm_config(model.config, **config_kwargs))
        hf.model.load_state_dict(model.state_dict())
        return hf.to(next(model.parameters()).device)

    @property
    def lm_config(self) -> LMConfig:
        return self.model.config

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is a LinAttnCache, made by forward

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, labels=None,
                inputs_embeds=None, logits_to_keep: int = 0, return_dict=None, past_key_values=None,
                position_ids=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, d_model]")
        if input_ids is not None:
            self.model._check_ids(input_ids)
            h = None
            B, T = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
                raise ValueError(f"inputs_embeds must be [B, T, d_model={self.config.d_model}], "
                                 f"got {tuple(inputs_embeds.shape)}")
            h = inputs_embeds
            B, T = h.shape[:2]
        new_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be [B={B}, >= T={T}] (the cache's columns and the "
                                 f"new ones), got {tuple(attention_mask.shape)}")
            new_mask = attention_mask[:, -T:].bool()                            # [B, T]
        padded = new_mask is not None and not bool(new_mask.all())
        if cache is not None and cache.seen_tokens > 0:
            if padded:
                raise ValueError("attention_mask: tokens after the first call must not be padding "
                                 "(pad on the left of the prompt only)")
            h, states = self._run(input_ids, h, cache.states)
            cache.states, cache.seen_tokens = states, cache.seen_tokens + T
        elif padded:
            h, states = self._run_rows(input_ids, h, new_mask)
            cache = LinAttnCache(states, T)
        else:
            h, states = self._run(input_ids, h, None, want_state=use_cache)
            cache = LinAttnCache(states, T) if use_cache else None
        if not use_cache:
            cache = None
        keep = logits_to_keep if (logits_to_keep and labels is None) else T
        logits = self.model._logits(h[:, T - keep:])                          # [B, keep, vocab]
        if padded:
            logits = logits.masked_fill(~new_mask[:, T - keep:, None], 0.0)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        out = LinAttnCausalLMOutput(loss=loss, logits=logits, cache=cache, past_key_values=cache)
        return out if return_dict is not False else out.to_tuple()

    # ------------------------------------------------------------------ the block loop

    def _run(self, input_ids, h, states, want_state=True):
        """Every block on ids [B, T] (or embeddings h) from `states` (None: fresh). Returns
        (hidden states [B, T, d_model] before the final norm, new states (None when not
        want_state))."""
        lm = self.model
        if h is None:
            h = lm.embed_ids(input_ids)                                          # [B, T, d]
        states = [None] * len(lm.blocks) if states is None else states
        new_states = []
        for block, s in zip(lm.blocks, states):
            if is_padded_attention_state(s):
                y, s = padded_attention_step(block.mixer, block.mixer_norm(h), s)
                h = block.feed_forward(h + y)
            else:
                h, s = block(h, state=s, return_state=want_state)
            new_states.append(s)
        return h, (new_states if want_state else None)

    def _run_rows(self, input_ids, h, mask):
        """Left-padded first call: each row on its own tokens (mask [B, T] bool). Models without
        softmax attention run the rows packed along time (cu_seqlens, one call per layer);
        hybrids run them one at a time (attention keeps no per-row cache under cu_seqlens) and
        stack the states. Returns (hidden states [B, T, d_model], 0 at padded positions; the
        states of the B rows)."""
        B, T = mask.shape
        lengths = mask.sum(dim=1)                                                # [B]
        if bool((lengths == 0).any()):
            raise ValueError(f"attention_mask row {int((lengths == 0).nonzero()[0])} has no token")
        if "attention" not in self.lm_config.layer_pattern():
            cu = F.pad(lengths.cumsum(0), (1, 0))                               # [B + 1]
            packed = self.model.embed_ids(input_ids[mask]) if h is None else h[mask]  # [N, d], row-major
            x = packed[None]                                                     # [1, N, d]
            states = []
            for block in self.model.blocks:
                x, s = block(x, cu_seqlens=cu, return_state=True)
                states.append(s)
            out = x.new_zeros(B, T, x.shape[-1])
            out[mask] = x[0]
            return out, states
        out, row_states = None, []
        for b in range(B):
            keep = mask[b]
            hb, s = self._run(None if input_ids is None else input_ids[b:b + 1, keep],
                              None if h is None else h[b:b + 1, keep], None)
            if out is None:
                out = hb.new_zeros(B, T, hb.shape[-1])
            out[b, keep] = hb[0]
            row_states.append(s)
        states = [stack_rows([rs[i] for rs in row_states]) for i in range(len(self.model.blocks))]
        return out, states
