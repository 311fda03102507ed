"""A rank's LASP-2 work in one process (LoopbackComm), held to the single-process op.

sp_loopback.simulated runs every rank of a W-rank group in this process with the messages a
real group would deliver, so the slices' outputs, the final state and every gradient
(initial state and a constant gate's included) must match the oracle on the whole sequence:
in float64 on the chunked PyTorch path (every gate kind, both delta-rule forms), and in float32
on the Triton kernels (the interpreter on CPUs) with the tolerance rule. The delta rule's
default form ("states") gives each rank a role (rank 0: its own op; a middle rank: the
transition and states-only passes; the last rank: the transition pass alone unless the final
state is asked for), so the cases cover three ranks and both output_final_state values.
"""
import functools

import pytest
import torch

import helpers
import linattn
from linattn.parallel import lasp
from linattn.parallel.comm import LoopbackComm, ProcessGroupComm
import sp_loopback

H = 2


def _inputs(op, gate, T, K, V, seed, state=True, B=1):
    gen = helpers.seeded(seed)
    x = dict(q=helpers.randn(B, T, H, K, gen=gen), k=helpers.randn(B, T, H, K, gen=gen),
             v=helpers.randn(B, T, H, V, gen=gen))
    if op == "delta":
        x["k"] = helpers.unit_keys(x["k"])
        x["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    x["g"] = helpers.rand_gate(gate, B, T, H, K, gen, low=-0.6, high=-0.01)
    if x["g"] is None:
        del x["g"]
    if state:
        x["initial_state"] = helpers.randn(B, H, K, V, gen=gen)
    return x


def _oracle(op):
    return functools.partial(linattn.delta_rule if op == "delta" else linattn.linear_attention,
                             backend="reference")


CASES_F64 = [("linear", "none", {}), ("linear", "const", {}), ("linear", "scalar", {}),
             ("linear", "key", {}), ("delta", "none", {}), ("delta", "scalar", {}),
             ("delta", "scalar", {"form": "twice"}),
             ("delta", "scalar", {"form": "twice", "fuse_dim": 0}),
             ("delta", "none", {"form": "once"}),
             ("delta", "scalar", {"form": "once", "fuse_dim": 0})]


@pytest.mark.parametrize("final", [True, False])
@pytest.mark.parametrize("op, gate, kw", CASES_F64)
def test_simulated_ranks_match_single_process_f64(op, gate, kw, final):
    lengths = [11, 1, 7]
    x = _inputs(op, gate, sum(lengths), 5, 3, seed=len(gate) + 10 * len(kw))
    grads = [n for n in x]
    helpers.check_against_oracle(sp_loopback.simulated(op, 3, lengths, backend="torch", **kw),
                                 _oracle(op), x, dtype=torch.float64, grad_names=grads,
                                 output_final_state=final)


@pytest.mark.parametrize("op, gate, lengths, final, B",
                         [("linear", "scalar", [40, 29], True, 1),
                          ("linear", "key", [40, 29], True, 1),
                          ("delta", "scalar", [40, 29], True, 1),
                          ("delta", "scalar", [70, 9, 29], False, 1),
                          ("delta", "scalar", [29, 130, 20], True, 2),
                          ("delta", "none", [29, 70], False, 1)])
def test_simulated_ranks_on_triton_f32(op, gate, lengths, final, B):
    """The Triton path (kernels, the time-split sums, the delta rule's shared prep,
    states-only pass and a middle rank's chunk states formed from S_in) in float32,
    tolerance rule."""
    x = _inputs(op, gate, sum(lengths), 16, 16, seed=3, B=B)
    helpers.check_against_oracle(
        sp_loopback.simulated(op, len(lengths), lengths, backend="triton", sums="triton"),
        _oracle(op), x, dtype=torch.float32, grad_names=list(x), output_final_state=final)


def test_delta_middle_rank_16bit_on_triton():
    """float16 on the Triton kernels (the interpreter's bfloat16 dots are not exact enough to
    judge): a middle rank's chunk states formed from S_in in the stored 16-bit dtype, tolerance
    rule."""
    lengths = [150, 140, 130]
    x = _inputs("delta", "scalar", sum(lengths), 32, 32, seed=4)
    helpers.check_against_oracle(
        sp_loopback.simulated("delta", 3, lengths, backend="triton", sums="triton"),
        _oracle("delta"), x, dtype=torch.float16, grad_names=list(x), output_final_state=True)


def test_delta_states_form_matches_twice_on_triton():
    """form="states" against form="twice" rank by rank on the Triton kernels (float32, three
    ranks: each role), outputs and every gradient."""
    lengths = [64, 40, 23]
    x = _inputs("delta", "scalar", sum(lengths), 16, 8, seed=5)
    x = {n: t.float() for n, t in x.items()}
    res = {}
    for form in ("states", "twice"):
        inp = {n: t.clone().requires_grad_(True) for n, t in x.items()}
        fn = sp_loopback.simulated("delta", 3, lengths, backend="triton", sums="triton", form=form)
        o, final = fn(**inp, output_final_state=True)
        gen = helpers.seeded(7)
        do = torch.randn(o.shape, generator=gen, dtype=torch.float64).float()
        dfin = torch.randn(final.shape, generator=gen, dtype=torch.float64).float()
        torch.autograd.backward([o, final], [do, dfin])
        res[form] = [o, final] + [inp[n].grad for n in x]
    for name, a, b in zip(["o", "final"] + list(x), res["states"], res["twice"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (name, (a - b).abs().max().item())


def test_loopback_replicates_and_records():
    comm = LoopbackComm(1, 3)
    x = torch.arange(4.0)
    got = comm.all_gather(x)
    assert got.shape == (3, 4) and torch.equal(got[0], x) and torch.equal(got[2], x)
    assert len(comm.sent) == 1 and torch.equal(comm.sent[0], x)
    other = LoopbackComm(0, 3, inbox=[[x + 10], comm.sent, [x + 30]])
    got = other.start_all_gather(x - 1).wait()
    assert torch.equal(got[0], x - 1) and torch.equal(got[1], x) and torch.equal(got[2], x + 30)
    with pytest.raises(ValueError, match="rank"):
        LoopbackComm(3, 3)
    with pytest.raises(ValueError, match="inbox"):
        LoopbackComm(0, 3, inbox=[[x]])
    single = ProcessGroupComm()
    assert (single.rank, single.world) == (0, 1)
    assert torch.equal(single.all_gather(x), x.unsqueeze(0))


def test_bad_communicator_and_sums_are_clear_errors():
    q = torch.zeros(1, 5, 2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="comm"):
        lasp.linear_attention_on("world", q, q, q)
    with pytest.raises(ValueError, match="sums"):
        lasp.linear_attention_on(LoopbackComm(0, 2), q, q, q, sums="cuda")
    beta = torch.full((1, 5, 2), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="form"):
        lasp.delta_rule_on(LoopbackComm(0, 2), q, q, q, beta, form="thrice")


@pytest.mark.gpu
@pytest.mark.parametrize("op, gate", [("linear", "scalar"), ("linear", "key"), ("linear", "none"),
                                      ("linear", "const"), ("delta", "scalar"), ("delta", "none")])
@pytest.mark.parametrize("wire", [None, torch.bfloat16])
def test_simulated_ranks_bf16_on_gpu(op, gate, wire):
    """bf16 on the GPU kernels (the time-split sums over many splits, the delta rule's
    correction o~ S_in in bf16), tolerance rule, initial and final states; the states
    communicated as they are (float32) or in bf16."""
    lengths = [700, 555]
    x = _inputs(op, gate, sum(lengths), 64, 64, seed=4)
    helpers.check_against_oracle(
        sp_loopback.simulated(op, 2, lengths, wire_dtype=wire, backend="auto"), _oracle(op), x,
        dtype=torch.bfloat16, grad_names=list(x), output_final_state=True, device="cuda")


@pytest.mark.parametrize("op, gate", [("linear", "scalar"), ("linear", "key"), ("delta", "scalar")])
def test_bf16_states_on_the_wire_cpu(op, gate):
    """Whether the communicated states may travel in bfloat16: bf16 inputs on the chunked
    PyTorch path with the (M_r, E_r) and (c_r, d final) messages rounded to bf16, tolerance
    rule (a long slice per rank, so the incoming states carry most of the outputs)."""
    lengths = [160, 96, 130]
    x = _inputs(op, gate, sum(lengths), 16, 16, seed=9)
    helpers.check_against_oracle(
        sp_loopback.simulated(op, 3, lengths, wire_dtype=torch.bfloat16, backend="torch"),
        _oracle(op), x, dtype=torch.bfloat16, grad_names=list(x), output_final_state=True)
