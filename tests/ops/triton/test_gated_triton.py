"""Triton kernels of the gated linear-attention family against the float64 oracle.

CPU (Triton interpreter, float32, tiny shapes, chunk 32 / tile 16 so that several chunks and
tiles are crossed): every gate kind, causal=False, mLSTM sigmoid and exp, initial and final
states with the final state's gradient, varlen with an empty and a length-1 sequence,
K != V, non-power-of-two head dims, T off the tile grid, backward, determinism.
GPU (`pytest -m gpu`): each axis of DESIGN.md section 5 at the default tiling, float32 and
bfloat16.
"""
from __future__ import annotations

import pytest
import torch

import helpers
import linattn
from linattn.ops.triton import gated_api

CUDA = torch.cuda.is_available()


@pytest.fixture
def small_tiles(monkeypatch):
    """Chunk 32, tile 16: several chunks and tiles at T < 80 (interpreter-sized)."""
    monkeypatch.setattr(gated_api, "CHUNK", 32)
    monkeypatch.setattr(gated_api, "TILE", 16)


def _la(backend, causal=True):
    def fn(**kw):
        return linattn.linear_attention(**kw, causal=causal, backend=backend)
    return fn


def _mlstm(backend, input_gate):
    def fn(**kw):
        return linattn.mlstm(**kw, input_gate=input_gate, backend=backend)
    return fn


def check_la(kind, *, B, T, H, K, V, dtype, device, seed=0, lengths=None, state=True,
             low=-1.0, high=0.0, qv_scale=1.0, noncontig=False):
    """linear_attention with gate `kind` against the oracle, states and all gradients."""
    gen = helpers.seeded(seed)
    cu = None
    if lengths is not None:
        B, T = 1, sum(lengths)
        cu = helpers.cu_seqlens_from_lengths(lengths)
    N = len(lengths) if lengths is not None else B
    inputs = dict(q=helpers.randn(B, T, H, K, gen=gen, scale=qv_scale, noncontig=noncontig),
                  k=helpers.randn(B, T, H, K, gen=gen, noncontig=noncontig),
                  v=helpers.randn(B, T, H, V, gen=gen, scale=qv_scale, noncontig=noncontig),
                  g=helpers.rand_gate(kind, B, T, H, K, gen, low, high))
    if state:
        inputs["initial_state"] = helpers.randn(N, H, K, V, gen=gen)
    if cu is not None:
        inputs["cu_seqlens"] = cu
    names = ["q", "k", "v"] + (["g"] if kind != "none" else []) + (["initial_state"] if state else [])
    helpers.check_against_oracle(_la("triton"), _la("reference"), inputs, dtype=dtype,
                                 grad_names=names, device=device, output_final_state=state,
                                 noncontig_grads=noncontig)


def check_mlstm(input_gate, *, B, T, H, K, V, dtype, device, seed=0, lengths=None, state=True,
                i_scale=2.0, f_shift=2.0, noncontig=False):
    """mlstm against the oracle, with its state tuple and all gradients."""
    gen = helpers.seeded(seed)
    cu = None
    if lengths is not None:
        B, T = 1, sum(lengths)
        cu = helpers.cu_seqlens_from_lengths(lengths)
    N = len(lengths) if lengths is not None else B
    inputs = dict(q=helpers.randn(B, T, H, K, gen=gen, noncontig=noncontig),
                  k=helpers.randn(B, T, H, K, gen=gen, noncontig=noncontig),
                  v=helpers.randn(B, T, H, V, gen=gen, noncontig=noncontig),
                  i=helpers.randn(B, T, H, gen=gen, scale=i_scale),
                  f=helpers.randn(B, T, H, gen=gen) + f_shift)
    if state:
        if input_gate == "exp":
            inputs["initial_state"] = (helpers.randn(N, H, K, V, gen=gen),
                                       helpers.randn(N, H, K, gen=gen),
                                       helpers.randn(N, H, gen=gen))
        else:
            inputs["initial_state"] = helpers.randn(N, H, K, V, gen=gen)
    if cu is not None:
        inputs["cu_seqlens"] = cu
    names = ["q", "k", "v", "i", "f"] + (["initial_state"] if state else [])
    helpers.check_against_oracle(_mlstm("triton", input_gate), _mlstm("reference", input_gate),
                                 inputs, dtype=dtype, grad_names=names, device=device,
                                 output_final_state=state, noncontig_grads=noncontig)


