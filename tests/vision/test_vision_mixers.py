"""The vision mixers against their T x T float64 references (linattn.vision.reference),
outputs and gradients of the input and of every parameter, on the chunked PyTorch path, the
Triton kernels (CPU interpreter here, compiled on the GPU) and bf16 on the GPU."""
import pytest
import torch
from torch.func import functional_call

from helpers import check_against_oracle, cuda_kernels_launched, linattn_triton_kernels
from linattn.vision.mixers import MIXERS, make_mixer
from linattn.vision.reference import reference_mixer

LINEAR_MIXERS = [n for n in MIXERS if n != "attention"]


def _case(name, dim, heads, grid, backend, seed=0, device="cpu"):
    """(fast_fn, oracle_fn, float64 inputs {x, parameters}) for mixer `name`."""
    torch.manual_seed(seed)
    mixer = make_mixer(name, dim, heads, backend).double()
    for p in mixer.parameters():  # biases and convolutions away from their zero / small init
        p.data.normal_(0, 0.3)
    mixer = mixer.to(device)
    B, T = 2, grid[0] * grid[1]
    inputs = {"x": torch.randn(B, T, dim, dtype=torch.float64)}
    inputs.update({n: p.detach().cpu().clone() for n, p in mixer.named_parameters()})

    def fast(x, **params):
        return functional_call(mixer, params, (x, grid)), None

    def oracle(x, **params):
        return reference_mixer(name, params, x, grid, mixer.n_heads), None

    return fast, oracle, inputs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_matches_reference(name, dtype):
    fast, oracle, inputs = _case(name, 16, 2, (4, 5), "torch")
    check_against_oracle(fast, oracle, inputs, dtype=dtype, grad_names=list(inputs), activations=list(inputs))


@pytest.mark.parametrize("name", LINEAR_MIXERS)
def test_mixer_triton_interpreter_matches_reference(name):
    """The Triton causal=False kernels (interpreted on the CPU), float32, a 3 x 7 grid."""
    fast, oracle, inputs = _case(name, 16, 2, (3, 7), "triton", seed=1)
    check_against_oracle(fast, oracle, inputs, dtype=torch.float32, grad_names=list(inputs),
                         activations=list(inputs))


def test_mala_scores_sum_to_one_and_sharpen_with_query_magnitude():
    """MALA's defining property on the reference's scores (RoPE left out): every row sums to
    1, and scaling the query up spreads the scores (softmax-like), where plain linear
    attention's normalised scores of phi(q) = 3 phi(q') and phi(q') are the same."""
    from linattn.vision.reference import _scores

    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64).abs() + 0.5  # ELU + 1 = q + 1: phi scales with q
    k = torch.randn(1, 2, 12, 8, dtype=torch.float64)
    a1 = _scores("mala", q, k, (3, 4), rope=False)
    a3 = _scores("mala", 3 * q + 2, k, (3, 4), rope=False)  # phi(3q + 2) = 3 phi(q)
    assert torch.allclose(a1.sum(-1), torch.ones(1, 2, 5, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(a3.sum(-1), torch.ones(1, 2, 5, dtype=torch.float64), atol=1e-5)
    spread1, spread3 = (a1.amax(-1) - a1.amin(-1)), (a3.amax(-1) - a3.amin(-1))
    assert (spread3 > spread1).all()
    l1, l3 = _scores("linear", q, k, (3, 4)), _scores("linear", 3 * q + 2, k, (3, 4))
    assert torch.allclose(l1, l3, atol=1e-5)  # magnitude neglect


def test_mixer_rejects_a_wrong_grid():
    m = make_mixer("mala", 16, 2)
    with pytest.raises(ValueError, match="grid 4x4 has 16 tokens"):
        m(torch.randn(1, 20, 16), (4, 4))
    with pytest.raises(ValueError, match="unknown vision mixer"):
        make_mixer("retnet", 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        make_mixer("mala", 24, 4)  # head dim 6


@pytest.mark.gpu
@pytest.mark.parametrize("name", LINEAR_MIXERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixer_triton_gpu_matches_reference(name, dtype):
    """Compiled Triton kernels at a 32 x 48 grid (1536 tokens), 64-wide heads."""
    fast, oracle, inputs = _case(name, 128, 2, (32, 48), "triton", seed=2, device="cuda")
    check_against_oracle(fast, oracle, inputs, dtype=dtype, grad_names=list(inputs),
                         activations=list(inputs), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", LINEAR_MIXERS)
def test_mixer_auto_takes_triton_on_cuda(name):
    """backend "auto" on CUDA tensors launches our Triton kernels and gives the "triton"
    result bitwise (the kernels are deterministic); "torch" launches none of them."""
    torch.manual_seed(0)
    x = torch.randn(2, 64 * 64, 128, device="cuda")
    ours = linattn_triton_kernels()
    outs, launched = {}, {}
    for backend in ("auto", "triton", "torch"):
        torch.manual_seed(1)
        m = make_mixer(name, 128, 2, backend).cuda()
        m(x, (64, 64))  # compiles the kernels outside the profiled call
        launched[backend] = cuda_kernels_launched(lambda: outs.__setitem__(backend, m(x, (64, 64)))) & ours
    assert launched["auto"] and launched["auto"] == launched["triton"], launched
    assert not launched["torch"], launched["torch"]
    assert torch.equal(outs["auto"], outs["triton"])
