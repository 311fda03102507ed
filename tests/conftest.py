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
