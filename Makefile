# `make test` and `make demo` do all the set-up on a fresh CPU machine: the project's
# virtual environment is .venv; every target runs in it (the `linattn` command is
# .venv/bin/linattn, on the PATH after `source .venv/bin/activate`).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-gpu sm90-check demo bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	@echo "== setting up $(VENV): linattn, torch, triton and the test tools, pinned by constraints-cpu.txt (1-2 minutes) =="
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install --progress-bar on -c constraints-cpu.txt -e ".[test]"
	touch $(STAMP)
	@echo "== $(VENV) is ready: run 'source $(VENV)/bin/activate' to put linattn on your PATH, or call $(VENV)/bin/linattn =="

install: $(STAMP)

# CPU tests, Triton kernels through the interpreter. Exit code 5 (no tests collected) fails.
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
	  $(VPY) -m pytest -q -n 2 -m "not gpu" tests

# On the GPU machine (the image's torch/triton): the full-shape GPU tests, 8 xdist workers,
# per-test timeouts, log and JUnit XML under $$OUT (default benchmarks/results).
test-gpu:
	PYTHONPATH=$(CURDIR) bash benchmarks/gpu_check.sh

# Without a GPU: compile every kernel specialisation the CPU tests launch for sm_90 (H100/H200)
# and report errors, shared memory, registers and spills. About 5 minutes on 2 cores.
sm90-check: $(STAMP)
	$(VPY) benchmarks/sm90_compile_check.py --jobs 2

demo: $(STAMP)
	$(VPY) -m linattn.demo

# On a GPU machine: our ops against SDPA and the peers installed in .venv (see BENCHMARKS.md).
# With a python that already has CUDA torch and linattn (no .venv, no network):
#   make bench VPY=python3 STAMP=
bench: $(STAMP)
	$(VPY) -m linattn.cli bench

clean:
	rm -rf $(VENV) build *.egg-info
