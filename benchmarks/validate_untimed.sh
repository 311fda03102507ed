#!/usr/bin/env bash
# Device calls (carry [".whl"]) that check and time branch next/untimed before it is
# merged: the GPU tests, then the sweeps its new options need and the per-kernel profile,
# each capped in time. Everything lands in $OUT (at most 8 files); the last lines printed
# are the sweeps' and the profile's tables.
#     bash benchmarks/validate_untimed.sh                  (all steps; TOTAL_S caps it)
#     STEPS="tests" bash benchmarks/validate_untimed.sh    (one step; PYTEST_ARGS="-k key")
set -u
STEPS=${STEPS:-"tests key fill ncu profile"}
want() { [[ " $STEPS " == *" $1 "* ]]; }
START=$(date +%s)
OUT=${OUT:-$PWD/benchmarks/results}
TOTAL_S=${TOTAL_S:-565}
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

# 1) every GPU test (about 2 minutes on 8 workers)
if want tests; then
OUT="$OUT" TESTS_S=${TESTS_S:-190} RUN_TIMING=0 bash benchmarks/gpu_check.sh 2>&1 | tail -4
rm -f "$OUT/gpu_tests.xml"
fi

# 2) per-key scans on 2 stages (KernelConfig.scan_stages) against 1 (the tile kernels' own)
if want key; then
timeout $(( $(left) * 30 / 100 )) python3 benchmarks/sweep_gated.py --kinds key \
    --chunks default --tiles default --warps default --stages default --scan-stages 1,2 \
    --json "$OUT/sweep_key.json" --budget-s 100 > "$OUT/sweep_key.log" 2>&1
fi

# 3) the T = 32768 ratio (B 2, each scan program a 512-step chain): the scans' stages (loads
#    issued further ahead) and warps
if want fill; then
timeout $(( $(left) * 60 / 100 )) python3 benchmarks/sweep_gated.py --kinds mlstm_exp,scalar,none \
    --T 32768 --chunks default --tiles default --warps default --stages default \
    --scan-warps 4,8 --scan-stages 2,3 --json "$OUT/sweep_fill.json" --budget-s 150 \
    > "$OUT/sweep_fill.log" 2>&1
fi

# 4) why bwd_states with a frozen scalar gate takes 0.50 ms against 0.31 without one:
#    Nsight Compute's stall reasons for both (if ncu reads the counters on this machine)
if want ncu; then
for kind in none const_frozen; do
timeout 60 ncu --clock-control none --kernel-name regex:bwd_states --launch-count 1 \
    --section WarpStateStats --section SchedulerStats --section Occupancy \
    --section SpeedOfLight --section LaunchStats \
    python3 benchmarks/ncu_kernel.py $kind > "$OUT/ncu_$kind.log" 2>&1
done
fi

# 5) the per-kernel profile of the gated ops, host time included
if want profile; then
timeout $(( $(left) - 10 )) python3 benchmarks/profile_kernels.py \
    --kinds none,const_frozen,const,scalar,key,mlstm_exp --json "$OUT/profile.json" \
    > "$OUT/profile.log" 2>&1
fi

[ -f "$OUT/sweep_key.log" ] && tail -4 "$OUT/sweep_key.log"
[ -f "$OUT/sweep_fill.log" ] && tail -14 "$OUT/sweep_fill.log"
[ -f "$OUT/profile.log" ] && grep "^==" "$OUT/profile.log"
echo "== validate_untimed done in $(( $(date +%s) - START )) s"
