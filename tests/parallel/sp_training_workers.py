"""Worker side of test_sp_training.py: run in processes spawned as torchrun would start them.

Not a test module (pytest does not collect it): the spawned children import it by name.
`spawn_like_torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each
child and does NOT initialise torch.distributed: the code under test joins the group from
those variables, as it would under torchrun.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ for helpers

import helpers  # noqa: E402

from linattn.models import CausalLM, LMConfig  # noqa: E402
from linattn.parallel import SequenceParallelContext  # noqa: E402
from linattn.train import all_reduce_gradients  # noqa: E402
from sp_workers import run_processes  # noqa: E402


def _entry(rank, fn, world, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fn(rank, world, *args)


def spawn_like_torchrun(fn, world: int, *args, timeout: float = 120.0):
    """Runs fn(rank, world, *args) in `world` fresh processes with torchrun's environment
    (sp_workers.run_processes: errors raise, a hang fails after `timeout` seconds)."""
    run_processes(_entry, fn, world, args, timeout, "processes")


# ----------------------------------------------------------------------------- model check

def build_lm(config: dict, seed: int = 0) -> CausalLM:
    """CausalLM(config) in float64 with seeded weights; norm gains and biases perturbed so
    that none is trivial."""
    torch.manual_seed(seed)
    model = CausalLM(LMConfig.from_dict(config)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def check_lm_matches_single_process(rank, world, configs, B, T):
    """For each config: the whole model on the whole sequence in this process (the oracle),
    then the same model sequence-parallel on this rank's slice; its logits must be the
    oracle's slice and its all-reduced parameter gradients the oracle's, to ~1e-10."""
    dist.init_process_group("gloo")  # from torchrun's variables
    try:
        sp = SequenceParallelContext()
        for i, config in enumerate(configs):
            label = f"[{'/'.join(config['layers'])} rank={rank}]"
            model = build_lm(config, seed=i)
            gen = helpers.seeded(10 + i)
            ids = torch.randint(config["vocab_size"], (B, T), generator=gen)
            cot = helpers.randn(B, T, config["vocab_size"], gen=gen)  # cotangent of the logits

            logits = model(ids)  # [B, T, V]
            (logits * cot).sum().backward()
            ref = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)

            model.set_sequence_parallel(sp)
            local = model(sp.split(ids))  # [B, T_r, V]
            (local * sp.split(cot)).sum().backward()
            all_reduce_gradients(model, sp)
            helpers.assert_allclose_f64(local, sp.split(logits.detach()), f"{label} logits")
            for n, p in model.named_parameters():
                assert p.grad is not None, f"{label} no gradient for {n}"
                helpers.assert_allclose_f64(p.grad, ref[n], f"{label} d{n}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- training

def train_with_cli(rank, world, argv):
    """`linattn train ... --sequence-parallel` on this rank; ranks other than 0 must write
    nothing (any atomic write there fails the run)."""
    import linattn.train
    from linattn.cli import main

    if rank != 0:
        def refuse(path, write):
            raise AssertionError(f"rank {rank} wrote {path}")

        linattn.train.atomic_write = refuse
    code = main(argv)
    assert code == 0, f"rank {rank}: linattn train exited {code}"
    assert not dist.is_initialized(), "train() must destroy the process group it created"
