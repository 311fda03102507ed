"""linattn convert: weights mapped one-to-one, the teacher reproduced where the method says
it is, save/load through the Auto classes, generation, unsupported models refused."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
import linattn.hf  # noqa: E402,F401  (registers the Auto classes)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from linattn.cli import main  # noqa: E402
from linattn.convert.llama import convert, weight_map  # noqa: E402
from linattn.layers import Attention, LinearizedAttention  # noqa: E402

NEW = {"liger": [], "liger-attention": [],
       "hedgehog": ["k_map.hedgehog.weight", "q_map.hedgehog.weight"],
       "lolcats": ["k_map.hedgehog.weight", "q_map.hedgehog.weight", "window_factor"]}


def load(path, dtype=torch.float64):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize("method", sorted(NEW))
def test_weights_mapped_one_to_one(teacher_dir, tmp_path, method):
    out = convert(teacher_dir, tmp_path / method, method)
    teacher, student = load(teacher_dir, torch.float32), load(out, torch.float32)
    src, dst = teacher.state_dict(), dict(student.named_parameters())
    mapped = 0
    for ours, theirs in weight_map(2, tied=False):
        if ours in dst:
            assert torch.equal(dst[ours], torch.cat([src[n] for n in theirs])), ours
            mapped += 1
    hidden = teacher.config.intermediate_size  # SwiGLU's fused projection: gate rows, then up rows
    gate_up = dst["model.blocks.1.mlp.gate_up.weight"]
    assert torch.equal(gate_up[:hidden], src["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(gate_up[hidden:], src["model.layers.1.mlp.up_proj.weight"])
    assert mapped == 3 + 2 * 8  # embed, norm, head; per layer 2 norms, gate_up, down, q, k, v, o
    assert dst["model.blocks.0.mixer.k_proj.weight"].shape == (32, 64)  # GQA: 2 kv heads of 16, not copied
    new = sorted({n.split("mixer.")[1] for n in json.loads((out / "linearization.json").read_text())["new_parameters"]})
    assert new == NEW[method]
    assert student.config.mlp_hidden == teacher.config.intermediate_size
    assert student.config.norm_eps == teacher.config.rms_norm_eps and not student.config.tie_embeddings


def test_reproduces_the_teacher_where_the_method_says(teacher_dir, tmp_path):
    """float64: Liger Attention with the recurrent branch's weight at 0 and LoLCATs (any
    window factor) with windows covering the sequence, and a model whose layers are all kept
    as attention, give the teacher's logits. transformers computes its RoPE table in float32,
    the one float32 step, hence 1e-6 relative."""
    ids = torch.randint(1, 257, (2, 40))
    teacher = load(teacher_dir)
    ref = teacher(input_ids=ids).logits
    tol = 1e-6 * ref.abs().max()
    la = load(convert(teacher_dir, tmp_path / "la", "liger-attention", window=40))
    for block in la.model.blocks:
        block.mixer.mix = 0.0
    lol = load(convert(teacher_dir, tmp_path / "lol", "lolcats", window=40))
    kept = load(convert(teacher_dir, tmp_path / "kept", "liger", keep_attention=[0, 1]))
    for model in (la, lol, kept):
        assert (model(input_ids=ids).logits - ref).abs().max() < tol
    liger = load(convert(teacher_dir, tmp_path / "liger", "liger"))
    assert (liger(input_ids=ids).logits - ref).abs().max() > 100 * tol  # the recurrence alone is not the teacher


def test_a_kept_layer_is_the_teachers_attention(teacher_dir, tmp_path):
    student = load(convert(teacher_dir, tmp_path / "hybrid", "hedgehog", keep_attention=[1]))
    assert isinstance(student.model.blocks[1].mixer, Attention)
    assert isinstance(student.model.blocks[0].mixer, LinearizedAttention)
    teacher = load(teacher_dir)
    seen = {}
    teacher.model.layers[1].self_attn.register_forward_hook(
        lambda m, a, kw, o: seen.update(x=kw["hidden_states"], y=o[0]), with_kwargs=True)
    teacher(input_ids=torch.randint(1, 257, (2, 30)))
    y, _ = student.model.blocks[1].mixer(seen["x"])
    assert (y - seen["y"]).abs().max() < 1e-6 * seen["y"].abs().max()


@pytest.mark.parametrize("keep", [[], ["--keep-attention", "1"]])
def test_save_load_generate(teacher_dir, tmp_path, keep):
    """Left-padded batch: the linear model prefills its rows packed (cu_seqlens), the hybrid
    one at a time; both continue from their recurrent and window caches."""
    out = tmp_path / "la"
    assert main(["convert", str(teacher_dir), str(out), "--method", "liger-attention", "--window", "4"] + keep) == 0
    model = load(out, torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["def f(x):", "import"], return_tensors="pt", padding=True)
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape == (2, ids["input_ids"].shape[1] + 8)
    for row in range(2):  # each row as greedy decoding by full forwards would give it
        seq = ids["input_ids"][row][ids["attention_mask"][row].bool()][None]
        for _ in range(8):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert torch.equal(gen[row, -8:], seq[0, -8:])


def test_unsupported_models_are_refused(tmp_path, teacher_dir):
    (tmp_path / "gpt2").mkdir()
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="Llama family"):
        convert(tmp_path / "gpt2", tmp_path / "out", "liger")
    assert main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "out"), "--method", "liger"]) != 0
    with pytest.raises(ValueError, match="no sliding window"):
        convert(teacher_dir, tmp_path / "out", "liger", window=8)


def test_qwen2_with_qkv_bias(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=257, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    la = load(convert(tmp_path / "qwen", tmp_path / "out", "liger-attention", window=20))
    la.model.blocks[0].mixer.mix = 0.0
    assert la.model.blocks[0].mixer.k_proj.bias is not None and la.model.blocks[0].mixer.o_proj.bias is None
    ids = torch.randint(1, 257, (1, 20))
    ref = load(tmp_path / "qwen")(input_ids=ids).logits
    assert (la(input_ids=ids).logits - ref).abs().max() < 1e-6 * ref.abs().max()
