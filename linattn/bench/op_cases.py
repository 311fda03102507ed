"""The op bench's cases as data: OPS, one OpCase per timed op (ours per gate kind, softmax
attention through SDPA, fla's ops, mlstm_kernels' TFLA), each with its builder, the module
it needs and its FLOP and byte model.

A training case's build(shape, gen) returns (inputs, fn): the leaf tensors (those with
requires_grad get gradients) and a callable that runs the op once and returns its output
(a tensor or a tuple). A decoding case's returns (state, fn): the float32 state
[B, H, D, D] the step reads and writes, and the step. Inputs are bf16 on CUDA, drawn from
`gen` (a torch.Generator on the device); shape is a Shape(B, T, H, D) with K = V = D.

Adding a case: write (or reuse) a builder below and append one OpCase to OPS.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

from .flops import BETA_BYTES, DECAY_BYTES, FLOP_MODELS, MLSTM_GATE_BYTES, FlopModel, Gate


@dataclass(frozen=True)
class Shape:
    """One row's shape: B sequences of T tokens, H heads of head dim D (K = V = D)."""
    B: int
    T: int
    H: int
    D: int

    @property
    def label(self) -> str:
        return f"B{self.B} T{self.T} H{self.H} D{self.D}"


@dataclass(frozen=True)
class OpCase:
    """One timed op. family: ours | sdpa | fla | tfla. variant: what it computes (ours and a
    peer of the same variant are compared). flops: its FLOP model; gates: its gate inputs
    (the byte model). needs: a module that must be importable for it to run. build: see
    the module's docstring."""
    name: str
    family: str
    variant: str
    flops: FlopModel
    build: Callable
    gates: tuple = ()
    needs: str | None = None
    decode: bool = False


# ============================================================================ inputs

def _randn(gen, *dims):
    import torch
    return torch.randn(*dims, device=gen.device, generator=gen, dtype=torch.float32)


def _qkv(s: Shape, gen, heads_first=False, unit_keys=False):
    """q, k, v bf16 leaves, [B, T, H, D] ([B, H, T, D] with heads_first); unit_keys
    L2-normalises k (the delta rule's callers do)."""
    import torch
    dims = (s.B, s.H, s.T, s.D) if heads_first else (s.B, s.T, s.H, s.D)
    q, k, v = (_randn(gen, *dims) for _ in range(3))
    if unit_keys:
        k = torch.nn.functional.normalize(k, dim=-1)
    return [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]


def _gate(kind: str, s: Shape, gen, heads_first=False):
    """Gates like a real model's: log-decays logsigmoid(randn) float32 ([H], [B, T, H] or
    per-key [B, T, H, D] / 16), beta and mLSTM's i bf16 [B, T, H], f = randn + 3 (TFLA's
    forget-gate bias range)."""
    import torch
    F = torch.nn.functional
    bth = (s.B, s.H, s.T) if heads_first else (s.B, s.T, s.H)
    make = {"const": lambda: F.logsigmoid(_randn(gen, s.H)),
            "scalar": lambda: F.logsigmoid(_randn(gen, *bth)),
            "key": lambda: F.logsigmoid(_randn(gen, s.B, s.T, s.H, s.D)) / 16,
            "beta": lambda: torch.sigmoid(_randn(gen, *bth)).to(torch.bfloat16),
            "i": lambda: _randn(gen, *bth).to(torch.bfloat16),
            "f": lambda: (_randn(gen, *bth) + 3).to(torch.bfloat16)}
    return make[kind]().requires_grad_()


def fla_gated_switch():
    """fla 0.6.0 refuses its gated backward on Hopper with triton < 3.7.1; the bench forces
    it on to time it (its gradients may be wrong there: timing only)."""
    import fla.ops.common.chunk_o as chunk_o
    chunk_o.TRITON_ABOVE_3_7_1 = True


# ============================================================================ builders: ours

def _ours_linear(s, gen, *, gate=None, frozen=False):
    import linattn
    q, k, v = _qkv(s, gen)
    g = None if gate is None else _gate(gate, s, gen)
    if frozen:
        g = g.detach()                                        # no gradient for the decay
    return [q, k, v] + ([g] if g is not None else []), \
        lambda: linattn.linear_attention(q, k, v, g, backend="triton")


def _ours_mlstm(s, gen, *, input_gate):
    import linattn
    q, k, v = _qkv(s, gen)
    i, f = _gate("i", s, gen), _gate("f", s, gen)
    return [q, k, v, i, f], lambda: linattn.mlstm(q, k, v, i, f, input_gate=input_gate, backend="triton")


def _ours_delta(s, gen, *, gated):
    import linattn
    q, k, v = _qkv(s, gen, unit_keys=True)
    beta = _gate("beta", s, gen)
    g = _gate("scalar", s, gen) if gated else None
    return [q, k, v, beta] + ([g] if g is not None else []), \
        lambda: linattn.delta_rule(q, k, v, beta, g, backend="triton")


