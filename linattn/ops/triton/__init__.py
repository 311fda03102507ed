"""Triton kernels. The entry points take validated inputs (see linattn.ops.api) with the
same signatures as linattn.ops.reference, `scale` already resolved to a float.

The gated linear-attention family (none / constant / scalar / per-key gates, mLSTM) lives in
the gated_* modules; the delta rule in the delta_* modules. Imports are lazy so that
`import linattn` never compiles or imports triton.
"""


def linear_attention(q, k, v, g=None, **kw):
    from .gated_api import linear_attention as impl
    return impl(q, k, v, g, **kw)


def mlstm(q, k, v, i, f, **kw):
    from .gated_api import mlstm as impl
    return impl(q, k, v, i, f, **kw)


def delta_rule(q, k, v, beta, g=None, **kw):
    from .delta_api import delta_rule as impl
    return impl(q, k, v, beta, g, **kw)
