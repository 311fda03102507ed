"""Mixer configurations shared by the layer tests: every registered mixer, plus its variants."""
import pytest
import torch

from linattn.layers import MIXERS

D_MODEL, N_HEADS = 32, 4

# (registry name, constructor options): every mixer once, variants where options change the math.
CASES = [(name, {}) for name in MIXERS] + [
    ("linear", {"feature_map": "identity"}),
    ("linear", {"feature_map": "hedgehog"}),
    ("linear", {"feature_map": "norm"}),
    ("hgrn2", {"lower_bound": 0.5}),
    ("gla", {"expand_k": 1.0, "expand_v": 0.5}),
    ("gla", {"conv_size": 4}),
    ("linear", {"conv_size": 4}),
    ("linear", {"feature_map": "norm", "conv_size": 4}),
    ("lightning", {"conv_size": 4}),
    ("mlstm", {"conv_size": 4}),
    ("mlstm_sig", {"conv_size": 4}),
    ("deltanet", {"expand_v": 2.0}),
    ("attention", {"window": 4}),
    ("mom", {"recurrence": "gla"}),
    ("mom", {"shared_memory": False, "top_k": 1}),
    ("linearized", {"n_kv_heads": 2, "window": 4}),
    ("linearized", {"recurrence": "linear", "feature_map": "hedgehog", "rope_linear": True,
                    "window": 4, "combine": "shared"}),
    ("linearized", {"recurrence": "gated_deltanet"}),
]
RECURRENT = [c for c in CASES if c[0] != "attention"]


def case_id(case):
    name, opts = case
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


def params(cases):
    return [pytest.param(c, id=case_id(c)) for c in cases]


def build(case, backend="reference", seed=0, **extra):
    """The mixer in float64 with seeded weights; biases and gains perturbed so none is trivial."""
    name, opts = case
    torch.manual_seed(seed)
    m = MIXERS[name](D_MODEL, N_HEADS, backend=backend, **opts, **extra).double()
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def cat_states(states):
    """Concatenates per-sequence states (tensors, tuples or dicts of tensors) along dim 0."""
    first = states[0]
    if isinstance(first, dict):
        return {k: cat_states([s[k] for s in states]) for k in first}
    if isinstance(first, tuple):
        return tuple(cat_states([s[j] for s in states]) for j in range(len(first)))
    return torch.cat(states, 0)


def flat_state(state):
    """The floating tensors of a state (positions left out), in a fixed order."""
    if state is None:
        return []
    if isinstance(state, dict):
        return [t for k in sorted(state) for t in flat_state(state[k])]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in flat_state(s)]
    return [state] if isinstance(state, torch.Tensor) and state.is_floating_point() else []

