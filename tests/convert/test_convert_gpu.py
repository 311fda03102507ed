"""Converted models on the GPU: the Triton path gives the CPU path's logits, and greedy
decoding (transformers' generate, linattn's greedy with and without a CUDA graph) agrees."""
import pytest
import torch

pytest.importorskip("transformers")
import linattn.hf  # noqa: E402,F401
from transformers import AutoModelForCausalLM  # noqa: E402

from linattn.convert.llama import METHODS, convert  # noqa: E402
from linattn.hf.greedy import greedy_generate  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", METHODS)
def test_gpu_matches_cpu_and_decodes(teacher_dir, tmp_path, method):
    out = convert(teacher_dir, tmp_path / method, method, window=8 if method in ("liger-attention", "lolcats") else None)
    cpu = AutoModelForCausalLM.from_pretrained(out).eval()
    gpu = AutoModelForCausalLM.from_pretrained(out).cuda().eval()
    ids = torch.randint(1, 257, (4, 100))
    with torch.no_grad():
        ref = cpu(input_ids=ids).logits
        got = gpu(input_ids=ids.cuda()).logits.cpu()
    # a model-level check in float32 (each op is tested against its oracle elsewhere)
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
    prompt = ids[:, :40].cuda()
    hf = gpu.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                      do_sample=False, pad_token_id=0)
    assert torch.equal(greedy_generate(gpu, prompt, 16), hf)
    assert torch.equal(greedy_generate(gpu, prompt, 16, cuda_graph=True), hf)