def check_bidir(*, lengths, H, K, V, dtype, device, seed=0, noncontig=False):
    gen = helpers.seeded(seed)
    T = sum(lengths)
    inputs = dict(q=helpers.randn(1, T, H, K, gen=gen, noncontig=noncontig),
                  k=helpers.randn(1, T, H, K, gen=gen, noncontig=noncontig),
                  v=helpers.randn(1, T, H, V, gen=gen, noncontig=noncontig),
                  cu_seqlens=helpers.cu_seqlens_from_lengths(lengths))
    helpers.check_against_oracle(_la("triton", causal=False), _la("reference", causal=False),
                                 inputs, dtype=dtype, grad_names=["q", "k", "v"], device=device,
                                 noncontig_grads=noncontig)


def run_twice_bitwise(fn, inputs, names):
    """Runs forward + backward twice on the same inputs; asserts bitwise equal results."""
    results = []
    for _ in range(2):
        leaves = {n: (x.detach().clone().requires_grad_(n in names) if torch.is_tensor(x) and x.is_floating_point() else x)
                  for n, x in inputs.items()}
        o, st = fn(**leaves)
        loss = (o.float() * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum() + st.float().square().sum()
        grads = torch.autograd.grad(loss, [leaves[n] for n in names])
        results.append([o.detach(), st.detach(), *grads])
    for a, b in zip(*results):
        assert torch.equal(a, b), "two identical runs differ"


# ----------------------------------------------------------------------------- CPU (interpreter)

@pytest.mark.parametrize("kind,K,V,T", [
    ("none", 16, 32, 45),
    ("const", 32, 16, 40),
    ("scalar", 48, 20, 47),        # non-power-of-two K and V, K != V, two K blocks
    ("key", 24, 16, 37),
])
def test_gates_cpu(small_tiles, kind, K, V, T):
    check_la(kind, B=2, T=T, H=1, K=K, V=V, dtype=torch.float32, device="cpu")


def test_varlen_scalar_cpu(small_tiles):
    check_la("scalar", B=1, T=0, H=2, K=16, V=24, dtype=torch.float32, device="cpu",
             lengths=[0, 37, 1, 20], noncontig=True)


def test_varlen_key_no_state_cpu(small_tiles):
    check_la("key", B=1, T=0, H=1, K=16, V=16, dtype=torch.float32, device="cpu",
             lengths=[1, 0, 35], state=False, low=-3.0, high=-1.0)


def test_bidirectional_cpu(small_tiles):
    check_bidir(lengths=[0, 37, 1, 20], H=2, K=20, V=16, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("input_gate", ["sigmoid", "exp"])
def test_mlstm_cpu(small_tiles, input_gate):
    check_mlstm(input_gate, B=1, T=0, H=2, K=24, V=16, dtype=torch.float32, device="cpu",
                lengths=[0, 37, 1, 20])


def test_mlstm_exp_large_input_gate_cpu(small_tiles):
    """Large i: m far from 0, the exp(-m) floor and the gradient through m both matter."""
    check_mlstm("exp", B=2, T=40, H=1, K=16, V=16, dtype=torch.float32, device="cpu",
                i_scale=8.0, f_shift=0.0, seed=3)


def test_deterministic_cpu(small_tiles):
    gen = helpers.seeded(5)
    B, T, H, K, V = 2, 40, 1, 16, 16
    inputs = dict(q=helpers.randn(B, T, H, K, gen=gen).float(), k=helpers.randn(B, T, H, K, gen=gen).float(),
                  v=helpers.randn(B, T, H, V, gen=gen).float(),
                  g=helpers.rand_gate("scalar", B, T, H, K, gen).float(), output_final_state=True)
    run_twice_bitwise(_la("triton"), inputs, ["q", "k", "v", "g"])


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["none", "const", "scalar", "key"])
def test_gates_gpu(kind, dtype):
    check_la(kind, B=2, T=1000, H=2, K=64, V=64, dtype=dtype, device="cuda", noncontig=True)


@gpu
@pytest.mark.parametrize("T", [1, 2, 15, 63, 64, 65, 127])
def test_lengths_gpu(T):
    check_la("scalar", B=2, T=T, H=2, K=32, V=64, dtype=torch.float32, device="cuda")
    check_la("key", B=2, T=T, H=2, K=32, V=64, dtype=torch.bfloat16, device="cuda")


@gpu
@pytest.mark.parametrize("K,V", [(16, 16), (32, 100), (100, 32), (128, 128), (256, 256), (256, 64)])
def test_head_dims_gpu(K, V):
    check_la("scalar", B=1, T=200, H=2, K=K, V=V, dtype=torch.bfloat16, device="cuda")
    check_la("key", B=1, T=130, H=1, K=K, V=V, dtype=torch.float32, device="cuda")


@gpu
@pytest.mark.parametrize("low,high", [(-1e-3, 0.0), (-20.0, -19.0)], ids=["near0", "near-20"])
@pytest.mark.parametrize("kind", ["scalar", "key"])
def test_gate_ranges_gpu(kind, low, high):
    check_la(kind, B=2, T=300, H=2, K=64, V=64, dtype=torch.float32, device="cuda", low=low, high=high)


@gpu
@pytest.mark.parametrize("kind", ["none", "scalar", "key"])
def test_scaled_qv_gpu(kind):
    check_la(kind, B=2, T=250, H=2, K=64, V=64, dtype=torch.bfloat16, device="cuda", qv_scale=5.0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["none", "const", "scalar", "key"])
def test_varlen_gpu(kind, dtype):
    check_la(kind, B=1, T=0, H=2, K=64, V=64, dtype=dtype, device="cuda",
             lengths=[0, 300, 1, 64, 129])


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("input_gate", ["sigmoid", "exp"])
def test_mlstm_gpu(input_gate, dtype):
    check_mlstm(input_gate, B=2, T=500, H=2, K=64, V=64, dtype=dtype, device="cuda", noncontig=True)
    check_mlstm(input_gate, B=1, T=0, H=2, K=64, V=64, dtype=dtype, device="cuda",
                lengths=[0, 300, 1, 129])


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_bidirectional_gpu(dtype):
    check_bidir(lengths=[0, 300, 1, 129], H=2, K=64, V=100, dtype=dtype, device="cuda", noncontig=True)


@gpu
@pytest.mark.parametrize("kind", ["scalar", "key"])
def test_deterministic_and_batch_independent_gpu(kind):
    gen = helpers.seeded(7)
    B, T, H, K, V = 3, 700, 2, 64, 64
    q, k = (helpers.randn(B, T, H, K, gen=gen).to("cuda", torch.bfloat16) for _ in range(2))
    v = helpers.randn(B, T, H, V, gen=gen).to("cuda", torch.bfloat16)
    g = helpers.rand_gate(kind, B, T, H, K, gen).float().cuda()
    inputs = dict(q=q, k=k, v=v, g=g, output_final_state=True)
    run_twice_bitwise(_la("triton"), inputs, ["q", "k", "v", "g"])
    o_all, s_all = linattn.linear_attention(q, k, v, g, output_final_state=True, backend="triton")
    o_one, s_one = linattn.linear_attention(q[1:2], k[1:2], v[1:2], g[1:2], output_final_state=True,
                                            backend="triton")
    assert torch.equal(o_all[1:2], o_one) and torch.equal(s_all[1:2], s_one)
