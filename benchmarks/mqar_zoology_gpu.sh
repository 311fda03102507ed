#!/usr/bin/env bash
# One device command of the Zoology MQAR grid, from the repo root on the GPU machine:
#     FILE=benchmarks/results/mqar_zoology-h100-2026-12-07.json JOBS=6 bash benchmarks/mqar_zoology_gpu.sh \
#         --lrs 2.2e-3 --overrides '{"dtype": "bfloat16", "compile": "default"}'
# (bf16 and inductor: in Zoology's float32 our kernels take exact "ieee" dots and the runs
# starve; keep JOBS x the runs' memory within the card: 6-8 runs at d_model 128)
# It prints the GPU and the versions, runs MoM's GPU tests (the Triton path on packed
# per-memory sequences; they also fill Triton's compile cache), runs benchmarks/mqar_zoology.py
# on the GPU with the arguments given (appending to $FILE, resuming what it holds), plots it,
# and copies the JSON Lines file, its PNGs and the log to $OUT/ (or benchmarks/results/).
# The whole run keeps within TOTAL_S seconds (default 560, under the device's 10 minutes).
#
# When to run it: after a change that can move a mixer's recall; it is the source of
# BENCHMARKS.md's recall table.
#
# Environment knobs:
#   FILE=...        the results file (default: the script's own name for this GPU and date);
#                   keep the same one across calls so the grid resumes
#   TOTAL_S=560     budget of the whole script; the grid gets what the tests leave, less 25 s
#   SKIP_TESTS=1    skip the GPU tests
#   JOBS=8          concurrent runs
set -u
START=$(date +%s)
TOTAL_S=${TOTAL_S:-560}
DEST=${OUT:-$PWD/benchmarks/results}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout 150 python3 -m pytest -q -x -m gpu tests/layers/test_mom.py \
        "tests/layers/test_mixers.py::test_mixer_under_bf16_autocast" -k "mom" 2>&1 | tail -5
fi
FILE=${FILE:-$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import mqar_zoology as z; print(z.default_out())")}
LEFT=$(( TOTAL_S - ($(date +%s) - START) - 25 ))
timeout $(( LEFT + 20 )) python3 benchmarks/mqar_zoology.py --out "$FILE" --jobs "${JOBS:-8}" \
    --budget-s "$LEFT" "$@" 2>&1 | tee "$DEST/mqar_zoology.log" | grep -v "^\s*$" | tail -80
python3 benchmarks/mqar_zoology.py --plot "$FILE" > "$DEST/mqar_zoology_table.md"
cat "$DEST/mqar_zoology_table.md"
cp "$FILE" "${FILE%.json}".png "${FILE%.json}"-state.png "$DEST"/ 2>/dev/null
echo "mqar_zoology_gpu: $(( $(date +%s) - START )) s; results in $DEST"
