#!/usr/bin/env bash
# One device call (carry [".whl"]) that checks and times branch next/untimed before it is
# merged: the GPU tests, then the sweeps its new options need, each capped in time.
# Everything lands in $OUT (8 files); the last lines printed are the sweeps' tables.
#     bash benchmarks/validate_untimed.sh      (about 9 minutes; TOTAL_S caps it)
set -u
START=$(date +%s)
OUT=${OUT:-$PWD/benchmarks/results}
TOTAL_S=${TOTAL_S:-565}
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

# 1) every GPU test (about 2 minutes on 8 workers)
OUT="$OUT" TESTS_S=${TESTS_S:-190} RUN_TIMING=0 bash benchmarks/gpu_check.sh 2>&1 | tail -4
rm -f "$OUT/gpu_tests.xml"

# 2) per-key options: the diagonals by dots relative to the middle row where the decays
#    allow (key_scores' score_kd -1, bwd_dqk's dqk_diag 2; else one key token at a time)
#    against the 3-D weights, and bwd_dqk split into an intra pass and a whole-chunk pass
#    that finishes dg (key_split); then the column loops alone (score_kd 0, dqk_diag 1)
timeout $(( $(left) * 30 / 100 )) python3 benchmarks/sweep_gated.py --kinds key \
    --chunks default --tiles default --warps default --stages 1 --score-kd 8,-1 \
    --dqk-diag 0,2 --key-split 0,1 --json "$OUT/sweep_key.json" --budget-s 100 \
    > "$OUT/sweep_key.log" 2>&1
timeout $(( $(left) * 10 / 100 )) python3 benchmarks/sweep_gated.py --kinds key \
    --chunks default --tiles default --warps default --stages 1 --score-kd 0 \
    --dqk-diag 1 --key-split 1 --budget-s 30 >> "$OUT/sweep_key.log" 2>&1

# 3) the delta rule's hoisted chunk-local dU' (delta_bwd.DV_LOCAL_HOISTED), 4 and 8 warps,
#    the inverse's tf32x3 dots (delta_fwd.INVERSE_TF32X3), prep's A in registers
timeout $(( $(left) * 35 / 100 )) python3 benchmarks/sweep_delta.py --kinds delta,gated_delta \
    --variants default,dv_local,dv_local_w8,inv_tf32x3,prep_regs,prep_regs_tf32x3 \
    --json "$OUT/sweep_delta.json" 2>&1 | tail -24

# 4) the T = 32768 ratio (B 2): the scans' programs per SM (common.SCAN_PROGRAMS_PER_SM),
#    and mLSTMexp's chunk 64 against 128 there
timeout $(( $(left) * 45 / 100 )) python3 benchmarks/sweep_gated.py --kinds mlstm_exp,mlstm_sig,none \
    --T 32768 --chunks default --tiles default --warps default --stages default \
    --scan-fill 1,2,4 --json "$OUT/sweep_fill.json" --budget-s 100 > "$OUT/sweep_fill.log" 2>&1
timeout $(( $(left) * 30 / 100 )) python3 benchmarks/sweep_gated.py --kinds mlstm_exp --T 32768 \
    --chunks 64,128 --tiles default --warps default --stages default --budget-s 50 \
    >> "$OUT/sweep_fill.log" 2>&1

# 5) the per-kernel profile of the gated ops, host time included (the frozen constant gate's
#    bwd_dqk without the same-token split)
timeout $(( $(left) - 10 )) python3 benchmarks/profile_kernels.py \
    --kinds none,const_frozen,const,scalar,key,mlstm_exp --json "$OUT/profile.json" \
    > "$OUT/profile.log" 2>&1

tail -10 "$OUT/sweep_key.log"; tail -12 "$OUT/sweep_fill.log"; grep "^==" "$OUT/profile.log"
echo "== validate_untimed done in $(( $(date +%s) - START )) s"
