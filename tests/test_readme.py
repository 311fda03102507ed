"""The README's promises that code can check: its usage snippet runs and does what its
comments say, and the Makefile runs every target in the project's .venv."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_usage_snippet_runs_and_sends_gradients_to_q_k_v_g():
    scope = {}
    exec(compile(python_blocks()[0], "README.md usage", "exec"), scope)  # noqa: S102 (our own README)
    for name in ("q", "k", "v", "g"):
        assert scope[name].grad is not None and torch.isfinite(scope[name].grad).all(), name
    assert scope["o1"].shape == (2, 1, 8, 64) and scope["S"].shape == (2, 8, 64, 64)


def test_make_targets_run_in_the_projects_venv():
    """Every recipe line that runs python uses $(VPY) (.venv/bin/python), except the one that
    creates .venv; `make bench` installs .venv first."""
    text = (ROOT / "Makefile").read_text()
    assert "VENV := .venv" in text and re.search(r"^bench: \$\(STAMP\)$", text, flags=re.M)
    recipes = [line.strip() for line in text.splitlines() if line.startswith("\t")]
    runs_python = [line for line in recipes if re.search(r"\bpython3?\b|\$\(PY\)|-m linattn", line)]
    assert runs_python, recipes
    for line in runs_python:
        assert line.startswith("$(VPY)") or line.startswith("test -x $(VPY) || $(PY) -m venv"), line
