"""linattn.ops.fused (short conv, RMSNorm, gated output norm, L2 norm, SwiGLU): both backends
against independent float64 statements of the math, with the tolerance rule of docs/design.md
section 5. CPU: the PyTorch path in float64, the Triton kernels in float32 through the
interpreter at small, awkward shapes; gpu: bf16 and float32 at the 12-layer d_model 768
model's shapes."""
import pytest
import torch
import torch.nn.functional as F

import helpers
from linattn.ops import fused

GPU = pytest.mark.gpu


# ----------------------------------------------------------------------------- oracles

def conv_oracle(x, weight, cache=None, cu_seqlens=None, activation="silu"):
    """Sequence by sequence: left-pad with its cache (or zeros) and run F.conv1d."""
    B, T, C = x.shape
    W = weight.shape[1]
    bounds = ([(b, 0, T) for b in range(B)] if cu_seqlens is None else
              [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])])
    ys, caches = [], []
    for n, (b, s, e) in enumerate(bounds):
        prev = cache[n].to(x.dtype) if cache is not None else x.new_zeros(W - 1, C)
        xx = torch.cat([prev, x[b, s:e]], 0)                             # [W-1+L, C]
        z = (F.conv1d(xx.t()[None], weight.to(x.dtype)[:, None], groups=C)[0].t()  # [L, C]
             if e > s else xx[:0])
        ys.append(F.silu(z) if activation == "silu" else z)
        caches.append(xx[xx.shape[0] - (W - 1):])
    y = torch.stack(ys) if cu_seqlens is None else torch.cat(ys)[None]
    return y, torch.stack(caches)


