"""The bench's physical model: FLOPs of each algorithm (FLOP_MODELS), the bytes an op must
move, and the floors a measured time or memory stands next to.

FLOPs count 2 per multiply-add, per token and head, forward only; a model's backward is
bwd_factor times its forward (the backward's matmuls are twice the forward's, nothing
recomputed; flash-attention's 2.5 for softmax attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

CHUNK = 64                               # L: the chunk length of the chunked algorithms' count

# itemsize in bytes of the generated inputs: q, k, v in bf16; log-decays in float32 as a
# model's logsigmoid produces them; beta and mLSTM's i, f in bf16 (fla's and TFLA's convention)
QKV_BYTES = 2
DECAY_BYTES, BETA_BYTES, MLSTM_GATE_BYTES = 4, 2, 2


def _gla(K, V, T, L):
    # per chunk of L: Q K^T (2 L^2 K), masked A V (2 L^2 V), Q S and K^T V (2 L K V each)
    return 2 * L * (K + V) + 4 * K * V


def _delta(K, V, T, L):
    # K K^T, T K, Q K^T (2 L^2 K each), T V, (.) U' (2 L^2 V each), W S, Q S, K^T U'
    # (2 L K V each), the L x L triangular inverse (L^3 / 3 multiply-adds)
    return 2 * L * (3 * K + 2 * V) + 6 * K * V + 2 * L * L / 3


def _softmax(K, V, T, L):
    # causal: a query attends t keys, T / 2 on average; Q K^T and P V
    return T * (K + V)


def _decode(K, V, T, L):
    # one step: 2 K V to update the state, 2 K V to read it (memory-bound anyway)
    return 4 * K * V


@dataclass(frozen=True)
class FlopModel:
    """An algorithm's forward FLOPs per token and head, per_token(K, V, T, L), and its
    backward's FLOPs as a multiple of the forward's."""
    name: str
    per_token: Callable[[int, int, int, int], float]
    bwd_factor: float


FLOP_MODELS = {m.name: m for m in (
    FlopModel("gla", _gla, 2.0),            # the per-key and mLSTM gates add elementwise work only
    FlopModel("delta", _delta, 2.0),
    FlopModel("softmax", _softmax, 2.5),
    FlopModel("decode", _decode, 0.0),
)}


def flops_per_token(algo: str, K: int, V: int, T: int, L: int = CHUNK) -> float:
    """Forward FLOPs per token and head of `algo` (a FLOP_MODELS name) with head dims K, V
    at sequence length T. With K = V = D: gla 4 L D + 4 D^2, delta 10 L D + 6 D^2 + 2 L^2 / 3,
    softmax 2 T D, decode 4 D^2."""
    if algo not in FLOP_MODELS:
        raise ValueError(f"unknown FLOP model {algo!r}; known: {', '.join(FLOP_MODELS)}")
    return FLOP_MODELS[algo].per_token(K, V, T, L)


@dataclass(frozen=True)
class Gate:
    """A gate input of an op: its dims ("H", "BTH" or "BTHK"), bytes per element, and
    whether the op returns its gradient."""
    name: str
    dims: str
    itemsize: int
    grad: bool = True

    def numel(self, B, T, H, D) -> int:
        return {"H": H, "BTH": B * T * H, "BTHK": B * T * H * D}[self.dims]


def io_bytes(gates: tuple, decode: bool, B: int, T: int, H: int, D: int) -> dict:
    """Bytes that must move (fwd, fwdbwd) and bytes that must exist after a backward (mem)
    for an op with these gates at [B, T, H, D]:
        fwd      read q, k, v and the gates, write o
        fwdbwd   the forward's, plus read do, write dq, dk, dv and the gates' gradients (a
                 floor: it does not count the backward re-reading q, k, v)
        mem      o, dq, dk, dv, dgates
    A decoding step also reads and writes its float32 state [B, H, D, D] and has no backward."""
    n = B * T * H * D                                        # elements of one of q, k, v, o
    qkv = 3 * n * QKV_BYTES
    o = n * QKV_BYTES
    gate_bytes = sum(g.numel(B, T, H, D) * g.itemsize for g in gates)
    dgates = sum(g.numel(B, T, H, D) * g.itemsize for g in gates if g.grad)
    if decode:
        state = 2 * B * H * D * D * 4
        return {"fwd": qkv + gate_bytes + o + state, "fwdbwd": None, "mem": None}
    fwd = qkv + gate_bytes + o
    return {"fwd": fwd, "fwdbwd": fwd + o + qkv + dgates, "mem": o + qkv + dgates}


def floors(case, s, copy_TBps: float, matmul_TFLOPs: float) -> dict:
    """The physical floors of one row of `case` (an OpCase) at shape s: ms, bounded by
    max(bytes / copy bandwidth, FLOPs / matmul rate), and GiB for memory, with what bounds each."""
    b = io_bytes(case.gates, case.decode, s.B, s.T, s.H, s.D)
    f_fwd = flops_per_token(case.flops.name, s.D, s.D, s.T) * s.B * s.T * s.H
    f_fb = f_fwd * (1 + case.flops.bwd_factor)
    out = {"bytes_fwd": b["fwd"], "flops_fwd": f_fwd}

    def floor_ms(nbytes, flops):
        t_mem = nbytes / (copy_TBps * 1e12) * 1e3
        t_flop = flops / (matmul_TFLOPs * 1e12) * 1e3
        return (t_mem, "bytes") if t_mem >= t_flop else (t_flop, "flops")

    out["floor_fwd_ms"], out["floor_fwd_bound"] = floor_ms(b["fwd"], f_fwd)
    if not case.decode:
        out["bytes_fwdbwd"], out["flops_fwdbwd"] = b["fwdbwd"], f_fb
        out["floor_fwdbwd_ms"], out["floor_fwdbwd_bound"] = floor_ms(b["fwdbwd"], f_fb)
        out["mem_floor_gib"] = b["mem"] / 2**30
    return out
