"""What each mixer keeps for its backward, per token, measured on the CPU with linattn.memory:
the layers' Triton pieces (conv, output norm, op) run in the interpreter under bf16 autocast,
as a GPU model trains, so the bytes are a GPU layer's. A layer that starts keeping more fails
its bound.

Per token and layer at d_model d, H heads of K (keys) and V (values), bf16 activations:

    attention       2d       the bf16 copy of x that q_proj, k_proj, v_proj share
                             (linattn.layers.base.projection_input)
                    4 x 4 K/2  RoPE's cos and sin for q and for k (float32)
                    4 x 2d   q, k, v and the output (SDPA), 4 H its logsumexp
    gated_deltanet  2d       the bf16 copy of x that qkv_proj, b_proj, a_proj, z_proj share
                    2 (2HK + HV)  the conv's input; the same again: q, k, v (the op's copies)
                    16 H     beta, g and their pre-activations (float32)
                    4 H      b and a (bf16): the projections run as one GEMM
                             (linattn.layers.base.fused_projections) whose output the conv's
                             input and z are views of, one storage kept whole (2 H in DeltaNet),
                             with its zero columns padding the width to a multiple of
                             FUSED_ROW_ALIGN (2 bytes each)
                    the op (save_for_backward="states"): 4H gate cumsum, 4 H 64 the chunks'
                    inverses, 2 H K V / 64 chunk states, 2 HV the corrected values U'
                    2 HV o, 2 HV the gate z (the output norm; the out-projection recomputes
                    the norm's output instead of keeping another 2 HV)

The other mixers' input projections run as one GEMM too (Mixer.input_projections), and a view
of its output that a node keeps keeps the whole output: linear and lightning keep 2 d more
than with separate projections: the feature map's elu or silu keeps its input, the q and k views, so v's columns stay too while the op keeps its own
contiguous copy of v (the Triton ops take contiguous q, k, v). gla, hgrn2 and mlstm keep what
they kept before: their output norm's gate (gla without a conv, mlstm) and hgrn2's silu input
q are copies of their columns, where a view would keep q, k, v's columns besides the op's
copies; gla's low-rank gate keeps a copy of its 16 columns.

save_for_backward="recompute" drops the op's intermediates and, the short conv and the op
running as one node (linattn.ops.conv_delta), the op's copies of q, k, v: 2 (2HK + HV) less;
and the gate z: the output norm keeps x's shared copy (kept anyway) and recomputes z in its
backward (linattn.ops.fused.gated_rms_norm_linear_projected), 2 HV less in every mixer with a
projected gate. At d 768, 6 heads of 128: gated_deltanet 20120 -> 7808 (attention 8728),
deltanet 20024 -> 7736, mom 74330 -> 37394 (its q, k, v copies: 3 (token, memory) pairs a
token).
"""
import pytest
import torch
from torch import nn

from linattn.layers import MIXERS
from linattn.layers.base import FUSED_ROW_ALIGN
from linattn.layers.norms import GatedOutputNorm
from linattn.layers.short_conv import ShortConv
from linattn.memory import per_token, saved_for_backward, total_bytes

D_MODEL, HEADS = 64, 2
TOKENS = (64, 128)  # two whole chunks apart: per-token bytes from the difference

# bytes per token of one layer at D_MODEL, HEADS (bf16 autocast, Triton pieces); measured,
# and for attention and gated_deltanet equal to the module docstring's sums
BOUNDS = {"attention": 904, "linear": 1230, "lightning": 1224, "gla": 1152, "hgrn2": 1920,
          "mlstm": 887, "mlstm_sig": 880, "deltanet": 1896, "gated_deltanet": 1928,
          "mom": 6746}
# the mixers ending in GatedOutputNorm then o_proj (linear attention does with a feature map
# that needs no denominator, not its default)
NORMED = ["lightning", "gla", "hgrn2", "mlstm", "mlstm_sig", "deltanet",
          "gated_deltanet", "mom"]
# the mixers whose output norm is gated by a projection of x, and that projection
GATE_PROJ = {"lightning": "u_proj", "gla": "r_proj", "mlstm": "z_proj", "mlstm_sig": "z_proj",
             "deltanet": "z_proj", "gated_deltanet": "z_proj", "mom": "z_proj"}


