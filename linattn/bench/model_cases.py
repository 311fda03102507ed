"""The model bench's cases as data: CASES, our CausalLM with each mixer, the same model with
softmax attention, and the same model whose linear layers are fla's (fla.layers, wrapped by
FlaMixer to our mixer contract), each with its builder, the module it needs, the case it is
compared with and its FLOP model (training_flops).

Adding a case: append one Case to CASES (ours with _ours(name, mixer), an fla layer with
_fla(kind, mixer, peer) and its branch in fla_layer); a new mixer also needs its FLOP model
in MIXER_ALGO.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .flops import flops_per_token
from .op_cases import fla_gated_switch


@dataclass(frozen=True)
class ModelSize:
    """A CausalLM's shape: n_layers blocks of width d_model with n_heads heads (head dim
    d_model // n_heads), over a vocabulary of vocab tokens."""
    n_layers: int
    d_model: int
    n_heads: int
    vocab: int = 32000


# ============================================================================ FLOPs

# The FLOP model (linattn.bench.flops.FLOP_MODELS) of each mixer's sequence mixing.
MIXER_ALGO = {"attention": "softmax", "gated_deltanet": "delta", "deltanet": "delta", "gla": "gla",
              "mlstm": "gla", "mlstm_sig": "gla", "lightning": "gla"}


def matmul_params(model) -> int:
    """N of 6N: every parameter, an untied input embedding excepted (a tied one is the LM
    head's matrix and counts once)."""
    n = sum(p.numel() for p in model.parameters())
    head = getattr(model, "lm_head", None)
    return n - model.embed.weight.numel() if head is not None else n


def mixing_layers(model) -> list:
    """(algorithm, heads, K, V) of every layer's sequence mixing, read from the built layers
    (an fla layer by its num_heads, head_k_dim and head_v_dim; the algorithm is that of the
    mixer it stands for)."""
    out = []
    for block in model.blocks:
        m = block.mixer
        if isinstance(m, FlaMixer):
            H, K, V = m.layer.num_heads, m.layer.head_k_dim, m.layer.head_v_dim
        else:
            H, K, V = m.n_heads, getattr(m, "key_dim", m.head_dim), getattr(m, "value_dim", m.head_dim)
        out.append((MIXER_ALGO[block.mixer_name], H, K, V))
    return out


def model_flops(layers: list, T: int, n_params: int) -> dict:
    """Training FLOPs per token: 6 N (the matmuls with the weights, forward and backward)
    plus 3x the forward sequence mixing of every layer, `layers` as mixing_layers gives them."""
    mixing = sum(H * flops_per_token(algo, K, V, T) for algo, H, K, V in layers)
    dense = 6.0 * n_params
    return {"flops_per_token_dense": dense, "flops_per_token_mixing": 3.0 * mixing,
            "flops_per_token": dense + 3.0 * mixing}


def mfu(flops_per_token: float, tokens_per_s: float, peak_TFLOPs: float) -> float:
    """Model FLOPs utilisation: the model's FLOP rate over the measured matmul rate."""
    return flops_per_token * tokens_per_s / (peak_TFLOPs * 1e12)


def describe_pattern(model) -> str:
    """'gated_deltanet x9, attention x3' (an fla layer by its class: 'fla.GatedDeltaNet x9')."""
    names = [f"fla.{type(b.mixer.layer).__name__}" if isinstance(b.mixer, FlaMixer) else b.mixer_name
             for b in model.blocks]
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    return ", ".join(f"{n} x{c}" for n, c in counts.items())


def training_flops(model, T: int) -> dict:
    """A built model's training FLOPs per token at sequence length T (model_flops of its
    mixing_layers and matmul_params)."""
    return model_flops(mixing_layers(model), T, matmul_params(model))


# ============================================================================ cases

@dataclass(frozen=True)
class Case:
    """One benchmarked model. family: ours | sdpa | fla. mixer and hybrid: the LMConfig
    layer pattern (for an fla case: the pattern of the model it is compared with; its layers
    named `mixer` are fla's). peer: the case this one is compared with (an fla case names
    ours). build(size, T, backend) -> the model: a CausalLM (its mixers may be FlaMixers).
    flops(model, T) -> its training FLOPs per token (training_flops: 6 N + 3x the built
    layers' sequence mixing). needs: a module that must be importable for it to run."""
    name: str
    family: str
    mixer: str
    build: Callable
    hybrid: int | None = None
    needs: str | None = None
    peer: str | None = None
    flops: Callable = training_flops


def build_ours(size: ModelSize, T: int, backend: str, *, mixer: str, hybrid: int | None = None,
               save_for_backward: str = "states"):
    """Our CausalLM with `mixer` in every layer (every (hybrid+1)-th layer attention), its ops
    keeping or recomputing their chunk states for the backward (LMConfig.save_for_backward)."""
    from ..models import CausalLM, LMConfig
    cfg = LMConfig(vocab_size=size.vocab, d_model=size.d_model, n_layers=size.n_layers,
                   n_heads=size.n_heads, mixer=mixer, hybrid=hybrid, max_seq_len=T, backend=backend,
                   save_for_backward=save_for_backward)
    return CausalLM(cfg)


