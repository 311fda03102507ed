#!/usr/bin/env bash
# The GPU test run for the H200 (device tool), from the repo root:
#     PYTHONPATH=$PWD bash benchmarks/gpu_check.sh
# Runs `pytest -m gpu tests` on JOBS xdist workers: log in $OUT/gpu_tests.log, JUnit XML in
# $OUT/gpu_tests.xml; prints the slowest tests, the failures' short tracebacks and, last,
# pytest's summary line. With RUN_TIMING=1 it then times the kernels
# (benchmarks/time_gated.py, benchmarks/time_delta.py --kernels) in what is left of TOTAL_S.
#
# When to run it: before merging a change to a kernel, and after a torch or Triton upgrade
# (`make test-gpu` runs it).
#
# Why 8 workers: most of the run is CPU work, each part single-threaded: Triton compiling a
# kernel specialisation (~0.5-2 s of CPU for a bfloat16 chunk kernel, 5-40 s for a float32
# one with exact "ieee" dots; ~300 specialisations in all, most of them tiny decode kernels)
# and the float64 oracle's Python loop over T. 8 workers with one thread each keep the 16
# cores busy without the oversubscription that sank `-n 16` with torch's default threads
# (16 workers x 16 threads). Each test compiles its own specialisations (see
# tests/ops/triton/gpu_cases.py), so workers seldom compile the same kernel twice.
#
# Environment knobs:
#   JOBS=8            xdist workers
#   TEST_TIMEOUT_S=300  default per-test limit (tests carry their own pytest.mark.timeout)
#   TESTS_S=420       wall-clock cap of the pytest run; at the cap pytest is interrupted
#                     (SIGINT) and still writes its summary, the XML and the finished results
#   RUN_TIMING=1      then run the timing scripts; TOTAL_S=570 caps the whole script
#   PYTEST_ARGS="..." extra pytest arguments, e.g. "-k delta" or "tests/ops"
set -u
START=$(date +%s)
OUT=${OUT:-$PWD/benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-$PWD}
# One thread per worker for torch and BLAS: the oracle's loop is latency-bound.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

JOBS=${JOBS:-8}
TESTS_S=${TESTS_S:-420}
TOTAL_S=${TOTAL_S:-570}
LOG="$OUT/gpu_tests.log"
# Each GPU test's peak reserved GiB, what it leaves held and the card's free GiB (tests/conftest.py).
export LINATTN_GPU_MEMLOG="$OUT/gpu_memory.tsv"
rm -f "$LINATTN_GPU_MEMLOG"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"

echo "== pytest -m gpu on $JOBS workers (cap ${TESTS_S} s) -> $LOG"
# shellcheck disable=SC2086
timeout -s INT -k 30 "$TESTS_S" python3 -m pytest -p no:benchmark -p no:cacheprovider -m gpu \
    -n "$JOBS" --timeout="${TEST_TIMEOUT_S:-300}" --timeout-method=signal -v -rfE --tb=short \
    --durations=15 --junitxml="$OUT/gpu_tests.xml" ${PYTEST_ARGS:-tests} >"$LOG" 2>&1
rc=$?
[ $rc = 124 ] || [ $rc = 130 ] && echo "gpu_check: pytest stopped at the ${TESTS_S} s cap (rc $rc)"

# The slowest tests, failures and errors (short tracebacks), then the summary line last.
awk '/^=+ slowest [0-9]+ durations/ {p=1} /^=+ short test summary/ {p=0} p' "$LOG" | head -n 25
# (Captured output, e.g. pytest-timeout's stack dump of every thread, stays in the log.)
awk '/^=+ (FAILURES|ERRORS) =+$/ {p=1} /^=+ (warnings summary|slowest [0-9]+ durations|short test summary)/ {p=0}
     /^-+ Captured .* -+$/ {skip=1} /^_+ .* _+$/ {skip=0} p && !skip' "$LOG" | tail -n 300
awk '/^=+ short test summary/ {p=1} p' "$LOG" | sed '$d' | tail -n 60
echo "== the GPU tests' largest peaks (GiB reserved, held after, card free, test)"
sort -rn "$LINATTN_GPU_MEMLOG" 2>/dev/null | head -n 8
tail -n 1 "$LOG"
echo "== GPU tests exit code $rc ($(( $(date +%s) - START )) s so far)"

if [ "${RUN_TIMING:-0}" = 1 ]; then
    left=$(( TOTAL_S - ($(date +%s) - START) - 10 ))
    if [ "$left" -lt 60 ]; then
        echo "gpu_check: only ${left} s left, skipping the timing scripts"
    else
        half=$(( left / 2 ))
        echo "== benchmarks/time_gated.py (cap ${half} s) -> $OUT/time_gated.log"
        timeout -k 10 "$half" python3 benchmarks/time_gated.py >"$OUT/time_gated.log" 2>&1 \
            || echo "gpu_check: time_gated.py exit code $?"
        tail -n 20 "$OUT/time_gated.log"
        left=$(( TOTAL_S - ($(date +%s) - START) - 5 ))
        echo "== benchmarks/time_delta.py --kernels (cap ${left} s) -> $OUT/time_delta.log"
        timeout -k 10 "$left" python3 benchmarks/time_delta.py --kernels >"$OUT/time_delta.log" 2>&1 \
            || echo "gpu_check: time_delta.py exit code $?"
        tail -n 25 "$OUT/time_delta.log"
    fi
fi
exit $rc
