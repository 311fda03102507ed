"""One tiny teacher for the conversion tests: transformers' LlamaForCausalLM (GQA: 4 query
heads, 2 key/value heads; untied head) trained briefly on the stdlib's json package."""
import sysconfig
from pathlib import Path

import pytest

CORPUS = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from linattn.convert.teacher import teacher_config, train_teacher
    from linattn.train import TrainConfig

    out = tmp_path_factory.mktemp("teacher")
    cfg = TrainConfig(steps=30, batch_size=4, lr=3e-3, device="cpu", ckpt_every=100)
    res = train_teacher(CORPUS, out, teacher_config(64, 2, 4, 2, max_len=256), cfg, seq_len=64, progress=False)
    assert res["done"] and res["losses"][-1] < res["losses"][0]
    return out