def conv_l2_oracle(x, weight, cache=None, cu_seqlens=None, activation="silu", norm_channels=0,
                   norm_group=1):
    """The conv, then each group of norm_group among the first norm_channels outputs over
    max(its norm, 1e-6)."""
    y, c = conv_oracle(x, weight, cache, cu_seqlens, activation)
    head = y[..., :norm_channels].unflatten(-1, (norm_channels // norm_group, norm_group))
    head = head / head.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return torch.cat([head.flatten(-2), y[..., norm_channels:]], -1), c


def rms_oracle(x, weight, eps=1e-6):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.to(x.dtype)


GATE_ORACLES = {"silu": F.silu, "sigmoid": torch.sigmoid}


def gated_oracle(o, weight, gate, activation, eps=1e-6):
    y = rms_oracle(o, weight, eps).flatten(-2)
    return y if activation is None else y * GATE_ORACLES[activation](gate)


def l2_oracle(x, eps=1e-6):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def swiglu_oracle(gate_up):
    g, u = gate_up.chunk(2, -1)
    return g * torch.sigmoid(g) * u


# ----------------------------------------------------------------------------- short conv

def _conv_inputs(B, T, C, W, lengths=None, cache=True, seed=0, device="cpu"):
    gen = helpers.seeded(seed)
    cu = None
    if lengths is not None:
        B, T = 1, sum(lengths)
        cu = helpers.cu_seqlens_from_lengths(lengths, device)
    N = B if lengths is None else len(lengths)
    inputs = dict(x=helpers.randn(B, T, C, gen=gen, device=device),
                  weight=helpers.randn(C, W, gen=gen, scale=0.5, device=device),
                  cache=helpers.randn(N, W - 1, C, gen=gen, device=device) if cache else None,
                  cu_seqlens=cu)
    return inputs, ["x", "weight"] + (["cache"] if cache and W > 1 else [])


def _conv_fn(backend, activation, norm_channels=0, norm_group=0):
    def run(x, weight, cache=None, cu_seqlens=None):
        return fused.short_conv(x, weight, cache, cu_seqlens, activation, return_cache=True,
                                backend=backend, norm_channels=norm_channels,
                                norm_group=norm_group)
    return run


def _conv_oracle_fn(activation, norm_channels=0, norm_group=1):
    def run(x, weight, cache=None, cu_seqlens=None):
        return conv_l2_oracle(x, weight, cache, cu_seqlens, activation, norm_channels,
                              norm_group)
    return run


CONV_CASES = [  # (B, T, C, W, lengths, cache, activation)
    (2, 33, 70, 4, None, True, "silu"),
    (1, 1, 16, 4, None, False, "silu"),
    (3, 15, 20, 1, None, True, None),
    (1, 0, 40, 4, [5, 0, 1, 2, 31], True, "silu"),
    (1, 0, 24, 3, [0, 17, 1], False, None),
    # several backward programs along T (each sums the dw of BWD_ROWS rows)
    (2, 300, 24, 4, None, False, "silu"),
    (1, 0, 16, 4, [250, 3, 90], True, "silu"),
    # sequences shorter than W across the row tiles' edges (16, 32 and 64 rows)
    (1, 0, 24, 4, [15, 2, 14, 2, 1, 0, 29, 3, 40], True, "silu"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"B{c[0]}T{c[1]}C{c[2]}W{c[3]}"
                         f"{'-varlen' if c[4] else ''}{'-cache' if c[5] else ''}-{c[6]}")
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_short_conv_matches_oracle(case, backend, dtype):
    B, T, C, W, lengths, cache, act = case
    inputs, names = _conv_inputs(B, T, C, W, lengths, cache)
    helpers.check_against_oracle(_conv_fn(backend, act), _conv_oracle_fn(act), inputs,
                                 dtype=dtype, grad_names=names, activations=("x", "cache"))


@pytest.mark.parametrize("lengths", [None, [5, 0, 17, 3]])
@pytest.mark.parametrize("norm_channels", [0, 32])
def test_short_conv_reads_a_channel_slice_in_place(lengths, norm_channels):
    """x a column slice of a wider [B, T, C'] (one projection of a fused GEMM's output): the
    Triton conv reads its rows at their stride and gives the contiguous input's values and
    gradients, the gradient of the wider tensor zero outside the slice."""
    C, W, extra = 48, 4, 13
    inputs, _ = _conv_inputs(2, 21, C + extra, W, lengths, cache=False)
    wide = inputs["x"].float().requires_grad_()
    weight = inputs["weight"][:C].float().requires_grad_()
    cu = inputs["cu_seqlens"]
    run = _conv_fn("triton", "silu", norm_channels, 16 if norm_channels else 0)
    x = wide[..., 3:3 + C]
    from linattn.ops.triton.short_conv import _row_view
    assert not x.is_contiguous() and _row_view(x)[0] is x          # read in place, no copy
    y, cache = run(x, weight, None, cu)
    dy = torch.randn_like(y)
    dwide, dw = torch.autograd.grad((y * dy).sum() + cache.sum(), [wide, weight])
    xc = x.detach().contiguous().requires_grad_()
    yc, cachec = run(xc, weight, None, cu)
    dxc, dwc = torch.autograd.grad((yc * dy).sum() + cachec.sum(), [xc, weight])
    assert torch.equal(y, yc) and torch.equal(cache, cachec) and torch.equal(dw, dwc)
    assert torch.equal(dwide[..., 3:3 + C], dxc)
    assert not dwide[..., :3].any() and not dwide[..., 3 + C:].any()


CONV_NORM_CASES = [  # (B, T, C, W, lengths, cache, activation, norm_channels, norm_group)
    # q and k of 2 heads of 16, then v with a partial channel block
    (2, 33, 70, 4, None, True, "silu", 64, 16),
    # packed with an empty and a length-1 sequence, groups of 32
    (1, 0, 72, 4, [5, 0, 1, 20], True, "silu", 64, 32),
    (2, 9, 48, 3, None, False, None, 32, 16),
    # one decoding step, every channel normalised
    (2, 1, 32, 4, None, True, "silu", 32, 16),
    # several backward programs along T
    (1, 0, 40, 4, [250, 3, 90], True, "silu", 32, 16),
    # DeltaNet's heads of 128 (a plain block half past C)
    (1, 5, 320, 4, None, True, "silu", 256, 128),
    # a group the kernel does not tile: the norm after the conv
    (2, 20, 30, 4, None, True, "silu", 24, 12),
]


@pytest.mark.parametrize("case", CONV_NORM_CASES, ids=lambda c: f"B{c[0]}T{c[1]}C{c[2]}W{c[3]}"
                         f"{'-varlen' if c[4] else ''}{'-cache' if c[5] else ''}-{c[6]}"
                         f"-NC{c[7]}G{c[8]}")
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_short_conv_l2_matches_oracle(case, backend, dtype):
    """The conv with its first channels L2-normalised per group: forward and the gradients of
    x, weight and cache against the conv followed by an explicit normalisation."""
    B, T, C, W, lengths, cache, act, nc, G = case
    inputs, names = _conv_inputs(B, T, C, W, lengths, cache)
    helpers.check_against_oracle(_conv_fn(backend, act, nc, G), _conv_oracle_fn(act, nc, G),
                                 inputs, dtype=dtype, grad_names=names,
                                 activations=("x", "cache"))


@pytest.mark.parametrize("lengths,cache", [(None, False), ([31, 2, 1, 0, 29, 3, 40], True)],
                         ids=["dense", "varlen-cache"])
def test_short_conv_bf16_matches_oracle(lengths, cache):
    """bfloat16 through the interpreter, q and k in groups of 128 and a plain v: dz between
    the backward's two passes is rounded to bfloat16, within the rule."""
    inputs, names = _conv_inputs(2, 70, 320, 4, lengths, cache=cache, seed=7)
    helpers.check_against_oracle(_conv_fn("triton", "silu", 256, 128),
                                 _conv_oracle_fn("silu", 256, 128), inputs,
                                 dtype=torch.bfloat16, grad_names=names,
                                 activations=("x", "cache"))


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_short_conv_l2_zero_group_clamps(backend, dtype):
    """A group whose inputs and cache are all zero: its output is 0 (the norm clamps at
    1e-6) and every gradient is finite, as the oracle's."""
    inputs, names = _conv_inputs(2, 12, 48, 4, cache=True, seed=5)
    inputs["x"][..., 16:32] = 0
    inputs["cache"][..., 16:32] = 0
    fn = _conv_fn(backend, "silu", 32, 16)
    leaves = {n: inputs[n].to(dtype).requires_grad_() for n in names}
    y, c = fn(**leaves)
    assert y[..., 16:32].abs().max() == 0
    want, _ = conv_l2_oracle(inputs["x"], inputs["weight"], inputs["cache"], None, "silu", 32, 16)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.square().sum() + y.sum() + c.sum(), list(leaves.values()))
    for n, g in zip(names, grads):
        assert torch.isfinite(g).all(), f"d{n} is not finite"


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_short_conv_l2_decodes_token_by_token(backend, dtype):
    """With the norm: T = 1 steps carrying the cache give the full-sequence output."""
    inputs, _ = _conv_inputs(2, 7, 40, 4, cache=True, seed=4)
    x, w, c0 = (inputs[n].to(dtype) for n in ("x", "weight", "cache"))
    kw = dict(return_cache=True, backend=backend, norm_channels=32, norm_group=16)
    y, c = fused.short_conv(x, w, c0, **kw)
    cache, steps = c0, []
    for t in range(x.shape[1]):
        yt, cache = fused.short_conv(x[:, t:t + 1], w, cache, **kw)
        steps.append(yt)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(steps, 1), y, **tol)
    torch.testing.assert_close(cache, c, **tol)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_short_conv_decodes_token_by_token(backend, dtype):
    """T = 1 steps carrying the cache give the full-sequence output and final cache; a packed
    call continuing from per-sequence caches equals separate calls (no leakage)."""
    inputs, _ = _conv_inputs(2, 9, 20, 4, cache=True, seed=3)
    x, w, c0 = (inputs[n].to(dtype) for n in ("x", "weight", "cache"))
    y, c = fused.short_conv(x, w, c0, return_cache=True, backend=backend)
    cache, steps = c0, []
    for t in range(x.shape[1]):
        yt, cache = fused.short_conv(x[:, t:t + 1], w, cache, return_cache=True, backend=backend)
        steps.append(yt)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(steps, 1), y, **tol)
    torch.testing.assert_close(cache, c, **tol)
    cu = helpers.cu_seqlens_from_lengths([4, 9])
    packed = torch.cat([x[0, :4], x[1]])[None]
    yp, cp = fused.short_conv(packed, w, c0, cu, return_cache=True, backend=backend)
    y0, c0_ = fused.short_conv(x[:1, :4], w, c0[:1], return_cache=True, backend=backend)
    torch.testing.assert_close(yp, torch.cat([y0[0], y[1]])[None], **tol)
    torch.testing.assert_close(cp, torch.cat([c0_, c[1:]]), **tol)


