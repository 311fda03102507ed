#!/usr/bin/env bash
# One device call (carry [".whl"]) that checks and times branch next/untimed before it is
# merged: the GPU tests, then the launch sweeps its new settings need, each capped in time.
# Everything lands in $OUT; the last lines printed are the sweeps' tables.
#     bash benchmarks/validate_untimed.sh      (about 9 minutes; TOTAL_S caps it)
set -u
START=$(date +%s)
OUT=${OUT:-$PWD/benchmarks/results}
TOTAL_S=${TOTAL_S:-560}
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

# 1) every GPU test (about 2 minutes on 8 workers)
OUT="$OUT" TESTS_S=${TESTS_S:-200} RUN_TIMING=0 bash benchmarks/gpu_check.sh 2>&1 | tail -4

# 2) per-key launch settings: bwd_dqk's K block (now that dA is precomputed) and the
#    diagonal's key columns per step
timeout $(( $(left) * 45 / 100 )) python3 benchmarks/sweep_gated.py --kinds key \
    --chunks default --tiles default --warps default --stages 1 --dqk-bk 32,64 \
    --score-kd 8,32 --json "$OUT/sweep_key.json" --budget-s 150 > "$OUT/sweep_key.log" 2>&1

# 3) chunk 64 against 128 for the scalar-gated ops after the flat scans and the merged fwd_o
timeout $(( $(left) * 50 / 100 )) python3 benchmarks/sweep_gated.py --kinds scalar,mlstm_sig \
    --chunks 64,128 --tiles default --warps default --stages 2 \
    --json "$OUT/sweep_chunk.json" --budget-s 100 > "$OUT/sweep_chunk.log" 2>&1

# 4) the delta rule's 16-bit storage flags, one at a time back to float32
timeout $(( $(left) - 10 )) python3 benchmarks/sweep_delta.py --kinds delta,gated_delta \
    --variants default,f32_grads,f32_u --json "$OUT/sweep_delta.json" > "$OUT/sweep_delta.log" 2>&1

tail -6 "$OUT/sweep_key.log"; tail -5 "$OUT/sweep_chunk.log"; tail -18 "$OUT/sweep_delta.log"
echo "== validate_untimed done in $(( $(date +%s) - START )) s"
