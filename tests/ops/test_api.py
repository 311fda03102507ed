"""Validation at the public boundary: every bad input raises a clear error before any compute."""
import pytest
import torch

import linattn

B, T, H, K, V = 2, 5, 3, 8, 6


def qkv(dtype=torch.float32):
    return torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype), \
        torch.randn(B, T, H, V, dtype=dtype)


def gates(dtype=torch.float32):
    return torch.rand(B, T, H, dtype=dtype), torch.randn(B, T, H, dtype=dtype)


def raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


def test_qkv_shapes_dtypes_and_types():
    q, k, v = qkv()
    raises(ValueError, r"q must be 4-d \[B, T, H, D\]", linattn.linear_attention, q[0], k, v)
    raises(ValueError, "k must have q's shape", linattn.linear_attention, q, k[..., :4], v)
    raises(ValueError, "v must be", linattn.linear_attention, q, k, v[:, :3])
    raises(TypeError, "share one dtype", linattn.linear_attention, q, k.double(), v)
    raises(TypeError, "q must be float32", linattn.linear_attention, q.int(), k.int(), v.int())
    raises(TypeError, "q must be a torch.Tensor", linattn.linear_attention, q.numpy(), k, v)
    big = torch.randn(1, 2, 1, 300)
    raises(ValueError, "head dims must be in", linattn.linear_attention, big, big, big)


def test_gate_shapes_values_and_dtype():
    q, k, v = qkv()
    raises(ValueError, "g must be", linattn.linear_attention, q, k, v, -torch.rand(B, T))
    raises(ValueError, "g must be", linattn.linear_attention, q, k, v, -torch.rand(H + 1))
    raises(ValueError, "must be <= 0", linattn.linear_attention, q, k, v, torch.rand(B, T, H))
    raises(TypeError, "g must be a floating", linattn.linear_attention, q, k, v,
           torch.zeros(B, T, H, dtype=torch.int64))
    raises(TypeError, "g is float64", linattn.linear_attention, q, k, v, -torch.rand(H).double())
    beta, _ = gates()
    # The delta rule takes a scalar gate only.
    raises(ValueError, "g must be", linattn.delta_rule, q, k, v, beta, -torch.rand(B, T, H, K))


def test_beta_i_f_shapes():
    q, k, v = qkv()
    beta, f = gates()
    raises(ValueError, r"beta must be \[B, T, H\]", linattn.delta_rule, q, k, v, beta[..., :1])
    raises(ValueError, r"i must be \[B, T, H\]", linattn.mlstm, q, k, v, f[:, :2], f)
    raises(ValueError, r"f must be \[B, T, H\]", linattn.mlstm, q, k, v, f, f[None])
    raises(TypeError, "beta must be a torch.Tensor", linattn.delta_rule, q, k, v, 0.5)


def test_states():
    q, k, v = qkv()
    raises(ValueError, r"initial_state must be \[B, H, K, V\]", linattn.linear_attention, q, k, v,
           initial_state=torch.zeros(B, H, V, K))
    raises(TypeError, r"tuple \(C, n, m\)", linattn.mlstm, q, k, v, *gates(),
           initial_state=torch.zeros(B, H, K, V))
    raises(ValueError, r"initial_state\[2\] \(m\)", linattn.mlstm, q, k, v, *gates(),
           initial_state=(torch.zeros(B, H, K, V), torch.zeros(B, H, K), torch.zeros(B)))
    raises(ValueError, r"initial_state must be \[B, H, K, V\]", linattn.mlstm, q, k, v, *gates(),
           input_gate="sigmoid", initial_state=torch.zeros(B, H, K))


def test_cu_seqlens():
    q, k, v = (x[:1] for x in qkv())
    ok = torch.tensor([0, 2, 5])
    linattn.linear_attention(q, k, v, cu_seqlens=ok)  # valid
    raises(ValueError, "needs B == 1", linattn.linear_attention, *qkv(), cu_seqlens=ok)
    raises(ValueError, "non-decreasing", linattn.linear_attention, q, k, v,
           cu_seqlens=torch.tensor([0, 3, 2, 5]))
    raises(ValueError, r"cu_seqlens\[-1\] must equal T", linattn.linear_attention, q, k, v,
           cu_seqlens=torch.tensor([0, 2, 4]))
    raises(ValueError, r"cu_seqlens\[0\] must be 0", linattn.linear_attention, q, k, v,
           cu_seqlens=torch.tensor([1, 5]))
    raises(TypeError, "int32 or int64", linattn.linear_attention, q, k, v,
           cu_seqlens=torch.tensor([0.0, 5.0]))
    raises(ValueError, r"initial_state must be \[N, H, K, V\]", linattn.linear_attention, q, k, v,
           cu_seqlens=ok, initial_state=torch.zeros(1, H, K, V))


def test_options():
    q, k, v = qkv()
    raises(ValueError, "backend must be one of", linattn.linear_attention, q, k, v, backend="cuda")
    raises(ValueError, "input_gate must be one of", linattn.mlstm, q, k, v, *gates(),
           input_gate="relu")
    raises(ValueError, "causal=False", linattn.linear_attention, q, k, v, -torch.rand(H),
           causal=False)
    raises(ValueError, "causal=False", linattn.linear_attention, q, k, v, causal=False,
           output_final_state=True)
    raises(TypeError, "scale must be a real number", linattn.linear_attention, q, k, v, scale="1")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    raises(ValueError, "backend='triton' needs CUDA tensors", linattn.linear_attention, q, k, v,
           backend="triton")


@pytest.mark.gpu
def test_mixed_devices():
    q, k, v = qkv()
    raises(ValueError, "all inputs must be on one device", linattn.linear_attention, q.cuda(), k, v)


def test_mixed_devices_meta():
    """Mixed devices (CPU and meta) are caught by the same check without a GPU."""
    q, k, v = qkv()
    raises(ValueError, "all inputs must be on one device", linattn.linear_attention, q, k,
           v.to("meta"))


def test_returns_state_only_when_asked():
    q, k, v = qkv()
    o, s = linattn.linear_attention(q, k, v)
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32 and s is None
    o, s = linattn.linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32 and s.shape == (B, H, K, V)
    o, (C, n, m) = linattn.mlstm(q, k, v, *gates(), output_final_state=True)
    assert C.shape == (B, H, K, V) and n.shape == (B, H, K) and m.shape == (B, H)