def test_short_conv_rejects_bad_input():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="weight"):
        fused.short_conv(x, torch.randn(7, 4))
    with pytest.raises(ValueError, match="cache"):
        fused.short_conv(x, torch.randn(8, 4), torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match="B == 1"):
        fused.short_conv(x, torch.randn(8, 4), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="backend"):
        fused.short_conv(x, torch.randn(8, 4), backend="cuda")
    for nc, g in [(6, 4), (-4, 4), (16, 16), (4, 0)]:
        with pytest.raises(ValueError, match="norm_channels"):
            fused.short_conv(x, torch.randn(8, 4), norm_channels=nc, norm_group=g)


# ----------------------------------------------------------------------------- norms, SwiGLU

def _norm_cases(device="cpu", shape=(2, 7, 3, 20), seed=0):
    gen = helpers.seeded(seed)
    B, T, H, V = shape
    o = helpers.randn(B, T, H, V, gen=gen, scale=3.0, device=device)
    gate = helpers.randn(B, T, H * V, gen=gen, device=device)
    w = (1 + helpers.randn(V, gen=gen, scale=0.3)).to(device)
    return o, gate, w


@pytest.mark.parametrize("activation", ["silu", "sigmoid", None])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_gated_rms_norm_matches_oracle(activation, backend, dtype):
    o, gate, w = _norm_cases()
    inputs = dict(q=o, v=gate, weight=w)

    def fast(q, v, weight):
        return fused.gated_rms_norm(q, weight, v, activation, 1e-6, backend=backend), None

    def oracle(q, v, weight):
        return gated_oracle(q, weight, v, activation), None

    helpers.check_against_oracle(fast, oracle, inputs, dtype=dtype,
                                 grad_names=["q", "weight"] + (["v"] if activation else []))


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_rms_norm_matches_oracle(with_weight, backend, dtype):
    gen = helpers.seeded(1)
    inputs = dict(q=helpers.randn(3, 5, 37, gen=gen, scale=2.0, noncontig=True),
                  weight=1 + helpers.randn(37, gen=gen, scale=0.3) if with_weight else None)

    def fast(q, weight):
        return fused.rms_norm(q, weight, 1e-6, backend=backend), None

    def oracle(q, weight):
        return rms_oracle(q, weight), None

    helpers.check_against_oracle(fast, oracle, inputs, dtype=dtype,
                                 grad_names=["q"] + (["weight"] if with_weight else []))


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_l2_normalize_strided_slice_matches_oracle(backend, dtype):
    """q as the first 2 heads of a conv output [B, T, 100] (a strided view), one row of norm
    below eps (the eps branch: no projection in the gradient)."""
    gen = helpers.seeded(2)
    qkv = helpers.randn(2, 9, 100, gen=gen)
    qkv[0, 3, :20] *= 1e-8
    inputs = dict(q=qkv)

    def fast(q):
        return fused.l2_normalize(q[..., :40].unflatten(-1, (2, 20)), backend=backend), None

    def oracle(q):
        return l2_oracle(q[..., :40].unflatten(-1, (2, 20))), None

    helpers.check_against_oracle(fast, oracle, inputs, dtype=dtype, grad_names=["q"])


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_swiglu_matches_oracle(backend, dtype):
    inputs = dict(q=helpers.randn(3, 5, 2 * 150, gen=helpers.seeded(3), scale=2.0))
    helpers.check_against_oracle(lambda q: (fused.swiglu(q, backend=backend), None),
                                 lambda q: (swiglu_oracle(q), None), inputs, dtype=dtype,
                                 grad_names=["q"])


