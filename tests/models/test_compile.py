"""torch.compile(CausalLM, fullgraph=True) with every mixer: no graph break, eager's logits and
parameter gradients.

CPU (CI): one model whose layer pattern holds every mixer of linattn.layers.MIXERS (attention
included, so it is a hybrid too), on the "torch" backend, compiled with backend="aot_eager"
(AOTAutograd traces the forward and backward graphs through the ops' custom ops; inductor's
code generation would cost minutes on CI's two cores and adds nothing to what is tested: the
graph capture). One compile covers every mixer in float32; a float64 model holds one mixer
per op path. The GPU tests
(marked gpu) compile one model per mixer with inductor, and with mode="reduce-overhead".
"""
import pytest
import torch
import torch.nn.functional as F

import helpers
from linattn.layers import MIXERS
from linattn.models import CausalLM, LMConfig

VOCAB, T = 23, 20


def _model(dtype, device="cpu", backend="torch", **kw):
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=len(MIXERS), n_heads=2, backend=backend,
               mlp_ratio=2.0, layers=list(MIXERS))
    cfg.update(kw)
    torch.manual_seed(0)
    return CausalLM(LMConfig(**cfg)).to(device=device, dtype=dtype)


def _logits_and_grads(model, fn, ids, **kw):
    model.zero_grad(set_to_none=True)
    logits = fn(ids, **kw)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach().clone(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def _assert_close(got, ref, dtype, label):
    """float64: ~1e-10 relative (docs/design.md section 5); float32: the same code in another
    order (AOTAutograd's backward sums a tied weight's two gradients and the residual
    stream's in its own order), so rounding of float32 sums: 1e-5 of the tensor's scale."""
    scale = max(1.0, ref.abs().max().item())
    tol = (1e-10 if dtype == torch.float64 else 1e-5) * scale
    err = (got - ref).abs().max().item()
    assert err <= tol, f"{label}: compiled vs eager differ by {err:.3g} (allowed {tol:.3g})"


def _check(model, compiled, ids, dtype, **kw):
    got_l, got_g = _logits_and_grads(model, compiled, ids, **kw)
    ref_l, ref_g = _logits_and_grads(model, model, ids, **kw)
    _assert_close(got_l, ref_l, dtype, "logits")
    assert got_g.keys() == ref_g.keys() and len(ref_g) == len(list(model.parameters()))
    for name in ref_g:
        _assert_close(got_g[name], ref_g[name], dtype, f"grad of {name}")


# the float64 model: one mixer per op path (constant frozen decay, per-key gate, mLSTMexp,
# the gated delta rule) and attention, to keep CI's compile time down; Lightning and mLSTM
# with their optional short conv on q, k, v (the float32 model has them without)
F64_LAYERS = ["lightning", "gla", "mlstm", "gated_deltanet", "attention"]
F64_OPTIONS = {"lightning": {"conv_size": 4}, "mlstm": {"conv_size": 4}}


@pytest.mark.parametrize("dtype,layers,options", [(torch.float32, list(MIXERS), {}),
                                                  (torch.float64, F64_LAYERS, F64_OPTIONS)],
                         ids=["float32", "float64"])
def test_every_mixer_compiles_fullgraph_and_matches_eager(dtype, layers, options):
    """Every mixer in one model (a hybrid, with attention): fullgraph (a graph break is an
    error) gives eager's logits and gradients of every parameter. (Packed sequences, states
    and absent gates through the compiled ops: tests/ops/test_custom_ops.py.)"""
    torch._dynamo.reset()
    model = _model(dtype, layers=layers, n_layers=len(layers), mixer_options=options)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, VOCAB, (2, T), generator=helpers.seeded(1))
    _check(model, compiled, ids, dtype)


def test_recompute_mixers_compile_fullgraph_and_match_eager():
    """save_for_backward="recompute": the gated mixers' output norm recomputes the gate from x
    in its backward (linattn::projected_gate_norm_linear), traced without a graph break."""
    torch._dynamo.reset()
    layers = ["lightning", "gla", "mlstm", "gated_deltanet"]
    model = _model(torch.float32, layers=layers, n_layers=len(layers),
                   save_for_backward="recompute")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, VOCAB, (2, T), generator=helpers.seeded(1))
    _check(model, compiled, ids, torch.float32)


