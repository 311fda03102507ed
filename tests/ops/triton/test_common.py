"""linattn/ops/triton/common.py: the chunk-local scans every gated kernel relies on
(interpreter on the CPU)."""
import torch

from linattn.ops.triton import common
from linattn.ops.triton.common import chunk_cumsum, fill_v_block, gate_grad_, make_layout


def _chunks(lengths, L):
    """(start, end) of every chunk of the packed sequences, as make_layout cuts them."""
    out, pos = [], 0
    for n in lengths:
        out += [(pos + c, min(pos + c + L, pos + n)) for c in range(0, n, L)]
        pos += n
    return out


def test_chunk_cumsum_and_gate_grad_match_per_chunk_sums():
    lengths, L = [0, 37, 1, 20], 16
    layout = make_layout(lengths, L, 16, "cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(lengths), 3, 5, generator=gen)
    sp = torch.randn(sum(lengths), 3, 5, generator=gen)
    fwd, rev, gg = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)
    for a, b in _chunks(lengths, L):
        fwd[a:b] = x[a:b].cumsum(0)
        rev[a:b] = x[a:b].flip(0).cumsum(0).flip(0)
        excl = torch.cat([torch.zeros_like(sp[a:a + 1]), sp[a:b - 1].cumsum(0)])
        gg[a:b] = rev[a:b] + excl
    torch.testing.assert_close(chunk_cumsum(x, layout), fwd)
    torch.testing.assert_close(chunk_cumsum(x, layout, reverse=True), rev)
    out = gate_grad_(x.clone(), sp, layout)
    torch.testing.assert_close(out, gg)
    assert chunk_cumsum(x, layout, dtype=torch.float64).dtype == torch.float64


def test_gate_grad_exclusive_sum_keeps_a_large_last_term_out():
    """The state part of the chunk's last key can be O(100) while the gradient it must not
    touch is O(1e-7) (log-decays near -20): the exclusive sum must not subtract it back."""
    L = 16
    layout = make_layout([L], L, 16, "cpu")
    sp = torch.full((L, 1), 1e-7)
    sp[-1] = 300.0
    out = gate_grad_(torch.zeros(L, 1), sp, layout)
    # the sum of the 15 earlier terms, to float32 rounding of that small sum (cumsum(sp) - sp
    # gave 0.0: 1.5e-6 vanishes next to 300 in float32)
    assert abs(out[-1].item() - (L - 1) * 1e-7) < 1e-12


def test_make_layout_is_cached_and_lists_nonempty_sequences():
    """Training calls every layer with one shape: the layout (and its host-to-device copy) is
    built once; its index of non-empty sequences spares the mLSTMexp backward a mask sync."""
    a = make_layout([5, 0, 1, 0, 40], 16, 16, "cpu")
    assert make_layout((5, 0, 1, 0, 40), 16, 16, torch.device("cpu")) is a
    assert make_layout([5, 0, 1, 0, 40], 32, 16, "cpu") is not a
    assert a.nonempty.tolist() == [0, 2, 4]
    assert a.cu.dtype == torch.int32 and a.cu.tolist() == [0, 5, 5, 6, 6, 46]
    assert a.chunk_end_slot.dtype == torch.int64 and a.NC == 1 + 1 + 3
    assert a.final_slot.tolist() == [1, 2, 4, 5, 9]
    # tiles of 16: sequence 0 one, sequence 2 one, sequence 4 three (the delta rule's chunks)
    assert a.tile_seq.tolist() == [0, 2, 4, 4, 4] and a.tile_idx.tolist() == [0, 0, 0, 1, 2]
    assert a.tile_start.tolist() == [0, 5, 6, 22, 38]


def test_row_dot_sums_products_in_float32():
    """row_dot(a, b) = (a * b).sum(-1) in float32, for 16-bit inputs too, ragged rows and D."""
    from linattn.ops.triton.common import row_dot
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(70, 3, 100, generator=gen)
    b = torch.randn(70, 3, 100, generator=gen)
    torch.testing.assert_close(row_dot(a, b), (a * b).sum(-1))
    ah, bh = a.bfloat16(), b.bfloat16()
    out = row_dot(ah, bh)
    assert out.dtype == torch.float32 and out.shape == (70, 3)
    torch.testing.assert_close(out, (ah.double() * bh.double()).sum(-1).float(), rtol=1e-5, atol=1e-5)
    assert row_dot(a[:0], b[:0]).shape == (0, 3)


def test_fill_v_block_splits_v_until_every_sm_has_a_program():
    """The scans' V block halves (down to 16) while programs < SMs; no split on the CPU."""
    assert common.sm_count(torch.device("cpu")) == 0
    assert fill_v_block(64, 128, 2, 0) == 64                          # CPU: never split
    assert fill_v_block(64, 128, 8 * 16 * 2, 132) == 64               # B 8, H 16: 512 programs
    assert fill_v_block(64, 128, 2 * 16 * 2, 132) == 32               # B 2: 128 -> 256
    assert fill_v_block(64, 128, 2 * 16, 132) == 16                   # delta scan, B 2: 64 -> 256
    assert fill_v_block(64, 128, 1, 132) == 16                        # never below 16
    assert fill_v_block(64, 128, 1, 132, min_bv=32) == 32             # nor below min_bv
    assert fill_v_block(32, 20, 1, 132) == 16                         # V < BV: still a valid tile


def test_gate_numbering_from_a_log_decay_shape():
    """gate_of / gate_kind_of: the one numbering every launcher and the decode dispatch take
    from a log-decay's shape (B 2, T 3, H 4, K 5)."""
    shapes = {"none": None, "const": (4,), "scalar": (2, 3, 4), "key": (2, 3, 4, 5)}
    for name, shape in shapes.items():
        g = None if shape is None else torch.zeros(shape)
        assert common.gate_kind_of(g) == name
        assert common.gate_of(g, const_as_scalar=False) == common.GATE_KINDS[name]
    # the chunk kernels read a constant gate broadcast as a scalar one
    assert common.gate_of(torch.zeros(4)) == common.GATE_KINDS["scalar"]
    assert common.GATE_SCALAR.value == common.GATE_KINDS["scalar"]
