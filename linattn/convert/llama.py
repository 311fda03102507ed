"""`linattn convert`: a Llama-family causal LM directory -> a linearized linattn.hf model directory.

Every weight the softmax Transformer has is reused one-to-one (bitwise):

    teacher (transformers)                         linattn.hf LinAttnForCausalLM
    model.embed_tokens.weight                      model.embed.weight
    model.layers.i.input_layernorm.weight          model.blocks.i.mixer_norm.weight
    model.layers.i.self_attn.{q,k,v,o}_proj.*      model.blocks.i.mixer.{q,k,v,o}_proj.*
    model.layers.i.post_attention_layernorm.weight model.blocks.i.mlp_norm.weight
    model.layers.i.mlp.{gate,up}_proj.weight       model.blocks.i.mlp.gate_up.weight (gate rows, then up)
    model.layers.i.mlp.down_proj.weight            model.blocks.i.mlp.down.weight
    model.norm.weight                              model.norm.weight
    lm_head.weight                                 model.lm_head.weight (absent when tied)

Grouped-query attention stays grouped: k_proj and v_proj keep their n_kv_heads rows, shared by
the query heads at run time. Each attention layer becomes a "linearized" mixer
(linattn.layers.LinearizedAttention) configured by the method, except the layers named in
keep_attention, which stay softmax attention ("attention" mixer, same weights).

Methods (our reading of the papers):
    liger            Lan et al. 2025: GLA on the pretrained q/k/v, the gate the key projection
                     itself (Liger pools k to its own width: no new parameter), softmax over the
                     head dim as the feature map of q and k, RoPE left out of the recurrence, and
                     no denominator (the plain GLA output, as Liger's code). Liger's released
                     models are liger-attention; this is the recurrence alone.
    liger-attention  Liger Attention: the same recurrence mixed 0.5/0.5 with sliding-window
                     (64) softmax attention on the rotated q, k inside each layer.
    hedgehog         Zhang et al. 2024: trainable Hedgehog feature maps (identity-initialised
                     [softmax(xW), softmax(-xW)]) on the rotated q, k, plain linear attention; the
                     maps are then trained to mimic the softmax weights (`linattn distill --stage
                     attention --loss weights`).
    lolcats          Zhang et al. 2024: Hedgehog maps (head_dim / 2 Kaiming-initialised features
                     per half, as its code) on the rotated q, k plus sliding-window
                     (64) softmax attention sharing one normalisation with the linear terms
                     outside the window, the window's terms weighted by a trainable per-head
                     factor sigmoid(w) starting at 0.1; attention transfer (MSE on the attention
                     outputs), then LoRA.
docs/linearization.md compares each with its authors' code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

METHODS = ("liger", "liger-attention", "hedgehog", "lolcats")
CONVERT_MIXERS = ("gla", "gated_deltanet", "linear")
SUPPORTED = ("llama", "qwen2", "mistral")
DEFAULT_WINDOW = 64


def method_options(method: str, mixer: str | None = None, window: int | None = None,
                   head_dim: int | None = None) -> dict:
    """The "linearized" mixer's options for a method; mixer None takes the method's own
    recurrence (gla for Liger, linear for Hedgehog and LoLCATs), window None its default.
    LoLCATs' maps have head_dim / 2 Kaiming-initialised features per half (its fd64 at head
    dim 128), so it needs head_dim."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mixer is not None and mixer not in CONVERT_MIXERS:
        raise ValueError(f"mixer must be one of {CONVERT_MIXERS}, got {mixer!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int, got {window!r}")
    if method in ("liger", "hedgehog") and window is not None:
        raise ValueError(f"method {method} has no sliding window; --window is for liger-attention and lolcats")
    liger = method.startswith("liger")
    opts = {"recurrence": mixer or ("gla" if liger else "linear"),
            "feature_map": "softmax" if liger else "hedgehog", "rope_linear": not liger,
            "normalize": not liger}
    if method in ("liger-attention", "lolcats"):
        opts.update(window=window or DEFAULT_WINDOW, combine="mix" if liger else "shared", mix=0.5)
    if method == "lolcats":
        if head_dim is None or head_dim < 2:
            raise ValueError(f"method lolcats needs the head dim (>= 2) for its feature maps, got {head_dim!r}")
        opts.update(map_dim=head_dim // 2, map_init="kaiming")
    return opts


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ValueError(f"RoPE type {kind!r} (rope scaling) is not supported; only the default RoPE is")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def lm_config_for(cfg, method: str, mixer: str | None = None, window: int | None = None,
                  keep_attention=()):
    """The linattn LMConfig of the converted model, from the teacher's transformers config."""
    from ..models import LMConfig

    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"linattn convert reads the Llama family ({', '.join(SUPPORTED)}); "
                         f"got model_type {cfg.model_type!r}")
    H, d = cfg.num_attention_heads, cfg.hidden_size
    if getattr(cfg, "head_dim", None) not in (None, d // H) or d % H:
        raise ValueError(f"head_dim={cfg.head_dim} != hidden_size / num_attention_heads = {d // H} is not supported")
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        raise ValueError("only Llama's SwiGLU MLP (hidden_act silu, no mlp_bias) is supported")
    keep = sorted(set(int(i) for i in keep_attention))
    bad = [i for i in keep if not 0 <= i < cfg.num_hidden_layers]
    if bad:
        raise ValueError(f"keep_attention: layers {bad} out of range [0, {cfg.num_hidden_layers})")
    qkv_bias = cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))
    o_bias = cfg.model_type != "qwen2" and bool(getattr(cfg, "attention_bias", False))
    shared = {"n_kv_heads": cfg.num_key_value_heads or H, "qkv_bias": qkv_bias, "o_bias": o_bias,
              "rope_theta": _rope_theta(cfg)}
    window_attn = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        window_attn = None
    if window_attn is not None and window_attn >= cfg.max_position_embeddings:
        window_attn = None
    lin = dict(shared, **method_options(method, mixer, window, head_dim=d // H))
    return LMConfig(vocab_size=cfg.vocab_size, d_model=d, n_layers=cfg.num_hidden_layers, n_heads=H,
                    mixer="linearized",
                    layers=["attention" if i in keep else "linearized" for i in range(cfg.num_hidden_layers)],
                    mlp_ratio=cfg.intermediate_size / d, mlp_hidden=cfg.intermediate_size,
                    max_seq_len=cfg.max_position_embeddings, sliding_window=window_attn,
                    tie_embeddings=bool(cfg.tie_word_embeddings), norm_eps=float(cfg.rms_norm_eps),
                    mixer_options={"linearized": lin, "attention": dict(shared)})


def weight_map(n_layers: int, tied: bool) -> list[tuple[str, list[str]]]:
    """(our parameter name, [teacher names concatenated on dim 0]) for every mapped weight;
    bias names are added by copy_weights when the teacher has them."""
    rows = [("model.embed.weight", ["model.embed_tokens.weight"]), ("model.norm.weight", ["model.norm.weight"])]
    if not tied:
        rows.append(("model.lm_head.weight", ["lm_head.weight"]))
    for i in range(n_layers):
        t, o = f"model.layers.{i}.", f"model.blocks.{i}."
        rows += [(o + "mixer_norm.weight", [t + "input_layernorm.weight"]),
                 (o + "mlp_norm.weight", [t + "post_attention_layernorm.weight"]),
                 (o + "mlp.gate_up.weight", [t + "mlp.gate_proj.weight", t + "mlp.up_proj.weight"]),
                 (o + "mlp.down.weight", [t + "mlp.down_proj.weight"])]
        for p in "qkvo":
            rows += [(o + f"mixer.{p}_proj.{kind}", [t + f"self_attn.{p}_proj.{kind}"]) for kind in ("weight", "bias")]
    return rows


@torch.no_grad()
def copy_weights(student, teacher) -> list[str]:
    """Copies the teacher's weights into the student (a LinAttnForCausalLM) by weight_map.
    Returns the student's parameter names that no teacher weight filled (the method's new
    parameters). ValueError on a teacher weight left unused or a shape mismatch."""
    src = dict(teacher.state_dict())
    dst = dict(student.named_parameters())
    tied = student.config.tie_embeddings
    used, filled = set(), set()
    for ours, theirs in weight_map(student.config.n_layers, tied):
        if ours not in dst:
            if any(name in src for name in theirs) and ours.endswith(".bias"):
                raise ValueError(f"teacher has {theirs[0]} but the converted layer has no bias")
            continue
        missing = [name for name in theirs if name not in src]
        if missing:
            raise ValueError(f"teacher checkpoint lacks {missing}")
        value = torch.cat([src[name] for name in theirs]) if len(theirs) > 1 else src[theirs[0]]
        if value.shape != dst[ours].shape:
            raise ValueError(f"{theirs} has shape {tuple(value.shape)}, {ours} needs {tuple(dst[ours].shape)}")
        dst[ours].copy_(value)
        used.update(theirs)
        filled.add(ours)
    left = sorted(n for n in src if n not in used and not (tied and n == "lm_head.weight")
                  and "rotary_emb" not in n)
    if left:
        raise ValueError(f"teacher weights with no place in the converted model: {left[:5]}")
    return sorted(n for n in dst if n not in filled)


def convert(src, out, method: str, mixer: str | None = None, window: int | None = None,
            keep_attention=()) -> Path:
    """Converts the causal LM directory src into a linattn.hf model directory out (config,
    weights in the teacher's dtype, tokenizer and generation config carried over). Returns out."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ..hf import LinAttnConfig, LinAttnForCausalLM

    src, out = Path(src), Path(out)
    cfg = AutoConfig.from_pretrained(src)
    lm_cfg = lm_config_for(cfg, method, mixer, window, keep_attention)
    teacher = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    dtype = next(teacher.parameters()).dtype
    record = {"method": method, "teacher": str(src), "keep_attention": sorted(set(keep_attention)),
              "teacher_model_type": cfg.model_type}
    hf_cfg = LinAttnConfig.from_lm_config(lm_cfg, task=None, bos_token_id=cfg.bos_token_id,
                                          eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                                          linearization=record)
    torch.manual_seed(0)
    student = LinAttnForCausalLM(hf_cfg).to(dtype)
    new = copy_weights(student, teacher)
    record["new_parameters"] = new
    student.config.linearization = record
    try:
        student.generation_config = GenerationConfig.from_pretrained(src)
    except OSError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    try:
        transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    except (OSError, ValueError):
        pass
    (out / "linearization.json").write_text(json.dumps(record, indent=2) + "\n")
    return out