class FlaMixer(nn.Module):
    """An fla layer behind our mixer contract, for training benchmarks:
    y, None = mixer(x [B, T, d_model], state=None, cu_seqlens=None, return_state=False),
    y [B, T, d_model] (fla's dtype under autocast). States are not carried (ValueError)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        if state is not None or return_state:
            raise ValueError("FlaMixer wraps an fla layer for training benchmarks: "
                             "state must be None and return_state False")
        kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        return self.layer(x, **kw)[0], None


def fla_layer(kind: str, d_model: int, n_heads: int, layer_idx: int):
    """fla's layer `kind` at our layers' dims (head dim d_model // n_heads, K and V as our
    mixer of that kind, output gate and short conv where ours have them)."""
    hd = d_model // n_heads
    if kind == "GatedDeltaNet":
        from fla.layers import GatedDeltaNet
        return GatedDeltaNet(hidden_size=d_model, num_heads=n_heads, head_dim=hd, expand_v=1.0,
                             use_gate=True, use_short_conv=True, conv_size=4, layer_idx=layer_idx)
    if kind == "DeltaNet":
        from fla.layers import DeltaNet
        return DeltaNet(hidden_size=d_model, num_heads=n_heads, expand_k=1.0, expand_v=1.0,
                        use_gate=True, use_short_conv=True, conv_size=4, qk_activation="silu",
                        qk_norm="l2", layer_idx=layer_idx)
    if kind == "GatedLinearAttention":
        from fla.layers import GatedLinearAttention
        return GatedLinearAttention(hidden_size=d_model, num_heads=n_heads, expand_k=0.5, expand_v=1.0,
                                    use_short_conv=False, use_output_gate=True, gate_fn="swish",
                                    gate_low_rank_dim=16, gate_logit_normalizer=16, layer_idx=layer_idx)
    if kind == "SimpleGatedLinearAttention":        # scalar data-dependent decay: mLSTMsig's work
        from fla.layers.simple_gla import SimpleGatedLinearAttention
        return SimpleGatedLinearAttention(hidden_size=d_model, num_heads=n_heads, expand_k=1.0,
                                          expand_v=1.0, use_short_conv=False, gate_fn="swish",
                                          layer_idx=layer_idx)
    if kind == "MultiScaleRetention":               # constant per-head decay: Lightning's work
        from fla.layers import MultiScaleRetention
        return MultiScaleRetention(hidden_size=d_model, num_heads=n_heads, expand_k=1.0, expand_v=1.0,
                                   use_short_conv=False, use_output_gate=True, gate_fn="swish",
                                   layer_idx=layer_idx)
    raise ValueError(f"unknown fla layer {kind!r}")


def build_fla(size: ModelSize, T: int, backend: str, *, kind: str, mixer: str, hybrid: int | None = None):
    """Our CausalLM with the pattern of (mixer, hybrid), whose `mixer` layers are fla's
    `kind` layer wrapped by FlaMixer (the attention layers and everything else are ours)."""
    fla_gated_switch()
    model = build_ours(size, T, backend, mixer=mixer, hybrid=hybrid)
    for i, block in enumerate(model.blocks):
        if block.mixer_name == mixer:
            block.mixer = FlaMixer(fla_layer(kind, size.d_model, size.n_heads, i))
    return model


def _ours(name, mixer, hybrid=None, family="ours", save_for_backward="states"):
    return Case(name, family, mixer, functools.partial(build_ours, mixer=mixer, hybrid=hybrid,
                                                       save_for_backward=save_for_backward), hybrid)


def _fla(kind, mixer, peer, hybrid=None, name=None):
    return Case(name or f"fla.{kind}", "fla", mixer,
                functools.partial(build_fla, kind=kind, mixer=mixer, hybrid=hybrid), hybrid,
                needs="fla.layers", peer=peer)


HYBRID = "gated_deltanet_3:1_attention"
# In order: attention (the reference), then each of ours beside its fla peer.
CASES = {c.name: c for c in [
    _ours("attention", "attention", family="sdpa"),
    _ours("gated_deltanet", "gated_deltanet"),
    _fla("GatedDeltaNet", "gated_deltanet", "gated_deltanet"),
    _ours("gated_deltanet_recompute", "gated_deltanet", save_for_backward="recompute"),
    _ours(HYBRID, "gated_deltanet", hybrid=3),
    _fla("GatedDeltaNet", "gated_deltanet", HYBRID, hybrid=3, name="fla.GatedDeltaNet_3:1_attention"),
    _ours("gla", "gla"),
    _fla("GatedLinearAttention", "gla", "gla"),
    _ours("deltanet", "deltanet"),
    _fla("DeltaNet", "deltanet", "deltanet"),
    _ours("mlstm_sig", "mlstm_sig"),
    _fla("SimpleGatedLinearAttention", "mlstm_sig", "mlstm_sig"),
    _ours("lightning", "lightning"),
    _fla("MultiScaleRetention", "lightning", "lightning"),
    _ours("mlstm", "mlstm"),
]}