def _layer(name, save_for_backward="states"):
    torch.manual_seed(0)
    layer = MIXERS[name](D_MODEL, HEADS, backend="auto" if name == "attention" else "triton",
                         save_for_backward=save_for_backward)
    for sub in layer.modules():
        if isinstance(sub, (ShortConv, GatedOutputNorm)):
            sub.backend = "triton"
    return layer


def _per_token(layer):
    runs = []
    for T in TOKENS:
        x = torch.randn(1, T, D_MODEL, requires_grad=True).clone()  # not a leaf, as in a model
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs.append(saved_for_backward(layer, x)[1])
    return per_token(runs[0], TOKENS[0], runs[1], TOKENS[1])


def _audit_sums(d, H, K, V):
    HK, HV = H * K, H * V
    attention = 2 * d + 4 * 4 * K // 2 + 4 * 2 * d + 4 * H
    op = 4 * H + 4 * H * 64 + 2 * H * K * V // 64 + 2 * HV
    pad = -(2 * HK + HV + HV + 2 * H) % FUSED_ROW_ALIGN          # qkv, z, b, a in one GEMM
    gdn = 2 * d + 2 * 2 * (2 * HK + HV) + 16 * H + 4 * H + 2 * pad + op + 2 * 2 * HV
    return attention, gdn


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_saved_bytes_per_token_stay_within_bounds(name):
    got = _per_token(_layer(name))
    print(name, {k: round(v, 1) for k, v in got.items()})
    assert got["total"] <= BOUNDS[name] + 0.5, got


def test_audit_sums_match_the_measurement():
    K = D_MODEL // HEADS
    attention, gdn = _audit_sums(D_MODEL, HEADS, K, K)
    assert _per_token(_layer("attention"))["total"] == attention
    assert _per_token(_layer("gated_deltanet"))["total"] == gdn


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_recompute_keeps_the_conv_input_and_not_q_k_v(name):
    """save_for_backward="recompute": neither the op's intermediates (gate cumsum, the
    chunks' inverses, states, U') nor its copies of q, k, v (the conv and the op are one node
    that keeps the conv's input), nor the output norm's gate z (recomputed from x)."""
    H = HEADS
    K = V = D_MODEL // HEADS
    op = 4 * H * (name == "gated_deltanet") + 4 * H * 64 + 2 * H * K * V // 64 + 2 * H * V
    qkv = 2 * (2 * H * K + H * V)
    z = 2 * H * V
    n_ab = 2 if name == "gated_deltanet" else 1                        # b (and a) columns
    # the one GEMM's zero columns: qkv, z, b, a in "states"; qkv, b, a in "recompute"
    pads = [-(2 * H * K + H * V + w + n_ab * H) % FUSED_ROW_ALIGN for w in (H * V, 0)]
    states = _per_token(_layer(name))
    recompute = _per_token(_layer(name, "recompute"))
    print(name, states, recompute)
    assert states["total"] - recompute["total"] == op + qkv + z + 2 * (pads[0] - pads[1]), (states, recompute)
    assert "conv" not in recompute                                     # q, k, v gone
    assert recompute["out_norm"] == 2 * H * V                          # o stays, z goes


@pytest.mark.parametrize("name", sorted(GATE_PROJ))
def test_recompute_keeps_x_and_not_the_gate(name):
    """save_for_backward="recompute": the output norm and out-projection keep x's shared copy,
    which the input projections keep already (one storage, counted once), instead of the gate:
    2 HV bytes per token fewer than with the gate projection hooked (which keeps the gate)."""
    layer = _layer(name, "recompute")
    fused = _per_token(layer)["total"]
    kept = _per_token_hooked(layer, getattr(layer, GATE_PROJ[name]))
    assert kept - fused == 2 * layer.o_proj.in_features, (kept, fused)


