#!/usr/bin/env bash
# Device calls (carry [".whl"]) that check and time branch next/untimed before it is
# merged: the GPU tests, then the sweeps its new options need, each capped in time.
# Everything lands in $OUT (at most 8 files); the last lines printed are the sweeps' tables.
#     bash benchmarks/validate_untimed.sh                  (all steps; TOTAL_S caps it)
#     STEPS="tests key delta" bash benchmarks/validate_untimed.sh    then
#     STEPS="fill profile" bash benchmarks/validate_untimed.sh       (two calls, more time each)
set -u
STEPS=${STEPS:-"tests key delta fill profile"}
want() { [[ " $STEPS " == *" $1 "* ]]; }
# the delta sweep's cap: a share of what is left, or all of it when no later step is wanted
delta_cap() { if want fill || want profile; then echo $(( $(left) * 35 / 100 )); else echo $(( $(left) - 10 )); fi; }
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

# 2) per-key options: the diagonals by dots relative to the middle row where the decays
#    allow (key_scores' score_kd -1, bwd_dqk's dqk_diag 2; else one key token at a time)
#    against the 3-D weights, and bwd_dqk split into an intra pass and a whole-chunk pass
#    that finishes dg (key_split); then the column loops alone (score_kd 0, dqk_diag 1)
if want key; then
timeout $(( $(left) * 30 / 100 )) python3 benchmarks/sweep_gated.py --kinds key \
    --chunks default --tiles default --warps default --stages 1 --score-kd 8,-1 \
    --dqk-diag 0,2 --key-split 0,1 --json "$OUT/sweep_key.json" --budget-s 100 \
    > "$OUT/sweep_key.log" 2>&1
timeout $(( $(left) * 10 / 100 )) python3 benchmarks/sweep_gated.py --kinds key \
    --chunks default --tiles default --warps default --stages 1 --score-kd 0 \
    --dqk-diag 1 --key-split 1 --budget-s 30 >> "$OUT/sweep_key.log" 2>&1
fi

# 3) the delta rule's hoisted chunk-local dU' (delta_bwd.DV_LOCAL_HOISTED), 4 and 8 warps,
#    the inverse's tf32x3 dots (delta_fwd.INVERSE_TF32X3), prep's A in registers
if want delta; then
timeout "$(delta_cap)" python3 benchmarks/sweep_delta.py --kinds delta,gated_delta \
    --variants default,dv_local,dv_local_w8,inv_tf32x3,prep_regs,prep_regs_tf32x3 \
    --json "$OUT/sweep_delta.json" 2>&1 | tail -24
fi

# 4) the T = 32768 ratio (B 2): the scans' programs per SM (common.SCAN_PROGRAMS_PER_SM),
#    and mLSTMexp's chunk 64 against 128 there
if want fill; then
timeout $(( $(left) * 45 / 100 )) python3 benchmarks/sweep_gated.py --kinds mlstm_exp,mlstm_sig,none \
    --T 32768 --chunks default --tiles default --warps default --stages default \
    --scan-fill 1,2,4 --json "$OUT/sweep_fill.json" --budget-s 100 > "$OUT/sweep_fill.log" 2>&1
timeout $(( $(left) * 30 / 100 )) python3 benchmarks/sweep_gated.py --kinds mlstm_exp --T 32768 \
    --chunks 64,128 --tiles default --warps default --stages default --budget-s 50 \
    >> "$OUT/sweep_fill.log" 2>&1
fi

# 5) the per-kernel profile of the gated ops, host time included (the frozen constant gate's
#    bwd_dqk without the same-token split)
if want profile; then
timeout $(( $(left) - 10 )) python3 benchmarks/profile_kernels.py \
    --kinds none,const_frozen,const,scalar,key,mlstm_exp --json "$OUT/profile.json" \
    > "$OUT/profile.log" 2>&1
fi

for f in sweep_key.log sweep_fill.log; do [ -f "$OUT/$f" ] && tail -12 "$OUT/$f"; done
[ -f "$OUT/profile.log" ] && grep "^==" "$OUT/profile.log"
echo "== validate_untimed done in $(( $(date +%s) - START )) s"
