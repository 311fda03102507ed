"""LMConfig: everything needed to build a CausalLM, as a JSON-round-trippable dataclass."""
from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..layers import FEATURE_MAPS, MIXERS
from ..ops.api import BACKENDS, SAVE_FOR_BACKWARD


NORMS, POS_EMBEDS, INITS = ("rms", "layer"), ("none", "learned"), ("default", "gpt2")


@dataclass
class LMConfig:
    """A causal LM's shape and its layer pattern.

    Fields:
        vocab_size: number of token ids.
        d_model, n_layers, n_heads: width, depth, heads (d_model % n_heads == 0).
        mixer: the token mixer of every layer (a key of linattn.layers.MIXERS).
        layers: explicit per-layer mixer names (length n_layers); overrides mixer and hybrid.
        hybrid: N for an "N:1" hybrid: every (N+1)-th layer (layers N, 2N+1, ... 0-based) is
            "attention", the others are mixer; n_layers must be a multiple of N+1.
        mlp_ratio: SwiGLU hidden width = round(mlp_ratio * d_model); 0 means blocks without
            an MLP (mixer only, as Zoology's MQAR models).
        max_seq_len: the longest input forward() accepts.
        sliding_window: window of the attention layers (None: full causal).
        feature_map: feature map of the "linear" mixer (see linattn.layers.feature_maps).
        backend: op backend of every mixer ("auto" | "triton" | "torch" | "reference").
        tie_embeddings: share the embedding matrix with the LM head.
        norm_eps: RMSNorm epsilon.
        init_std: std of the normal init of the embedding (and an untied head).
        mixer_options: extra constructor options per mixer name, e.g.
            {"gla": {"expand_k": 1.0}}; applied to every layer of that mixer.
        mlp_hidden: SwiGLU hidden width given explicitly (a converted Llama's
            intermediate_size); None: from mlp_ratio. Ignored when mlp_ratio is 0.
        norm: the blocks' and the final norm: "rms" (RMSNorm) or "layer" (LayerNorm with a
            bias, as Zoology's and GPT-2's).
        pos_embed: "none", or "learned": absolute position embeddings (max_seq_len rows,
            init_std normal) added to the token embeddings, as Zoology's attention models;
            positions restart at each packed sequence.
        identity_mlp: with mlp_ratio 0, each block still adds its normed input where the MLP
            would be, x + norm(x), as Zoology's blocks whose state mixer is the identity.
        embed_dropout: dropout on the (token + position) embeddings while training.
        init: "default" (the embedding and an untied head normal(init_std), every other
            layer its constructor's init), or "gpt2" (Zoology's and GPT-2's): every Linear
            weight and embedding normal(init_std), Linear biases zero (but those a mixer lists
            in its init_kept), softmax attention's output projection normal(init_std /
            sqrt(2 n_layers)).
        save_for_backward: every linear mixer's memory-for-time trade on the Triton backend
            (linattn.linear_attention's argument): "states" (default) keeps each layer's
            chunk states from forward to backward, "recompute" recomputes them in the
            backward, lowering the training step's peak memory by what every layer would hold.
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mixer: str = "gated_deltanet"
    layers: list[str] | None = None
    hybrid: int | None = None
    mlp_ratio: float = 4.0
    max_seq_len: int = 2048
    sliding_window: int | None = None
    feature_map: str = "elu"
    backend: str = "auto"
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    mixer_options: dict[str, dict] = field(default_factory=dict)
    mlp_hidden: int | None = None
    norm: str = "rms"
    pos_embed: str = "none"
    identity_mlp: bool = False
    embed_dropout: float = 0.0
    init: str = "default"
    save_for_backward: str = "states"

    def __post_init__(self):
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)

    def layer_pattern(self) -> list[str]:
        """The mixer name of each layer, after validation."""
        self.validate()
        if self.layers is not None:
            return list(self.layers)
        if self.hybrid is not None:
            return ["attention" if (i + 1) % (self.hybrid + 1) == 0 else self.mixer
                    for i in range(self.n_layers)]
        return [self.mixer] * self.n_layers

    def mlp_width(self) -> int:
        """SwiGLU hidden width: mlp_hidden, else round(mlp_ratio * d_model); 0: no MLP."""
        if not self.mlp_ratio:
            return 0
        return self.mlp_hidden if self.mlp_hidden is not None else round(self.mlp_ratio * self.d_model)

    def mixer_kwargs(self, name: str) -> dict:
        """Constructor options for mixer `name`: the config-wide ones, then mixer_options."""
        kw = {}
        if name == "linear":
            kw["feature_map"] = self.feature_map
        if name == "attention":
            kw["window"] = self.sliding_window
        kw.update(self.mixer_options.get(name, {}))
        return kw

    def validate(self) -> None:
        """Raises ValueError with one line naming the first bad field."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        _known("mixer", self.mixer)
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or len(self.layers) != self.n_layers:
                raise ValueError(f"layers must be a list of n_layers={self.n_layers} mixer names, "
                                 f"got {self.layers!r}")
            for i, name in enumerate(self.layers):
                _known(f"layers[{i}]", name)
        if self.hybrid is not None:
            _positive_int("hybrid", self.hybrid)
            if self.layers is None and self.n_layers % (self.hybrid + 1):
                raise ValueError(f"hybrid={self.hybrid} means {self.hybrid}:1 blocks of "
                                 f"{self.hybrid + 1} layers, which do not tile n_layers={self.n_layers}")
        if not (isinstance(self.mlp_ratio, (int, float)) and not isinstance(self.mlp_ratio, bool)
                and (self.mlp_ratio == 0 or (self.mlp_ratio > 0 and round(self.mlp_ratio * self.d_model) >= 1))):
            raise ValueError(f"mlp_ratio must be 0 (no MLP) or > 0 (and give a hidden width >= 1), "
                             f"got {self.mlp_ratio!r}")
        if self.mlp_hidden is not None:
            _positive_int("mlp_hidden", self.mlp_hidden)
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if self.save_for_backward not in SAVE_FOR_BACKWARD:
            raise ValueError(f"save_for_backward must be one of {SAVE_FOR_BACKWARD}, got "
                             f"{self.save_for_backward!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("tie_embeddings", "identity_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.identity_mlp and self.mlp_ratio:
            raise ValueError(f"identity_mlp stands in for the MLP: it needs mlp_ratio 0, got {self.mlp_ratio!r}")
        for name, allowed in (("norm", NORMS), ("pos_embed", POS_EMBEDS), ("init", INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        v = self.embed_dropout
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"embed_dropout must be in [0, 1), got {v!r}")
        for name in ("norm_eps", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not isinstance(self.mixer_options, dict):
            raise ValueError(f"mixer_options must be a dict {{mixer name: {{option: value}}}}, got {self.mixer_options!r}")
        for name, opts in self.mixer_options.items():
            _known(f"mixer_options key {name!r}", name)
            if not isinstance(opts, dict):
                raise ValueError(f"mixer_options[{name!r}] must be a dict of constructor options, got {opts!r}")
            allowed = _mixer_options(name)
            bad = sorted(set(opts) - allowed)
            if bad:
                raise ValueError(f"mixer_options[{name!r}]: unknown option(s) {bad}; known: {sorted(allowed)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        """Builds and validates a config; unknown keys are a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"LMConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LMConfig field(s) {unknown}; known: {sorted(known)}")
        if "vocab_size" not in d:
            raise ValueError("LMConfig needs vocab_size")
        cfg = cls(**d)
        if cfg.layers is not None:
            cfg.layers = list(cfg.layers)
        cfg.validate()
        return cfg

    def save_json(self, path) -> None:
        self.validate()
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_json(cls, path) -> "LMConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


PRESETS = ("zoology",)
# the mixers whose layer has no short conv by default (conv_size 0), which "zoology" gives one
CONV_GIVEN = ("gla", "linear", "lightning", "mlstm", "mlstm_sig")


def preset_settings(name: str, settings: dict) -> dict:
    """Flat `linattn train` settings of a named preset, given the caller's own flat settings
    (which win over the preset's; the preset reads seq_len, mixer, layers and hybrid from
    them).

    "zoology": the MQAR recipe of Zoology's figure 2 (Arora et al., 2023; HazyResearch/zoology,
    zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py, zoology/model.py,
    zoology/train.py, zoology/mixers/attention.py), point by point:
      data: vocabulary 8192, keys from [1, 4096) and values from [4096, 8192), every key
        queried once at a power-law slot (a = 0.01), zeros between queries, loss and accuracy
        at the query positions only; fixed sets of 100,000 training and 3,000 test examples
        (linattn.tasks.mqar's "zoology" layout).
      model: two blocks of the mixer, each x + mixer(LayerNorm(x)) then x + LayerNorm(x)
        (Zoology's state mixer is the identity: no MLP, but its norm's output is still added
        to the residual), final LayerNorm, eps 1e-5; tied embeddings; dropout 0.1 on the
        embeddings; one head; init as GPT-2 (every Linear and embedding normal(0.02), biases
        zero, attention's output projection normal(0.02 / sqrt(2 n_layers))). Softmax
        attention as Zoology's MHA: biases on the q/k/v and output projections, no RoPE,
        dropout 0.1 on the attention probabilities, no conv; a model whose every layer is
        attention adds learned absolute position embeddings (Zoology: max_position_embeddings
        = T for attention, 0 for the other mixers). The other mixers keep their own short
        convs and gates; GLA, linear attention, Lightning and mLSTM (exp and sig), whose
        layers have no conv by default, get one on q, k and v (conv_size 4, fla's
        use_short_conv): Zoology's attention-free models put a conv before the mixer
        (BaseConv layers, the xLSTM block's causal conv), and without one nothing gives
        these mixers the shift from a key to the value after it.
      training: float32; AdamW, lr swept outside (Zoology: 1e-4 .. 1e-2, 4 log-spaced; softmax
        attention sits on the 1/P plateau, answering with one of the example's values, until
        a previous-token head forms from the learned positions: in Zoology's own code at T 64,
        lr 4.6e-4, for 14 of its 64 epochs; see BENCHMARKS.md), betas
        (0.9, 0.999), weight decay 0.1 on every parameter, no warmup, cosine to 0 stepped once
        per epoch, no gradient clipping; 64 epochs of batch 512 (T <= 128), 256 (T 256), 128
        (T 512) or 64 (T >= 1024); the whole test set evaluated after every epoch, training
        stopped once test accuracy reaches 0.99.
    Left different: Zoology's loader visits the training set in the same order every epoch
    and keeps the last partial batch, ours reshuffles each epoch and drops it; it stops when
    accuracy exceeds 0.99, this at >= 0.99; its data come from numpy's legacy generator (other
    draws from the same distribution); our mixers are linattn's, not Zoology's copies of fla's
    layers; Zoology's configs for the delta rule, Gated DeltaNet and GLA give them two heads and
    a Hybrid of its BaseConv (a short plus an implicit long conv) and the mixer, which takes
    layer 0 from BaseConv and layer 1 from the mixer; ours keep one head (with two, Gated
    DeltaNet stayed at chance at d_model 64, T 256 in our CPU runs where one head learned;
    n_heads overrides it) and two layers of the mixer with its own short conv.
    """
    if name != "zoology":
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    seq_len = settings.get("seq_len", 64)
    batch = 512 if seq_len <= 128 else 256 if seq_len <= 256 else 128 if seq_len <= 512 else 64
    layers = settings.get("layers") or [settings.get("mixer", LMConfig.mixer)]
    has_attention = "attention" in layers or settings.get("hybrid") is not None
    all_attention = set(layers) == {"attention"} and settings.get("hybrid") is None
    options = {}
    if has_attention:
        options["attention"] = {"qkv_bias": True, "o_bias": True, "rope": False, "dropout": 0.1}
    for mixer in CONV_GIVEN:
        if mixer in layers:
            options[mixer] = {"conv_size": 4}
    return {
        "n_layers": 2, "mlp_ratio": 0.0, "identity_mlp": True, "n_heads": 1, "norm": "layer",
        "norm_eps": 1e-5, "embed_dropout": 0.1, "init": "gpt2", "tie_embeddings": True,
        "pos_embed": "learned" if all_attention else "none",
        "mixer_options": options,
        "layout": "zoology", "vocab": 8_192, "power_a": 0.01,
        "train_examples": 100_000, "test_examples": 3_000,
        "epochs": 64.0, "batch_size": batch, "dtype": "float32",
        "weight_decay": 0.1, "decay_all": True, "beta2": 0.999, "warmup_steps": 0,
        "min_lr_ratio": 0.0, "lr_period": "epoch", "grad_clip": 0.0, "stop_at_accuracy": 0.99,
    }


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _mixer_options(name) -> set[str]:
    """Keyword options of mixer `name`'s constructor, less the ones the LM itself passes."""
    params = inspect.signature(MIXERS[name].__init__).parameters.values()
    kw = {p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY}
    return kw - {"backend", "layer_idx", "n_layers", "save_for_backward"}


def _known(what, name):
    if name not in MIXERS:
        raise ValueError(f"{what}: unknown mixer {name!r}; known: {sorted(MIXERS)}")
