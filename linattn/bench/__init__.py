"""`linattn bench`: time the ops (`linattn bench`, linattn.bench.ops) or whole models'
training steps (`linattn bench --models`, linattn.bench.models) on one GPU.

The package is a registry and one machinery around it:
    flops.py        the FLOP models and the byte floors
    op_cases.py     OPS: every timed op (ours, SDPA, fla, TFLA) as an OpCase with its builder
    model_cases.py  CASES: every timed model (our CausalLM per mixer, attention, fla's layers)
    runner.py       worker processes, the compile warm-up, the row loop, timeouts, budgets;
                    Machine: what a run asks of the machine, a value tests replace
    report.py       the JSON, the markdown tables, the plots, for both benches
    ops.py, models.py   the two benches: their rows' timing, their flags, their main

`python -m linattn.bench [--models] ...` runs the same command (and its workers).
"""
from __future__ import annotations


def main(argv=None, machine=None) -> int:
    """`linattn bench` with `argv` (sys.argv[1:] when None): the model bench with --models,
    else the op bench. machine: a runner.Machine (None: this machine)."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--models" in argv:
        from .models import main as models_main
        return models_main([a for a in argv if a != "--models"], machine)
    from .ops import main as ops_main
    return ops_main(argv, machine)