class _RowNormFewPrograms(torch.autograd.Function):
    """The row-norm launchers on 2 programs, so each walks several row blocks."""

    @staticmethod
    def forward(ctx, x, weight, gate, l2, act):
        from linattn.ops.triton import norms
        ctx.save_for_backward(x, weight, gate)
        ctx.l2, ctx.act = l2, act
        return norms._launch_fwd(x, weight, gate, 1e-6, l2, act, max_programs=2)

    @staticmethod
    def backward(ctx, dy):
        from linattn.ops.triton import norms
        x, weight, gate = ctx.saved_tensors
        dx, dw, dgate = norms._launch_bwd(dy, x, weight, gate, 1e-6, ctx.l2, ctx.act,
                                          max_programs=2)
        return (dx, dw if weight is not None else None, dgate if gate is not None else None,
                None, None)


@pytest.mark.parametrize("l2,activation,with_weight", [
    (False, "silu", True), (False, "sigmoid", False), (False, None, True), (True, None, False)])
def test_row_norm_programs_walk_several_blocks(l2, activation, with_weight):
    """210 rows of 3 heads x 20 (blocks of 64 rows) on 2 programs: the persistent loop, its
    float32 dw partials and their sum, against the float64 oracles (strided x and gate)."""
    gen = helpers.seeded(5)
    M, H, D = 70, 3, 20
    inputs = dict(q=helpers.randn(M, H * D + 7, gen=gen, scale=2.0),
                  v=helpers.randn(M, H * D, gen=gen) if activation else None,
                  weight=1 + helpers.randn(D, gen=gen, scale=0.3) if with_weight else None)
    act = {None: 0, "silu": 1, "sigmoid": 2}[activation]

    def fast(q, v=None, weight=None):
        g = v.unflatten(-1, (H, D)) if v is not None else None
        return _RowNormFewPrograms.apply(q[:, :H * D].unflatten(-1, (H, D)), weight, g, l2,
                                         act), None

    def oracle(q, v=None, weight=None):
        x = q[:, :H * D].unflatten(-1, (H, D))
        if l2:
            return l2_oracle(x), None
        y = rms_oracle(x, weight)
        return (y if activation is None else y * GATE_ORACLES[activation](v.unflatten(-1, (H, D)))), None

    helpers.check_against_oracle(fast, oracle, inputs, dtype=torch.float32,
                                 grad_names=[n for n in ("q", "v", "weight") if inputs[n] is not None])


