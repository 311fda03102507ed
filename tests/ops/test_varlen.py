"""Packed sequences as one padded batch (linattn.ops.varlen) in the chunked PyTorch path.

The padded batch against the per-sequence loop (outputs, every final-state component and
every gradient to 1e-12) and against the float64 oracle (docs/design.md section 5), for each
op and gate variant; each op's padding fill as an exact identity step; zero-length sequences;
and the rule that picks the batch or the loop.
"""
import pytest
import torch
import torch.nn.functional as F

import helpers
from linattn.ops import reference, torch_chunked
from linattn.ops.varlen import padded_layout, run_packed, use_padded_batch
from linattn.testing import flatten, run_op, upcast

F64 = torch.float64
H, K, V = 2, 16, 8
# zero-length, length-1, shorter than a chunk, one chunk, lengths off the chunk grid
LENGTHS = [37, 0, 1, 64, 100, 0, 5]
# (op, variant): linear_attention's gate kind, mLSTM's input gate, delta rule gated or not
CASES = [("linear_attention", "none"), ("linear_attention", "const"),
         ("linear_attention", "scalar"), ("linear_attention", "key"),
         ("mlstm", "exp"), ("mlstm", "sigmoid"), ("delta_rule", "none"), ("delta_rule", "scalar")]


def packed_inputs(op, variant, lengths, seed=0):
    """float64 inputs of op over the packed lengths, with per-sequence initial states, and
    the keyword arguments besides them."""
    gen = helpers.seeded(seed)
    T, N = sum(lengths), len(lengths)
    d = dict(q=helpers.randn(1, T, H, K, gen=gen), k=helpers.randn(1, T, H, K, gen=gen),
             v=helpers.randn(1, T, H, V, gen=gen))
    kw = dict(cu_seqlens=helpers.cu_seqlens_from_lengths(lengths), output_final_state=True)
    state = helpers.randn(N, H, K, V, gen=gen)
    if op == "linear_attention":
        d["g"] = helpers.rand_gate(variant, 1, T, H, K, gen)
    elif op == "mlstm":
        d["i"] = helpers.randn(1, T, H, gen=gen, scale=3.0)
        d["f"] = helpers.randn(1, T, H, gen=gen).add(3.0)
        if variant == "exp":
            state = (state, helpers.randn(N, H, K, gen=gen).abs(), helpers.randn(N, H, gen=gen))
        kw["input_gate"] = variant
    else:
        d["k"] = helpers.unit_keys(d["k"])
        d["beta"] = torch.rand(1, T, H, generator=gen, dtype=F64) * 0.98 + 0.01
        d["g"] = helpers.rand_gate(variant, 1, T, H, K, gen)
    d["initial_state"] = state
    return d, kw


def chunked(op, mode):
    fn = getattr(torch_chunked, op)
    return lambda **kw: fn(scale=K ** -0.5, varlen=mode, **kw)


def grad_names(d):
    return [n for n, x in d.items() if x is not None]


def cotangents(d, kw, op):
    o, st = getattr(reference, op)(**d, **kw)
    gen = helpers.seeded(99)
    return [torch.randn(y.shape, generator=gen, dtype=F64) for y in [o] + flatten(st)]


@pytest.mark.parametrize("op,variant", CASES)
def test_padded_batch_equals_loop_and_oracle(op, variant):
    d, kw = packed_inputs(op, variant, LENGTHS, seed=len(op) + len(variant))
    names = grad_names(d)
    cot = cotangents(d, kw, op)
    runs = {mode: run_op(chunked(op, mode), upcast(d, names), names, cot, **kw)
            for mode in ("loop", "padded")}
    (loop, loop_g), (pad, pad_g) = runs["loop"], runs["padded"]
    assert len(pad) == len(loop) == len(cot)
    for j, (x, y) in enumerate(zip(pad, loop)):
        helpers.assert_allclose_f64(x, y, f"{op} {variant} output/state {j}", rel=1e-12)
    for name in names:
        for j, (x, y) in enumerate(zip(pad_g[name], loop_g[name])):
            helpers.assert_allclose_f64(x, y, f"{op} {variant} d{name}[{j}]", rel=1e-12)
    helpers.check_against_oracle(chunked(op, "padded"), getattr(reference, op), d, dtype=F64,
                                 grad_names=names, **kw)


