"""LMConfig: layer patterns, validation with one-line ValueErrors, JSON round trip."""
import pytest

from linattn.layers import MIXERS
from linattn.models import LMConfig


def test_layer_patterns():
    assert LMConfig(vocab_size=8, n_layers=3, mixer="gla").layer_pattern() == ["gla"] * 3
    assert LMConfig(vocab_size=8, n_layers=6, mixer="gla", hybrid=2).layer_pattern() == \
        ["gla", "gla", "attention", "gla", "gla", "attention"]
    assert LMConfig(vocab_size=8, n_layers=2, hybrid=1).layer_pattern() == ["gated_deltanet", "attention"]
    explicit = ["mlstm", "attention", "hgrn2"]
    assert LMConfig(vocab_size=8, n_layers=3, mixer="gla", layers=explicit).layer_pattern() == explicit
    # an explicit pattern wins over hybrid (whose ratio then need not tile n_layers)
    assert LMConfig(vocab_size=8, n_layers=3, hybrid=1, layers=explicit).layer_pattern() == explicit


def test_defaults_are_valid_and_cover_every_mixer():
    for name in MIXERS:
        LMConfig(vocab_size=8, mixer=name).validate()


@pytest.mark.parametrize("kwargs, match", [
    (dict(mixer="mamba"), "unknown mixer 'mamba'"),
    (dict(layers=["gla", "softmax"]), r"layers\[1\]: unknown mixer"),
    (dict(layers=["gla"]), "n_layers=2"),
    (dict(hybrid=2, n_layers=4), "do not tile n_layers=4"),
    (dict(hybrid=0), "hybrid must be a positive int"),
    (dict(d_model=100, n_heads=3), "divisible"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=1.5), "n_layers"),
    (dict(mlp_ratio=-1.0), "mlp_ratio"),  # 0 is valid: blocks without MLP
    (dict(sliding_window=0), "sliding_window"),
    (dict(feature_map="relu"), "feature_map"),
    (dict(backend="cuda"), "backend"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(mixer_options={"mamba": {}}), "unknown mixer"),
    (dict(mixer_options={"gla": 3}), "mixer_options"),
    (dict(mixer_options={"gla": {"expand_q": 2}}), r"unknown option\(s\) \['expand_q'\]"),
    (dict(mixer_options={"gla": {"backend": "torch"}}), "unknown option"),
])
def test_bad_values_raise_one_line(kwargs, match):
    cfg = LMConfig(**{"vocab_size": 16, **kwargs})
    with pytest.raises(ValueError, match=match) as e:
        cfg.validate()
    assert "\n" not in str(e.value)


def test_json_round_trip(tmp_path):
    cfg = LMConfig(vocab_size=17, d_model=64, n_layers=4, mixer="linear", hybrid=1, feature_map="hedgehog",
                   sliding_window=8, tie_embeddings=False, mixer_options={"linear": {"eps": 1e-5}})
    path = tmp_path / "config.json"
    cfg.save_json(path)
    back = LMConfig.load_json(path)
    assert back == cfg
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    as_tuple = LMConfig(vocab_size=5, n_layers=2, layers=("gla", "attention"))
    assert LMConfig.from_dict(as_tuple.to_dict()) == as_tuple
    with pytest.raises(ValueError, match="unknown LMConfig field"):
        LMConfig.from_dict({**cfg.to_dict(), "n_layer": 3})
    with pytest.raises(ValueError, match="unknown mixer"):
        LMConfig.from_dict({**cfg.to_dict(), "mixer": "rwkv"})