def test_auto_backend_is_a_function_of_device_and_dtype():
    x = torch.randn(2, 3)
    assert not fused.takes_triton(x) and not fused.takes_triton(x.double())
    assert fused.takes_triton(x, "triton")  # CPU tensors under the interpreter (conftest)
    with pytest.raises(TypeError, match="float64"):
        fused.takes_triton(x.double(), "triton")


def test_pieces_trace_without_graph_breaks():
    """Both paths under torch.compile(fullgraph=True, backend='aot_eager'): the PyTorch path
    as plain ops, the Triton path through the custom ops' fake kernels; forward and
    gradients equal eager."""
    x = torch.randn(1, 12, 24, requires_grad=True)
    w = torch.randn(24, 4, requires_grad=True)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    nw = torch.randn(6, requires_grad=True)

    def pieces(x, w, nw, backend):
        y, c = fused.short_conv(x, w, None, cu, "silu", True, backend=backend)
        yn, _ = fused.short_conv(x, w, None, cu, "silu", backend=backend, norm_channels=16,
                                 norm_group=16)
        y = y + yn
        q = fused.l2_normalize(y[..., :12].unflatten(-1, (2, 6)), backend=backend)
        o = fused.gated_rms_norm(q, nw, y[..., 12:], "silu", 1e-6, backend=backend)
        s = fused.swiglu(fused.rms_norm(o, None, 1e-6, backend=backend), backend=backend)
        return s.sum() + c.sum()

    for backend in ("torch", "triton"):
        torch._dynamo.reset()
        compiled = torch.compile(pieces, backend="aot_eager", fullgraph=True)
        want = pieces(x, w, nw, backend)
        got = compiled(x, w, nw, backend)
        torch.testing.assert_close(got, want)
        gw = torch.autograd.grad(want, [x, w, nw])
        gg = torch.autograd.grad(got, [x, w, nw])
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- GPU

@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("norm_channels", [0, 1536], ids=["plain", "qk-l2"])
def test_short_conv_gpu(dtype, varlen, norm_channels):
    """The DeltaNet conv of the 12-layer d_model 768 model: C = 2304, 8 x 2048 tokens; with
    q and k L2-normalised per head of 128 inside it (qk-l2) or not."""
    lengths = [2048, 1, 0, 3000, 11283] if varlen else None
    inputs, names = _conv_inputs(8, 2048, 2304, 4, lengths, cache=True, device="cuda")
    G = 128 if norm_channels else 0
    helpers.check_against_oracle(_conv_fn("auto", "silu", norm_channels, G),
                                 _conv_oracle_fn("silu", norm_channels, max(G, 1)), inputs,
                                 dtype=dtype, grad_names=names, activations=("x", "cache"),
                                 device="cuda")


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
def test_gated_rms_norm_gpu(dtype, activation):
    o, gate, w = _norm_cases("cuda", shape=(8, 2048, 6, 128))
    inputs = dict(q=o, v=gate, weight=w)
    helpers.check_against_oracle(
        lambda q, v, weight: (fused.gated_rms_norm(q, weight, v, activation, 1e-6), None),
        lambda q, v, weight: (gated_oracle(q, weight, v, activation), None), inputs,
        dtype=dtype, grad_names=["q", "v", "weight"], device="cuda")


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_l2_swiglu_gpu(dtype):
    gen = helpers.seeded(4)
    h = dict(q=helpers.randn(16384, 768, gen=gen, device="cuda", scale=3.0),
             weight=(1 + helpers.randn(768, gen=gen, scale=0.3)).cuda())
    # backend="triton": "auto" runs these two on PyTorch when a gradient is recorded
    helpers.check_against_oracle(lambda q, weight: (fused.rms_norm(q, weight, 1e-6, backend="triton"), None),
                                 lambda q, weight: (rms_oracle(q, weight), None), h,
                                 dtype=dtype, grad_names=["q", "weight"], device="cuda")
    qkv = dict(q=helpers.randn(8, 2048, 2304, gen=gen, device="cuda"))
    helpers.check_against_oracle(
        lambda q: (fused.l2_normalize(q[..., 768:1536].unflatten(-1, (6, 128)), backend="triton"), None),
        lambda q: (l2_oracle(q[..., 768:1536].unflatten(-1, (6, 128))), None), qkv,
        dtype=dtype, grad_names=["q"], device="cuda")
    gu = dict(q=helpers.randn(16384, 2 * 2048, gen=gen, device="cuda", scale=2.0))
    helpers.check_against_oracle(lambda q: (fused.swiglu(q), None),
                                 lambda q: (swiglu_oracle(q), None), gu, dtype=dtype,
                                 grad_names=["q"], device="cuda")