def _fills_run(op, dt, state, L=64):
    """The dense chunked recurrence over one chunk made only of op's padding fill values."""
    z = torch.zeros(1, L, H, K, dtype=dt)
    q = torch.randn(1, L, H, K, dtype=dt)
    v = torch.randn(1, L, H, V, dtype=dt)
    zh = torch.zeros(1, L, H, dtype=dt)
    if op == "mlstm":
        i = torch.full((1, L, H), torch_chunked.MLSTM_PAD_INPUT_GATE, dtype=dt)
        return torch_chunked._scan_in_chunks(torch_chunked._mlstm_exp_chunks, [q, z, v, i, zh],
                                             state)[1]
    if op == "delta_rule":
        return torch_chunked._scan_in_chunks(torch_chunked._delta_chunks, [q, z, v, zh, zh],
                                             state)[1]
    gate = zh if op == "linear_attention" else torch.zeros(1, L, H, K, dtype=dt)
    return torch_chunked._scan_in_chunks(torch_chunked._gated_chunks, [q, z, v, gate], state)[1]


@pytest.mark.parametrize("dt", [torch.float32, F64])
def test_a_chunk_of_fills_is_the_identity_bit_for_bit(dt):
    """Each op's padding fills leave every state component bitwise unchanged, mLSTM's
    stabiliser m included at magnitudes far beyond real ones (exp(-1e30 - m) is 0 in both
    dtypes), and so do the gated ops with scalar and per-key gates."""
    torch.manual_seed(0)
    S = torch.randn(1, H, K, V, dtype=dt)
    for op in ("linear_attention", "linear_attention_per_key", "delta_rule"):
        assert torch.equal(_fills_run(op, dt, S), S), op
    for m in (0.0, -1e4, 1e4, 80.0):
        st = (S, torch.randn(1, H, K, dtype=dt).abs(), torch.full((1, H), m, dtype=dt))
        out = _fills_run("mlstm", dt, st)
        for j, (a, b) in enumerate(zip(out, st)):
            assert torch.equal(a, b), f"mlstm state[{j}] at m = {m}"


@pytest.mark.parametrize("op,variant", [("linear_attention", "scalar"), ("mlstm", "exp"),
                                        ("delta_rule", "scalar")])
def test_zero_length_sequences(op, variant):
    """A zero-length sequence keeps its initial state exactly and has no output rows, in
    both modes; so does a call whose every sequence is empty."""
    for lengths in ([3, 0, 70], [0, 0]):
        d, kw = packed_inputs(op, variant, lengths)
        st0 = flatten(d["initial_state"])
        for mode in ("loop", "padded"):
            o, st = chunked(op, mode)(**d, **kw)
            assert o.shape == (1, sum(lengths), H, V)
            for n, length in enumerate(lengths):
                if length == 0:
                    for a, b in zip(flatten(st), st0):
                        assert torch.equal(a[n], b[n]), (mode, lengths, n)


def test_layout_places_each_sequence_from_row_start():
    cu = helpers.cu_seqlens_from_lengths([2, 0, 3])
    layout = padded_layout(cu, [2, 0, 3], chunk=4)
    assert (layout.n, layout.t_pad) == (3, 4)
    assert layout.dest.tolist() == [0, 1, 8, 9, 10]
    x = torch.arange(5.0).view(1, 5, 1)
    dense = layout.scatter(x, -1.0)
    assert dense[..., 0].tolist() == [[0, 1, -1, -1], [-1] * 4, [2, 3, 4, -1]]
    assert torch.equal(layout.gather(dense), x)


def test_choice_keeps_the_loop_when_padding_would_explode():
    assert not use_padded_batch([10_000] + [1] * 100, 64)
    assert not use_padded_batch([2000] + [10] * 50, 64)
    assert not use_padded_batch([], 64)
    # MoM's packed memories: similar lengths, a quarter to a half of each row padded
    assert use_padded_batch([64, 40, 90, 62] * 64, 64)
    assert use_padded_batch([128] * 320, 64)
    assert use_padded_batch([0, 1, 5], 64)  # short calls: one chunk each
    # the rule is a value: its bound moves with its arguments
    assert use_padded_batch([10_000] + [1] * 100, 64, max_ratio=200.0)
    assert not use_padded_batch([64, 40, 90, 62] * 64, 64, max_ratio=1.0, per_sequence_tokens=0)


def test_unknown_mode_is_an_error():
    d, kw = packed_inputs("delta_rule", "none", [3, 4])
    with pytest.raises(ValueError, match="varlen mode"):
        chunked("delta_rule", "dense")(**d, **kw)
    with pytest.raises(ValueError, match="varlen mode"):
        run_packed(None, None, (), (), None, False, F64, chunk=64, mode="x")
