#!/usr/bin/env bash
# One device call (carry [".whl"]) that checks and times branch next/untimed before it is
# merged: the GPU tests, then the launch sweeps its new options need, each capped in time.
# Everything lands in $OUT; the last lines printed are the sweeps' tables.
#     bash benchmarks/validate_untimed.sh      (about 8 minutes; TOTAL_S caps it)
set -u
START=$(date +%s)
OUT=${OUT:-$PWD/benchmarks/results}
TOTAL_S=${TOTAL_S:-560}
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

# 1) every GPU test (about 2 minutes on 8 workers)
OUT="$OUT" TESTS_S=${TESTS_S:-200} RUN_TIMING=0 bash benchmarks/gpu_check.sh 2>&1 | tail -4

# 2) per-key diagonals: key_scores' one-key-token-at-a-time form (score_kd 0) against its
#    [16, 16, 8] weights, and the same choice in bwd_dqk (dqk_cols), on 2 and 4 warps
timeout $(( $(left) * 50 / 100 )) python3 benchmarks/sweep_gated.py --kinds key \
    --chunks default --tiles default --warps default --stages 1 --score-kd 8,0 \
    --dqk-cols 0,1 --score-warps 2,4 --json "$OUT/sweep_key.json" --budget-s 150 \
    > "$OUT/sweep_key.log" 2>&1

# 3) the T = 32768 ratio (B 2): the scans' programs per SM (common.SCAN_PROGRAMS_PER_SM),
#    and mLSTMexp's chunk 64 against 128 there
timeout $(( $(left) * 45 / 100 )) python3 benchmarks/sweep_gated.py --kinds mlstm_exp,mlstm_sig,none \
    --T 32768 --chunks default --tiles default --warps default --stages default \
    --scan-fill 1,2,4 --json "$OUT/sweep_fill.json" --budget-s 120 > "$OUT/sweep_fill.log" 2>&1
timeout $(( $(left) * 25 / 100 )) python3 benchmarks/sweep_gated.py --kinds mlstm_exp --T 32768 \
    --chunks 64,128 --tiles default --warps default --stages default --budget-s 60 \
    >> "$OUT/sweep_fill.log" 2>&1

# 4) the frozen constant gate (bwd_dqk without the same-token split) and the profile of
#    every gated op, host time included
timeout $(( $(left) - 10 )) python3 benchmarks/profile_kernels.py \
    --kinds none,const_frozen,const,scalar,key,mlstm_exp --json "$OUT/profile.json" \
    > "$OUT/profile.log" 2>&1

tail -10 "$OUT/sweep_key.log"; tail -10 "$OUT/sweep_fill.log"; grep "^==" "$OUT/profile.log"
echo "== validate_untimed done in $(( $(date +%s) - START )) s"
