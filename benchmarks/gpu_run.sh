#!/usr/bin/env bash
# The one script to run on the GPU machine (device tool, carry [".whl"]), from the repo root:
#     bash benchmarks/gpu_run.sh
# It installs the carried peer wheels (fla-core 0.6.0, mlstm-kernels 2.0.6; see .whl/), prints
# the GPU and the versions, runs `pytest -m gpu` (log: $OUT/gpu_tests.log), then `linattn bench`
# with --out $OUT (bench-*.json, .md, .png; full log $OUT/bench.log). The whole run keeps
# within TOTAL_S seconds (default 540, under the device's 10-minute limit).
#
# When to run it: for a release or a Triton upgrade: the GPU tests and the op bench in one
# device command.
#
# Environment knobs:
#   SKIP_TESTS=1         skip the GPU tests (all the time goes to the benchmark)
#   SKIP_BENCH=1         run only the GPU tests
#   TESTS_S=240          wall-clock cap of the GPU tests (benchmarks/gpu_check.sh)
#   TOTAL_S=540          the whole script's budget; the benchmark gets what the tests leave
#   BENCH_ARGS="..."     extra arguments for linattn bench, e.g. "--D 256" or "--quick --no-peers"
set -u
START=$(date +%s)
OUT=${OUT:-$PWD/benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        || echo "gpu_run: installing the peer wheels failed: their rows will say so" >&2
else
    echo "gpu_run: no .whl/ here (carry it): fla and mlstm_kernels rows will be skipped" >&2
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
python3 - <<'EOF'
import importlib.metadata as md, sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| triton", triton.__version__, "|",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
for dist in ("fla-core", "mlstm-kernels", "einops", "pytest-timeout"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist} missing")
EOF

left() { echo $(( TOTAL_S_ - ($(date +%s) - START) )); }
TOTAL_S_=${TOTAL_S:-540}

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    # The GPU tests with their own parallelism, per-test timeouts and reporting.
    TESTS_S_=${TESTS_S:-240}
    echo "== GPU tests (cap ${TESTS_S_} s): benchmarks/gpu_check.sh -> $OUT/gpu_tests.log"
    OUT="$OUT" TESTS_S="$TESTS_S_" RUN_TIMING=0 bash benchmarks/gpu_check.sh
    echo "== GPU tests exit code $?"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    BUDGET=$(( $(left) - 25 ))            # room to write the outputs and close the workers
    if [ "$BUDGET" -lt 30 ]; then
        echo "gpu_run: only $(left) s left, no time for the benchmark"; exit 1
    fi
    if python3 -c 'import linattn.cli' 2>/dev/null; then
        BENCH=(python3 -m linattn.cli bench)
    else
        BENCH=(python3 -m linattn.bench)
    fi
    echo "== ${BENCH[*]} --out $OUT --budget $BUDGET ${BENCH_ARGS:-}"
    # shellcheck disable=SC2086
    timeout -k 10 $(( BUDGET + 20 )) "${BENCH[@]}" --out "$OUT" --budget "$BUDGET" ${BENCH_ARGS:-} \
        >"$OUT/bench.log" 2>&1
    rc=$?
    # the workers' compiler chatter stays in the log; the reply shows the short table
    sed -n '/^wrote /,$p' "$OUT/bench.log" | grep -v '^\[' | tail -n 80
    [ $rc = 0 ] || { echo "== bench exit code $rc; the end of its log:"; tail -n 30 "$OUT/bench.log"; }
fi
echo "== gpu_run done in $(( $(date +%s) - START )) s"
