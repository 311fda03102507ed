"""Short gradient-free calls on the Triton backend take the fused step kernel (and agree).

Which path ran is read from the results: the step kernel (linattn.ops.decode) and the chunk
kernels (gated_api, delta_api) round differently, so a call's output equals, bit for bit,
the output of the path it took, and differs from the other's."""
import torch

import helpers
import linattn
from linattn.ops import decode, reference
from linattn.ops.triton import delta_api, gated_api


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_short_no_grad_calls_use_the_step_kernel():
    gen = helpers.seeded(0)
    B, T, H, K, V = 2, 5, 2, 16, 24
    scale = K ** -0.5
    q, k, v = (helpers.randn(B, T, H, d, gen=gen).float() for d in (K, K, V))
    g = helpers.rand_gate("key", B, T, H, K, gen).float()
    beta = torch.rand(B, T, H, generator=gen)
    i, f = helpers.randn(B, T, H, gen=gen).float(), helpers.randn(B, T, H, gen=gen).float()
    S0 = helpers.randn(B, H, K, V, gen=gen).float()
    kunit = helpers.unit_keys(k)
    sig = {"input_gate": "sigmoid"}
    # (op, oracle, step kernel, chunk kernels, inputs, keywords)
    cases = [
        (linattn.linear_attention, reference.linear_attention, decode.linear_attention_decode,
         gated_api.linear_attention, (q, k, v, g), {}),
        (linattn.delta_rule, reference.delta_rule, decode.delta_rule_decode,
         delta_api.delta_rule, (q, kunit, v, beta), {}),
        (linattn.mlstm, reference.mlstm, decode.mlstm_decode, gated_api.mlstm,
         (q, k, v, i, f), sig),
    ]
    for op, ref, step, chunks, args, kw in cases:
        with torch.no_grad():
            got = op(*args, initial_state=S0, output_final_state=True, backend="triton", **kw)
            by_step = step(*args, state=S0, scale=scale, backend="triton", **kw)
            by_chunks = chunks(*args, scale=scale, initial_state=S0, output_final_state=True,
                               **kw)
        assert _same(got, by_step) and not torch.equal(by_step[0], by_chunks[0])
        o_ref, S_ref = ref(*(a.double() for a in args), initial_state=S0.double(),
                           output_final_state=True, **kw)
        o, S = got
        assert (o.double() - o_ref).abs().max() < 1e-4 and (S.double() - S_ref).abs().max() < 1e-4

    # With a gradient to compute, or above the length limit, the chunk kernels run.
    qg = q.clone().requires_grad_(True)
    got = linattn.linear_attention(qg, k, v, g, backend="triton")[0].detach()
    with torch.no_grad():
        assert torch.equal(got, gated_api.linear_attention(q, k, v, g, scale=scale)[0])
        assert not torch.equal(got, decode.linear_attention_decode(q, k, v, g, scale=scale,
                                                                   backend="triton")[0])
        long = [x.repeat(1, 4, 1, 1) for x in (q, k, v, g)]
        got = linattn.linear_attention(*long, backend="triton")[0]
        assert torch.equal(got, gated_api.linear_attention(*long, scale=scale)[0])
        assert not torch.equal(got, decode.linear_attention_decode(*long, scale=scale,
                                                                   backend="triton")[0])
