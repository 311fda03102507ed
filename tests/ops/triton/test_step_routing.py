"""Short gradient-free calls on the Triton backend take the fused step kernel (and agree)."""
import torch

import helpers
import linattn
from linattn.ops import decode, reference
from linattn.ops.triton import delta_api, gated_api


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapped(*a, **kw):
        calls.append(name)
        return real(*a, **kw)
    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_short_no_grad_calls_use_the_step_kernel(monkeypatch):
    gen = helpers.seeded(0)
    B, T, H, K, V = 2, 5, 2, 16, 24
    q, k, v = (helpers.randn(B, T, H, d, gen=gen).float() for d in (K, K, V))
    g = helpers.rand_gate("key", B, T, H, K, gen).float()
    beta = torch.rand(B, T, H, generator=gen)
    i, f = helpers.randn(B, T, H, gen=gen).float(), helpers.randn(B, T, H, gen=gen).float()
    S0 = helpers.randn(B, H, K, V, gen=gen).float()
    steps = [_spy(monkeypatch, decode, n) for n in
             ("linear_attention_decode", "delta_rule_decode", "mlstm_decode")]
    chunks = [_spy(monkeypatch, gated_api, "linear_attention"),
              _spy(monkeypatch, delta_api, "delta_rule"), _spy(monkeypatch, gated_api, "mlstm")]
    cases = [
        (linattn.linear_attention, reference.linear_attention, (q, k, v, g), {}),
        (linattn.delta_rule, reference.delta_rule, (q, helpers.unit_keys(k), v, beta), {}),
        (linattn.mlstm, reference.mlstm, (q, k, v, i, f), {"input_gate": "sigmoid"}),
    ]
    for op, ref, args, kw in cases:
        with torch.no_grad():
            o, S = op(*args, initial_state=S0, output_final_state=True, backend="triton", **kw)
        o_ref, S_ref = ref(*(a.double() for a in args), initial_state=S0.double(),
                           output_final_state=True, **kw)
        assert (o.double() - o_ref).abs().max() < 1e-4 and (S.double() - S_ref).abs().max() < 1e-4
    assert [len(c) for c in steps] == [1, 1, 1] and [len(c) for c in chunks] == [0, 0, 0]

    # With a gradient to compute, or above the length limit, the chunk kernels run.
    q.requires_grad_(True)
    linattn.linear_attention(q, k, v, g, backend="triton")
    with torch.no_grad():
        long = [x.repeat(1, 4, 1, 1) for x in (q, k, v)]
        linattn.linear_attention(*long, backend="triton")
    assert len(chunks[0]) == 2 and len(steps[0]) == 1