@GPU
def test_pieces_compile_with_inductor_gpu():
    """The Triton path under torch.compile(fullgraph=True) with inductor equals eager."""
    x = torch.randn(2, 256, 2304, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2304, 4, device="cuda", requires_grad=True)
    nw = torch.randn(128, device="cuda", requires_grad=True)

    def pieces(x, w, nw):
        y, _ = fused.short_conv(x, w)
        y = y + fused.short_conv(x, w, norm_channels=1536, norm_group=128)[0]
        q = fused.l2_normalize(y[..., :768].unflatten(-1, (6, 128)), backend="triton")
        o = fused.gated_rms_norm(q, nw, y[..., 768:1536], "silu", 1e-6)
        return fused.swiglu(fused.rms_norm(o, None, 1e-6, backend="triton")).float().square().sum()

    compiled = torch.compile(pieces, fullgraph=True)
    want, got = pieces(x, w, nw), compiled(x, w, nw)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, [x, w, nw]), torch.autograd.grad(want, [x, w, nw])):
        torch.testing.assert_close(a, b)


def test_auto_takes_pytorch_for_the_row_norms_under_autograd():
    """rms_norm and l2_normalize: "auto" runs Triton only without a gradient to record (their
    Triton backward loses to PyTorch's); the other pieces keep Triton either way."""
    x = torch.randn(4, 8)
    assert fused._forward_only_triton("auto", x) == "auto"
    assert fused._forward_only_triton("auto", x.requires_grad_()) == "torch"
    with torch.no_grad():
        assert fused._forward_only_triton("auto", x) == "auto"
    assert fused._forward_only_triton("triton", x) == "triton"
    assert fused._forward_only_triton("auto", torch.randn(3), None) == "auto"


# ----------------------------------------------------------------------------- norm + projection

def _norm_linear_inputs(dtype, activation, bias, seed=4):
    o, gate, w = _norm_cases(seed=seed)
    gen = helpers.seeded(seed + 1)
    N, HV = 11, gate.shape[-1]
    pw = helpers.randn(N, HV, gen=gen, scale=HV ** -0.5)
    pb = helpers.randn(N, gen=gen) if bias else None
    leaves = [t.to(dtype).requires_grad_() if t is not None else None
              for t in (o, w, gate if activation else None, pw, pb)]
    return leaves


@pytest.mark.parametrize("activation", ["silu", "sigmoid", None])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_gated_norm_linear_equals_the_unfused_composition(activation, bias, backend, dtype):
    """Values and gradients equal to F.linear(gated_rms_norm(...)): the backward recomputes
    the norm's output with the forward's own code."""
    o, w, gate, pw, pb = _norm_linear_inputs(dtype, activation, bias)
    leaves = [t for t in (o, w, gate, pw, pb) if t is not None]
    got = fused.gated_rms_norm_linear(o, w, gate, activation, 1e-6, pw, pb, backend=backend)
    want = F.linear(fused.gated_rms_norm(o, w, gate, activation, 1e-6, backend=backend), pw, pb)
    dy = torch.randn_like(want)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_gated_norm_linear_matches_oracle(activation, backend, dtype):
    o, w, gate, pw, pb = _norm_linear_inputs(torch.float64, activation, True)
    inputs = dict(q=o, weight=w, pw=pw, pb=pb) | (dict(v=gate) if activation else {})

    def fast(q, weight, pw, pb, v=None):
        return fused.gated_rms_norm_linear(q, weight, v, activation, 1e-6, pw, pb,
                                           backend=backend), None

    def oracle(q, weight, pw, pb, v=None):
        return F.linear(gated_oracle(q, weight, v, activation), pw, pb), None

    helpers.check_against_oracle(fast, oracle, {k: t.detach() for k, t in inputs.items()},
                                 dtype=dtype, grad_names=list(inputs))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gated_norm_linear_under_bf16_autocast(backend):
    """Under autocast the projection runs in bf16 as F.linear would; against float64 within
    bf16's rounding, gradients flowing to the float32 weights."""
    o, w, gate, pw, _ = _norm_linear_inputs(torch.float32, "silu", False)
    ob, gb = o.detach().bfloat16().requires_grad_(), gate.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused.gated_rms_norm_linear(ob, w, gb, "silu", 1e-6, pw, backend=backend)
        want_lp = F.linear(fused.gated_rms_norm(ob, w, gb, "silu", 1e-6, backend=backend), pw)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want_lp)
    ref = F.linear(gated_oracle(o.double(), w.double(), gate.double(), "silu"), pw.double())
    torch.testing.assert_close(got.double(), ref, rtol=0.05, atol=0.05)
    dy = torch.randn_like(got)
    g_got = torch.autograd.grad(got, [ob, w, gb, pw], dy)
    g_want = torch.autograd.grad(want_lp, [ob, w, gb, pw], dy)
    for a, b in zip(g_got, g_want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=0.02, atol=0.02)


