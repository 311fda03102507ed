#!/usr/bin/env bash
# Device calls (carry [".whl"]) that check and time kernel options before they become
# defaults: first the options against the defaults kernel to kernel (benchmarks/flag_diff.py,
# a minute: NaN, O(1) errors and illegal addresses show there long before the oracle tests
# finish), then the GPU tests, then the sweeps and the per-kernel profile, each capped in time.
# Everything lands in $OUT (at most 8 files); the last lines printed are the tables.
#     bash benchmarks/validate_untimed.sh                  (STEPS below; TOTAL_S caps it)
#     STEPS="tests" bash benchmarks/validate_untimed.sh    (one step; PYTEST_ARGS="-k key")
# Off by default, broken on the H200 in a way the interpreter does not show (PERF_NOTES 22):
# delta_bwd.GRADS_WY_SPLIT16 (NaN in dk at K = 16). Gated DeltaNet's reverse-scan split and
# mLSTMexp's normaliser by a dot (wrong at T 2048, illegal address at T 32768) were removed
# here and live on branch next/untimed5, whose copy of this script runs them. Steps: diff,
# tests, delta, stages, ncu, mexp, long, profile.
set -u
STEPS=${STEPS:-"diff tests delta"}
want() { [[ " $STEPS " == *" $1 "* ]]; }
START=$(date +%s)
OUT=${OUT:-$PWD/benchmarks/results}
TOTAL_S=${TOTAL_S:-565}
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

# 0) the off options against the defaults, kernel to kernel (relative max differences; a
#    healthy option differs at the dtype's rounding, ~1e-2 at most in bf16)
if want diff; then
timeout 100 python3 benchmarks/flag_diff.py --op delta --timeout 90 --json "$OUT/flag_diff_delta.json" \
    --settings "default=;wy_split=delta_bwd.GRADS_WY_SPLIT16=1" 2>&1 | grep -v Warn | tail -6
fi

# 1) every GPU test (about 2.5 minutes on 8 workers)
if want tests; then
OUT="$OUT" TESTS_S=${TESTS_S:-200} RUN_TIMING=0 bash benchmarks/gpu_check.sh 2>&1 | tail -4
rm -f "$OUT/gpu_tests.xml"
fi

# 2) the delta rule's options one at a time against the defaults (main_form: every split16
#    option and QK_AFTER off; wy_split: grads_wy's split on, 1.50 -> 1.22 ms when last timed)
if want delta; then
timeout $(( $(left) - 10 )) python3 benchmarks/sweep_delta.py --kinds gated_delta,delta \
    --variants default,main_form,qk_inloop,scan_nosplit,rs_nosplit,prep_nosplit,wy_split \
    --json "$OUT/sweep_delta.json" 2>&1 | tail -22
fi

# 3) the gated scans' stages at both ends of T, now that fwd_states without a gate reads k^T
#    straight into its dot (110 registers; 57 KB of shared memory at 3 stages: 3 programs
#    per SM, 4 at 2)
if want stages; then
for T in 8192 32768; do
timeout $(( $(left) * 25 / 100 )) python3 benchmarks/sweep_gated.py --kinds none,scalar --T $T \
    --chunks default --tiles default --warps default --stages default --scan-stages 2,3 \
    --budget-s 60 2>&1 | tail -5
done
fi

# 4) Nsight Compute over every kernel of one fwd+bwd per op: registers, block limits, waves,
#    occupancy, DRAM throughput, issue rate (benchmarks/ncu_summary.py prints the table)
if want ncu; then
for kind in ${NCU_KINDS:-delta gated_delta none key}; do
timeout 90 ncu --clock-control none --section LaunchStats --section Occupancy \
    --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
    python3 benchmarks/ncu_kernel.py $kind > "/tmp/ncu_$kind.log" 2>&1
python3 benchmarks/ncu_summary.py "/tmp/ncu_$kind.log" >> "$OUT/ncu_summary.log"
done
fi

# 4b) mLSTMexp at chunk 64 and 128, with and without a 168-register cap on fwd_states, at
#     both ends of T and the bench's middle: the T ratio (asked <= 1.15) is T 32768 over 2048
if want mexp; then
for T in 32768 2048 8192; do
timeout $(( $(left) * 30 / 100 )) python3 benchmarks/sweep_gated.py --kinds mlstm_exp --T $T \
    --chunks 64,128 --tiles default --warps default --stages default --fwd-cap 0,168 \
    --budget-s 100 2>&1 | tail -7 | tee -a "$OUT/sweep_mexp.log"
done
fi

# 5) where mLSTMexp's T = 32768 time goes (its T ratio is 1.18; scalar 1.13, for contrast):
#    the per-kernel profile at both ends of T
if want long; then
for shape in "--B 2 --T 32768" "--B 32 --T 2048"; do
timeout $(( $(left) * 20 / 100 )) python3 benchmarks/profile_kernels.py --kinds mlstm_exp,scalar \
    $shape 2>&1 | grep -A9 "^== " >> "$OUT/profile_long.log"
done
fi

# 6) the per-kernel profile of the gated ops, host time included
if want profile; then
timeout $(( $(left) - 10 )) python3 benchmarks/profile_kernels.py \
    --kinds none,const_frozen,const,scalar,key,mlstm_exp,delta,gated_delta --json "$OUT/profile.json" \
    > "$OUT/profile.log" 2>&1
fi

[ -f "$OUT/ncu_summary.log" ] && cat "$OUT/ncu_summary.log"
[ -f "$OUT/profile_long.log" ] && grep "^==" "$OUT/profile_long.log"
[ -f "$OUT/profile.log" ] && grep "^==" "$OUT/profile.log"
echo "== validate_untimed done in $(( $(date +%s) - START )) s"
