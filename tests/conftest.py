"""Test set-up: the Triton interpreter on CPU machines, NaN-poisoned allocations everywhere.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time, whenever no CUDA device is present (CI, developers' machines). On the GPU
machine the kernels compile for real and `pytest -m gpu` runs the full-shape tests.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["LINATTN_POISON"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any test folder

import linattn.ops.alloc as _alloc  # noqa: E402

_alloc.POISON = True

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """GPU tests need CUDA: without it they are an error to select, not a silent skip."""
    if torch.cuda.is_available():
        return
    selected = config.getoption("-m") or ""
    if "gpu" in selected and "not gpu" not in selected:
        raise pytest.UsageError("`pytest -m gpu` needs a CUDA GPU (run it on the GPU machine)")


@pytest.fixture(autouse=True)
def _gpu_memory_returned(request):
    """After each GPU test: free its tensors and hand the caching allocator's blocks back to
    the driver, so that one test's peak does not stay reserved in its xdist worker while 7
    others compile and run beside it on the same card. With LINATTN_GPU_MEMLOG=path, append
    one line per GPU test: its peak reserved GiB, what it still holds after the clean-up (a
    leak: live tensors, a CUDA-graph pool) and the card's free GiB."""
    if request.node.get_closest_marker("gpu") is None or not torch.cuda.is_available():
        yield
        return
    import gc

    torch.cuda.reset_peak_memory_stats()
    yield
    peak = torch.cuda.max_memory_reserved() / 2**30
    gc.collect()
    torch.cuda.empty_cache()
    log = os.environ.get("LINATTN_GPU_MEMLOG")
    if log:
        held = torch.cuda.memory_reserved() / 2**30
        free = torch.cuda.mem_get_info()[0] / 2**30
        with open(log, "a") as f:
            f.write(f"{peak:.2f}\t{held:.2f}\t{free:.1f}\t{request.node.nodeid}\n")