def _sdpa(s, gen, *, flash):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    q, k, v = _qkv(s, gen, heads_first=True)                  # [B, H, T, D]
    if flash:
        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return [q, k, v], run
    return [q, k, v], lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


# ============================================================================ builders: peers

def _fla_linear_attn(s, gen):
    fla_gated_switch()
    from fla.ops.linear_attn import chunk_linear_attn
    q, k, v = _qkv(s, gen)
    return [q, k, v], lambda: chunk_linear_attn(q, k, v, normalize=False)


def _fla_simple_gla(s, gen, *, g_gamma):
    fla_gated_switch()
    from fla.ops.simple_gla import chunk_simple_gla
    q, k, v = _qkv(s, gen)
    if g_gamma:
        g = _gate("const", s, gen).detach()                   # fla has no gradient for g_gamma
        return [q, k, v, g], lambda: chunk_simple_gla(q, k, v, g_gamma=g)
    g = _gate("scalar", s, gen)
    return [q, k, v, g], lambda: chunk_simple_gla(q, k, v, g=g)


def _fla_gla(s, gen):
    fla_gated_switch()
    from fla.ops.gla import chunk_gla
    q, k, v = _qkv(s, gen)
    g = _gate("key", s, gen)
    return [q, k, v, g], lambda: chunk_gla(q, k, v, g=g)


def _fla_delta(s, gen, *, gated):
    fla_gated_switch()
    q, k, v = _qkv(s, gen, unit_keys=True)                    # keys normalised as ours get them
    beta = _gate("beta", s, gen)
    if not gated:
        from fla.ops.delta_rule import chunk_delta_rule
        return [q, k, v, beta], lambda: chunk_delta_rule(q, k, v, beta)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    g = _gate("scalar", s, gen)
    return [q, k, v, g, beta], lambda: chunk_gated_delta_rule(q, k, v, g, beta)


def _tfla(s, gen, *, kernel, normalize):
    import torch
    from mlstm_kernels.torch import get_mlstm_kernel
    q, k, v = _qkv(s, gen, heads_first=True)                  # TFLA's layout [B, H, T, D]
    i, f = _gate("i", s, gen, heads_first=True), _gate("f", s, gen, heads_first=True)
    kern = get_mlstm_kernel(kernel)
    kw = {} if normalize else {"normalize": False}            # normalize=False: our mLSTMsig
    return [q, k, v, i, f], lambda: kern(q, k, v, i, f, chunk_size=128,
                                         autocast_kernel_dtype=torch.bfloat16, **kw)


# ============================================================================ builders: decoding

_STATE_NAMES = ("state", "initial_state", "h", "h0", "S", "s", "past_state")


def bind_by_name(fn, values: dict):
    """A partial of fn with the arguments named like the keys of `values` (bind by parameter
    name, the state under any of _STATE_NAMES). A required parameter with no value is a
    TypeError naming the signature."""
    sig = inspect.signature(fn)
    args, kwargs = [], {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        key = "state" if p.name in _STATE_NAMES else p.name
        if key not in values:
            if p.default is p.empty:
                raise TypeError(f"{getattr(fn, '__name__', fn)}{sig}: no value for {p.name!r}")
            continue
        if p.kind == p.POSITIONAL_ONLY:
            args.append(values[key])
        else:
            kwargs[p.name] = values[key]
    return functools.partial(fn, *args, **kwargs)


def _step_inputs(s: Shape, gen, delta: bool) -> dict:
    """One decoding step's inputs: q, k (unit), v bf16 [B, 1, H, D], g float32 [B, 1, H],
    beta bf16 [B, 1, H] (delta only), state float32 [B, H, D, D]."""
    import torch
    F = torch.nn.functional
    q, k, v = (x.detach() for x in _qkv(s, gen, unit_keys=True))
    g = F.logsigmoid(_randn(gen, s.B, 1, s.H))
    beta = torch.sigmoid(_randn(gen, s.B, 1, s.H)).to(torch.bfloat16)
    state = _randn(gen, s.B, s.H, s.D, s.D) * 0.1
    values = dict(q=q, k=k, v=v, g=g, state=state, scale=s.D ** -0.5)
    if delta:
        values["beta"] = beta
    return values


def _ours_decode(s, gen, *, fn_name, delta):
    from linattn.ops import decode
    values = _step_inputs(s, gen, delta)
    return values["state"], bind_by_name(getattr(decode, fn_name), values)


def _fla_decode_simple_gla(s, gen):
    from fla.ops.simple_gla import fused_recurrent_simple_gla
    x = _step_inputs(s, gen, delta=False)
    return x["state"], lambda: fused_recurrent_simple_gla(x["q"], x["k"], x["v"], g=x["g"],
                                                          initial_state=x["state"], output_final_state=True)


def _fla_decode_gated_delta(s, gen):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    x = _step_inputs(s, gen, delta=True)
    return x["state"], lambda: fused_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["state"], output_final_state=True)


# ============================================================================ the registry