def test_mom_lanes_layout_compiles_fullgraph_and_matches_eager():
    """MoM with layout "lanes" (static shapes, no host sync: what CUDA graphs need) traces
    fullgraph and gives eager's logits and gradients."""
    torch._dynamo.reset()
    model = _model(torch.float64, layers=["mom", "attention"], n_layers=2,
                   mixer_options={"mom": {"layout": "lanes"}})
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, VOCAB, (2, T), generator=helpers.seeded(1))
    _check(model, compiled, ids, torch.float64)


# CUDA graphs refuse MoM's default layout (its packed sequences' lengths depend on the
# routing): tests/test_train_compile.py checks the error; that MoM compiles with mode
# "default" here, and MoM with layout "lanes" ("mom_lanes") with both modes.
GPU_COMPILE_CASES = [(mode, mixer) for mode in ("default", "reduce-overhead")
                     for mixer in [*MIXERS, "hybrid", "mom_lanes"]
                     if not (mode == "reduce-overhead" and MIXERS.get(mixer) is not None
                             and MIXERS[mixer].cuda_graphs_refused)]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,mixer", GPU_COMPILE_CASES)
def test_gpu_compile_per_mixer(mode, mixer):
    """Each mixer (and a 1:1 hybrid) on the Triton path, inductor with mode, float32 weights
    under bf16 autocast as linattn train runs them. The reference is the same model (same
    initial weights) in float64 on the "torch" backend; by the tolerance rule of docs/design.md section 5 the compiled bf16 logits
    are within 3x, and each parameter's gradient within 5x, the eager bf16 model's own error
    against it (helpers.assert_no_worse_than_eager): inductor fuses and rounds the code around
    the ops elsewhere, never worse than bf16 itself (MoM's top-k routing flips on near-ties in
    both)."""
    torch._dynamo.reset()
    name = {"hybrid": "gated_deltanet", "mom_lanes": "mom"}.get(mixer, mixer)
    kw = dict(layers=None, n_layers=2, mixer=name, hybrid=1 if mixer == "hybrid" else None,
              backend="auto",
              mixer_options={"mom": {"layout": "lanes"}} if mixer == "mom_lanes" else {})
    model = _model(torch.float32, "cuda", **kw)
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    ids = torch.randint(0, VOCAB, (4, 64), generator=helpers.seeded(1)).cuda()
    oracle = _model(torch.float64, "cuda", **{**kw, "backend": "torch"})
    ref_l, ref_g = _logits_and_grads(oracle, oracle, ids)
    with torch.autocast("cuda", torch.bfloat16):
        # eager first, as linattn train does for reduce-overhead: the ops' cached chunk layouts
        # are then built outside the CUDA graphs' memory pool
        eager_l, eager_g = _logits_and_grads(model, model, ids)
        for _ in range(3):  # CUDA graphs record on the second call and replay after
            got_l, got_g = _logits_and_grads(model, compiled, ids)
    helpers.assert_no_worse_than_eager({"logits": got_l}, {"logits": eager_l}, {"logits": ref_l},
                                       3, "logits")
    helpers.assert_no_worse_than_eager(got_g, eager_g, ref_g, 5, "grad of")


@pytest.mark.gpu
def test_gpu_compiled_decoding_with_states():
    """forward_with_state compiled with fullgraph (every mixer, Triton path): a prompt, then
    token-by-token steps through the decode custom ops (short, gradient-free calls take the
    step kernel), equal eager's logits."""
    torch._dynamo.reset()
    model = _model(torch.float32, "cuda", backend="auto").eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=helpers.seeded(2)).cuda()
    step = torch.compile(model.forward_with_state, fullgraph=True)
    with torch.no_grad():
        got, st = step(ids[:, :8])
        ref, st_ref = model.forward_with_state(ids[:, :8])
        outs = [(got, ref)]
        for t in range(8, 12):
            got, st = step(ids[:, t:t + 1], st)
            ref, st_ref = model.forward_with_state(ids[:, t:t + 1], st_ref)
            outs.append((got, ref))
    for got, ref in outs:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
