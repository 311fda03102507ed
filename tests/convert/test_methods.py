"""Each `linattn convert` method's layer against a float64 reference written from its authors'
code (docs/linearization.md): Liger Attention (GLA on softmax-mapped, unrotated q/k with the
key projection as the gate and no denominator, mixed 0.5/0.5 with window softmax attention on
the rotated q/k) and LoLCATs (window softmax terms weighted by sigmoid(w), starting at 0.1,
and the linear terms outside the window in one normalisation)."""
import math

import torch
import torch.nn.functional as F

from linattn.convert.llama import method_options
from linattn.layers import LinearizedAttention
from linattn.layers.attention import rope

D_MODEL, H, KV, T, W = 32, 4, 2, 13, 5
D = D_MODEL // H


def layer(method):
    torch.manual_seed(0)
    opts = method_options(method, window=None if method in ("liger", "hedgehog") else W, head_dim=D)
    return LinearizedAttention(D_MODEL, H, n_kv_heads=KV, backend="torch", **opts).double()


def qkv(m, x):
    q = m.q_proj(x).unflatten(-1, (H, D))
    rep = lambda z: z.unflatten(-1, (KV, D)).repeat_interleave(H // KV, dim=2)  # GQA: kv head j -> 2j, 2j+1
    k, v = rep(m.k_proj(x)), rep(m.v_proj(x))
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    return q, k, v, rope(q, pos, m.rope_theta), rope(k, pos, m.rope_theta)


def window_masks(n):
    t, s = torch.arange(n)[:, None], torch.arange(n)[None]
    return (s <= t) & (s > t - W), s <= t - W  # window, linear-only


def liger_reference(m, x):
    """Liger's layer: o = 0.5 SWA(q_r, k_r, v) + 0.5 GLA(softmax(q), softmax(k), v, logsigmoid(k) / 16)."""
    q, k, v, qr, kr = qkv(m, x)
    fq, fk = q.softmax(-1), k.softmax(-1)
    G = (F.logsigmoid(k) / 16).cumsum(1)                                    # [B, T, H, D] per key feature
    n = x.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    decay = torch.exp(G[:, :, None] - G[:, None])                           # [B, t, s, H, D]
    a = torch.einsum("bthd,bshd,btshd->bhts", fq, fk, decay) * causal     # no denominator
    o_gla = torch.einsum("bhts,bshd->bthd", a, v)
    win, _ = window_masks(n)
    scores = torch.einsum("bthd,bshd->bhts", qr, kr) / math.sqrt(D)
    o_swa = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~win, -math.inf).softmax(-1), v)
    return m.o_proj((0.5 * o_swa + 0.5 * o_gla).flatten(-2))


def lolcats_reference(m, x):
    """LoLCATs' hybrid: (g sum_win exp(s - max) v + sum_lin phi v) / (g sum_win exp(s - max) + sum_lin phi),
    g = sigmoid(window_factor), phi the Hedgehog maps of the rotated q, k."""
    q, k, v, qr, kr = qkv(m, x)
    fq = m.q_map(qr)
    fk = m.k_map(kr.unflatten(2, (KV, H // KV))[:, :, :, 0]).repeat_interleave(H // KV, dim=2)
    win, lin = window_masks(x.shape[1])
    scores = torch.einsum("bthd,bshd->bhts", qr, kr) / math.sqrt(D)
    scores = scores.masked_fill(~win, -math.inf)
    g = torch.sigmoid(m.window_factor)[:, None, None]
    a_sm = g * torch.exp(scores - scores.amax(-1, keepdim=True))
    a_ln = torch.einsum("bthf,bshf->bhts", fq, fk) * lin
    o = torch.einsum("bhts,bshd->bthd", a_sm + a_ln, v) / (a_sm + a_ln).sum(-1).transpose(1, 2)[..., None]
    return m.o_proj(o.flatten(-2))


def test_liger_attention_is_liger_code():
    m = layer("liger-attention")
    assert not m.normalize and m.mix == 0.5 and method_options("liger-attention")["window"] == 64
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], liger_reference(m, x), rtol=1e-10, atol=1e-10)


def test_liger_recurrence_has_no_denominator():
    """The pure recurrence is Liger Attention's GLA branch alone: o_lin = S_t^T softmax(q_t)."""
    m = layer("liger")
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    q, k, v, _, _ = qkv(m, x)
    G = (F.logsigmoid(k) / 16).cumsum(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    a = torch.einsum("bthd,bshd,btshd->bhts", q.softmax(-1), k.softmax(-1),
                     torch.exp(G[:, :, None] - G[:, None])) * causal
    ref = m.o_proj(torch.einsum("bhts,bshd->bthd", a, v).flatten(-2))
    torch.testing.assert_close(m(x)[0], ref, rtol=1e-10, atol=1e-10)


def test_lolcats_is_lolcats_code():
    m = layer("lolcats")
    assert m.q_map.hedgehog.weight.shape == (H, D, D // 2) and m.k_map.hedgehog.weight.shape == (KV, D, D // 2)
    assert m.feature_dim == D  # [softmax(xW), softmax(-xW)] of D / 2 each: the state is as wide as the head
    torch.testing.assert_close(torch.sigmoid(m.window_factor.detach()), torch.full((H,), 0.1, dtype=torch.float64))
    with torch.no_grad():
        m.window_factor.copy_(torch.tensor([-2.0, -1.0, 0.5, 1.5]))  # heads weigh their windows differently
        for p in (m.q_map.hedgehog.weight, m.k_map.hedgehog.weight):
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], lolcats_reference(m, x), rtol=1e-10, atol=1e-10)