def test_gated_norm_linear_rejects_bad_input():
    o, w, gate, pw, _ = _norm_linear_inputs(torch.float32, "silu", False)
    with pytest.raises(ValueError, match="proj_weight"):
        fused.gated_rms_norm_linear(o, w, gate, "silu", 1e-6, pw[:, 1:])
    with pytest.raises(ValueError, match="proj_bias"):
        fused.gated_rms_norm_linear(o, w, gate, "silu", 1e-6, pw, torch.zeros(3))
    with pytest.raises(TypeError, match="outside autocast"):
        fused.gated_rms_norm_linear(o, w, gate, "silu", 1e-6, pw.double())


@pytest.mark.parametrize("triton", [False, True])
def test_gated_norm_linear_ops_pass_opcheck(triton):
    o, w, gate, pw, pb = (t.detach() for t in _norm_linear_inputs(torch.float32, "silu", True))
    args = (o.requires_grad_(), w.requires_grad_(), gate.requires_grad_(), pw.requires_grad_(),
            pb.requires_grad_(), 1e-6, 1, triton)
    torch.library.opcheck(fused._gated_norm_linear_op, args)
    if not triton:
        # the PyTorch path's backward runs torch.func.vjp, whose wrapped tensors opcheck's
        # cross-checks cannot read (nor are the plain ops' backward ops opchecked); the
        # compile test traces it
        return
    dy = torch.randn(*o.shape[:2], pw.shape[0])
    torch.library.opcheck(fused._gated_norm_linear_backward_op,
                          (dy, o.detach(), w.detach(), gate.detach(), pw.detach(), 1e-6, 1,
                           triton, True))


def test_gated_norm_linear_traces_without_graph_breaks():
    o, w, gate, pw, _ = _norm_linear_inputs(torch.float32, "silu", False)

    def f(o, w, gate, pw, backend):
        return fused.gated_rms_norm_linear(o, w, gate, "silu", 1e-6, pw, backend=backend).sum()

    for backend in ("torch", "triton"):
        torch._dynamo.reset()
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        want, got = f(o, w, gate, pw, backend), compiled(o, w, gate, pw, backend)
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, [o, w, gate, pw]),
                        torch.autograd.grad(want, [o, w, gate, pw])):
            torch.testing.assert_close(a, b)


def _projected_inputs(dtype, bias, seed=6, D=13):
    """(o, weight, x, gate_weight, gate_bias, proj_weight, proj_bias): gated_rms_norm_linear's
    inputs with the gate a projection of x [B, T, D]."""
    o, w, _, pw, pb = _norm_linear_inputs(dtype, "silu", bias, seed=seed)
    gen = helpers.seeded(seed + 2)
    B, T, H, V = o.shape
    x = helpers.randn(B, T, D, gen=gen).to(dtype).requires_grad_()
    gw = helpers.randn(H * V, D, gen=gen, scale=D ** -0.5).to(dtype).requires_grad_()
    gb = helpers.randn(H * V, gen=gen).to(dtype).requires_grad_() if bias else None
    return o, w, x, gw, gb, pw, pb


def _present(*ts):
    return [t for t in ts if t is not None]


def _assert_equal_values_and_grads(got, want, leaves, names):
    assert torch.equal(got, want), (got - want).abs().max()
    dy = torch.randn_like(want)
    for n, a, b in zip(names, torch.autograd.grad(got, leaves, dy),
                       torch.autograd.grad(want, leaves, dy)):
        assert a.dtype == b.dtype, n
        assert torch.equal(a, b), f"d{n} differs by {(a.double() - b.double()).abs().max():.3g}"