@pytest.mark.parametrize("mode", ["states", "recompute"])
@pytest.mark.parametrize("name", ["linear", "lightning", "gla", "hgrn2", "mlstm", "mlstm_sig"])
def test_fold_keeps_what_the_separate_projections_keep(name, mode):
    """The one GEMM's output against the separate projections' (the fold off: a hooked
    q_proj): the same bytes, except linear and lightning, whose elu / silu keep q and k as
    views of the one output and so its v columns, 2 d bytes a token (the module docstring)."""
    layer = _layer(name, mode)
    fused = _per_token(layer)["total"]
    separate = _per_token_hooked(layer, layer.q_proj)
    extra = 2 * D_MODEL if name in ("linear", "lightning") else 0
    assert fused - separate == extra, (fused, separate)


def test_mom_recompute_drops_every_pairs_q_k_v():
    """MoM's packed path: the op's copies of q, k, v for each of a token's top_k + 1 (token,
    memory) pairs, besides the op's intermediates."""
    layer = _layer("mom")
    pairs = layer.top_k + layer.shared_memory
    qkv = 2 * layer.conv.channels * pairs
    states = _per_token(layer)
    recompute = _per_token(_layer("mom", "recompute"))
    assert recompute["total"] <= states["total"] - qkv - states["DeltaRuleFunctionBackward"]
    assert "conv" not in recompute


def _per_token_hooked(layer, module):
    """_per_token(layer)'s total with a no-op forward pre-hook on `module`, which sends the
    fused output node back to the unfused composition."""
    handle = module.register_forward_pre_hook(lambda m, a: None)
    try:
        return _per_token(layer)["total"]
    finally:
        handle.remove()


@pytest.mark.parametrize("name", NORMED)
def test_fused_out_projection_drops_the_norm_output(name):
    """A hooked o_proj takes the unfused path (linear(norm(o, z))), which keeps the norm's
    output for the weight gradient: 2 HV bytes per token more."""
    layer = _layer(name)
    fused = _per_token(layer)["total"]
    unfused = _per_token_hooked(layer, layer.o_proj)
    assert unfused - fused == 2 * layer.o_proj.in_features, (unfused, fused)


def test_saved_for_backward_counts_storages_once_and_marks_parameters():
    lin = nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    y, saved = saved_for_backward(lin, x)
    assert y.shape == (5, 4)
    params = [s for s in saved if s.parameter]
    assert sum(s.nbytes for s in params) == 8 * 4 * 4          # the weight (mm keeps it)
    assert total_bytes(saved) == 5 * 8 * 4                      # x
    assert total_bytes(saved, by_where=True) == {"": 5 * 8 * 4}

    class Slices(nn.Module):
        def forward(self, x):
            a, b = x.split(4, dim=1)
            return (a * b).sum()                                # keeps a and b: one storage

    _, saved = saved_for_backward(Slices(), x)
    assert total_bytes(saved) == 5 * 8 * 4
    with pytest.raises(ValueError, match="tokens_a"):
        per_token(saved, 4, saved, 4)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_projection_input_keeps_one_copy_with_autocast_values_and_gradients(requires_grad):
    """Three projections of x under bf16 autocast: through projection_input they keep one bf16
    copy of x instead of three, with autocast's own values and gradients, bit for bit."""
    from linattn.layers.base import projection_input

    class Three(nn.Module):
        def __init__(self, share):
            super().__init__()
            self.share = share
            self.p = nn.ModuleList(nn.Linear(16, 8) for _ in range(3))

        def forward(self, x):
            xin = projection_input(x) if self.share else (lambda: x)
            return sum(p(xin()).float().square() for p in self.p)

    torch.manual_seed(0)
    shared, plain = Three(True), Three(False)
    plain.load_state_dict(shared.state_dict())
    base = torch.randn(40, 16, requires_grad=requires_grad)
    got = []
    for m in (shared, plain):
        x = base * 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, saved = saved_for_backward(m, x)
        leaves = ([base] if requires_grad else []) + list(m.parameters())
        got.append((y, torch.autograd.grad(y.sum(), leaves), total_bytes(saved, by_where=True)))
    (y1, g1, s1), (y2, g2, s2) = got
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    copies = lambda s: sum(v for k, v in s.items() if k.startswith("p."))  # noqa: E731
    assert copies(s2) - copies(s1) == 2 * 40 * 16 * 2     # two bf16 copies of x fewer