P = functools.partial
GLA, DELTA, SOFTMAX, DECODE = (FLOP_MODELS[k] for k in ("gla", "delta", "softmax", "decode"))
G_CONST = Gate("g", "H", DECAY_BYTES)
G_FROZEN = Gate("g", "H", DECAY_BYTES, grad=False)            # a frozen constant decay (fla's g_gamma)
G_SCALAR = Gate("g", "BTH", DECAY_BYTES)
G_KEY = Gate("g", "BTHK", DECAY_BYTES)
BETA = Gate("beta", "BTH", BETA_BYTES)
MLSTM_IF = (Gate("i", "BTH", MLSTM_GATE_BYTES), Gate("f", "BTH", MLSTM_GATE_BYTES))
STEP_G = Gate("g", "BTH", DECAY_BYTES, grad=False)
STEP_BETA = Gate("beta", "BTH", BETA_BYTES, grad=False)

# In order of importance within a shape: ours first, then SDPA, then the peers.
OPS = [
    OpCase("linattn.linear_attention[none]", "ours", "no gate", GLA, _ours_linear),
    OpCase("linattn.linear_attention[const]", "ours", "constant gate [H]", GLA,
           P(_ours_linear, gate="const"), (G_CONST,)),
    OpCase("linattn.linear_attention[const-frozen]", "ours", "constant gate [H]", GLA,
           P(_ours_linear, gate="const", frozen=True), (G_FROZEN,)),
    OpCase("linattn.linear_attention[scalar]", "ours", "scalar gate [B,T,H]", GLA,
           P(_ours_linear, gate="scalar"), (G_SCALAR,)),
    OpCase("linattn.linear_attention[key]", "ours", "per-key gate [B,T,H,K]", GLA,
           P(_ours_linear, gate="key"), (G_KEY,)),
    OpCase("linattn.mlstm[sig]", "ours", "mLSTMsig", GLA, P(_ours_mlstm, input_gate="sigmoid"), MLSTM_IF),
    OpCase("linattn.mlstm[exp]", "ours", "mLSTMexp", GLA, P(_ours_mlstm, input_gate="exp"), MLSTM_IF),
    OpCase("linattn.delta_rule", "ours", "delta rule", DELTA, P(_ours_delta, gated=False), (BETA,)),
    OpCase("linattn.delta_rule[gated]", "ours", "gated delta rule", DELTA, P(_ours_delta, gated=True),
           (G_SCALAR, BETA)),
    OpCase("sdpa[default]", "sdpa", "softmax", SOFTMAX, P(_sdpa, flash=False)),
    OpCase("sdpa[flash]", "sdpa", "softmax", SOFTMAX, P(_sdpa, flash=True)),
    OpCase("fla.chunk_linear_attn", "fla", "no gate", GLA, _fla_linear_attn, (), "fla"),
    OpCase("fla.chunk_simple_gla[g_gamma]", "fla", "constant gate [H]", GLA,
           P(_fla_simple_gla, g_gamma=True), (G_FROZEN,), "fla"),
    OpCase("fla.chunk_simple_gla", "fla", "scalar gate [B,T,H]", GLA,
           P(_fla_simple_gla, g_gamma=False), (G_SCALAR,), "fla"),
    OpCase("fla.chunk_gla", "fla", "per-key gate [B,T,H,K]", GLA, _fla_gla, (G_KEY,), "fla"),
    OpCase("fla.chunk_delta_rule", "fla", "delta rule", DELTA, P(_fla_delta, gated=False), (BETA,), "fla"),
    OpCase("fla.chunk_gated_delta_rule", "fla", "gated delta rule", DELTA, P(_fla_delta, gated=True),
           (G_SCALAR, BETA), "fla"),
    OpCase("tfla.mlstmsig", "tfla", "mLSTMsig", GLA,
           P(_tfla, kernel="chunkwise--triton_xl_chunk_siging", normalize=False), MLSTM_IF, "mlstm_kernels"),
    OpCase("tfla.mlstmexp", "tfla", "mLSTMexp", GLA,
           P(_tfla, kernel="chunkwise--triton_xl_chunk", normalize=True), MLSTM_IF, "mlstm_kernels"),
    # one decoding step (T = 1) from a float32 state [B, H, D, D]
    OpCase("linattn.linear_attention_decode", "ours", "decode: scalar gate", DECODE,
           P(_ours_decode, fn_name="linear_attention_decode", delta=False), (STEP_G,),
           "linattn.ops.decode", decode=True),
    OpCase("linattn.delta_rule_decode", "ours", "decode: gated delta rule", DECODE,
           P(_ours_decode, fn_name="delta_rule_decode", delta=True), (STEP_G, STEP_BETA),
           "linattn.ops.decode", decode=True),
    OpCase("fla.fused_recurrent_simple_gla", "fla", "decode: scalar gate", DECODE,
           _fla_decode_simple_gla, (STEP_G,), "fla", decode=True),
    OpCase("fla.fused_recurrent_gated_delta_rule", "fla", "decode: gated delta rule", DECODE,
           _fla_decode_gated_delta, (STEP_G, STEP_BETA), "fla", decode=True),
]
OPS_BY_NAME = {c.name: c for c in OPS}