@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_projected_gate_norm_linear_equals_the_unfused_composition(activation, bias, backend,
                                                                   dtype):
    """Bitwise the values and every gradient (o, the norm's weight, x, the gate's weight and
    bias, the out-projection's weight and bias) of
    F.linear(gated_rms_norm(o, w, F.linear(x, gw, gb)), pw, pb): the backward recomputes the
    gate and takes its gradient back through the projection as F.linear's backward does."""
    o, w, x, gw, gb, pw, pb = _projected_inputs(dtype, bias)
    leaves = _present(o, w, x, gw, gb, pw, pb)
    names = _present("o", "weight", "x", "gate_weight", gb is not None and "gate_bias",
                     "proj_weight", pb is not None and "proj_bias")
    got = fused.gated_rms_norm_linear_projected(o, w, x, gw, gb, activation, 1e-6, pw, pb,
                                                backend=backend)
    gate = F.linear(x, gw, gb)
    want = F.linear(fused.gated_rms_norm(o, w, gate, activation, 1e-6, backend=backend), pw, pb)
    _assert_equal_values_and_grads(got, want, leaves, names)
    with torch.no_grad():
        assert torch.equal(fused.gated_rms_norm_linear_projected(
            o, w, x, gw, gb, activation, 1e-6, pw, pb, backend=backend), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_projected_gate_norm_linear_under_bf16_autocast(backend):
    """Under autocast the gate's projection runs in bf16 as F.linear would: bitwise the
    unprojected node on autocast's gate, gradients flowing to the float32 weights."""
    o, w, x, gw, _, pw, _ = _projected_inputs(torch.float32, False)
    ob = o.detach().bfloat16().requires_grad_()
    xb = x.detach().bfloat16().requires_grad_()        # the mixers' shared bf16 copy of x
    leaves = [ob, w, xb, gw, pw]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused.gated_rms_norm_linear_projected(ob, w, xb, gw, None, "silu", 1e-6, pw,
                                                    backend=backend)
        want = fused.gated_rms_norm_linear(ob, w, F.linear(xb, gw), "silu", 1e-6, pw,
                                           backend=backend)
    assert got.dtype == torch.bfloat16
    _assert_equal_values_and_grads(got, want, leaves, ["o", "weight", "x", "gate_weight",
                                                       "proj_weight"])


def test_projected_gate_norm_linear_rejects_bad_input():
    o, w, x, gw, _, pw, _ = (t.detach() if t is not None else None
                             for t in _projected_inputs(torch.float32, False))
    with pytest.raises(ValueError, match="activation"):
        fused.gated_rms_norm_linear_projected(o, w, x, gw, None, None, 1e-6, pw)
    with pytest.raises(ValueError, match="x must be"):
        fused.gated_rms_norm_linear_projected(o, w, x[:, 1:], gw, None, "silu", 1e-6, pw)
    with pytest.raises(ValueError, match="gate_weight"):
        fused.gated_rms_norm_linear_projected(o, w, x, gw[1:], None, "silu", 1e-6, pw)
    with pytest.raises(ValueError, match="gate_bias"):
        fused.gated_rms_norm_linear_projected(o, w, x, gw, torch.zeros(3), "silu", 1e-6, pw)
    with pytest.raises(ValueError, match="proj_weight"):
        fused.gated_rms_norm_linear_projected(o, w, x, gw, None, "silu", 1e-6, pw[:, 1:])
    with pytest.raises(TypeError, match="outside autocast"):
        fused.gated_rms_norm_linear_projected(o, w, x, gw.double(), None, "silu", 1e-6, pw)


def test_projected_gate_norm_linear_ops_pass_opcheck():
    """The Triton path (the PyTorch path's backward runs torch.func.vjp, which opcheck's
    cross-checks cannot read; the compile test traces it)."""
    o, w, x, gw, gb, pw, pb = (t.detach() for t in _projected_inputs(torch.float32, True))
    args = [t.requires_grad_() for t in (o, w, x, gw, gb, pw, pb)] + [1e-6, 1, True]
    torch.library.opcheck(fused._projected_gate_norm_linear_op, tuple(args))
    dy = torch.randn(*o.shape[:2], pw.shape[0])
    torch.library.opcheck(fused._projected_gate_norm_linear_backward_op,
                          (dy, o.detach(), w.detach(), x.detach(), gw.detach(), gb.detach(),
                           pw.detach(), 1e-6, 1, True, True))


def test_projected_gate_norm_linear_traces_without_graph_breaks():
    o, w, x, gw, gb, pw, _ = _projected_inputs(torch.float32, True)
    leaves = [o, w, x, gw, gb, pw]

    def f(o, w, x, gw, gb, pw, backend):
        return fused.gated_rms_norm_linear_projected(o, w, x, gw, gb, "silu", 1e-6, pw,
                                                     backend=backend).sum()

    for backend in ("torch", "triton"):
        torch._dynamo.reset()
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        want, got = f(*leaves, backend), compiled(*leaves, backend)
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
            torch.testing.assert_close(a, b)


@GPU
def test_gated_norm_linear_gpu():
    """The 12-layer d_model 768 model's shape under bf16 autocast: equal to the unfused
    composition (the forward bitwise, the gradients to the order of bf16 sums)."""
    o, gate, w = _norm_cases("cuda", shape=(2, 8192, 6, 128))
    o, gate = o.bfloat16().requires_grad_(), gate.bfloat16().requires_grad_()
    w = w.requires_grad_()
    pw = (torch.randn(768, 768, device="cuda") / 768 ** 0.5).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fused.gated_rms_norm_linear(o, w, gate, "silu", 1e-6, pw)
        want = F.linear(fused.gated_rms_norm(o, w, gate, "silu", 1e-6), pw)
    assert torch.equal(got, want)
    dy = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, [o, w, gate, pw], dy),
                    torch.autograd.grad(want, [o, w, gate, pw], dy)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
