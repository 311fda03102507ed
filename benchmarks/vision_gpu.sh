#!/usr/bin/env bash
# Vision on one GPU in one device command (< 10 min on an H100), from the repo root:
#     PYTHONPATH=$PWD bash benchmarks/vision_gpu.sh          # results in $OUT (default benchmarks/results/vision)
# 1. the vision GPU tests (pytest -m gpu tests/vision): Triton causal=False path of the
#    mixers against the float64 reference (float32, bf16), "auto" taking Triton on CUDA
# 2. ViTs on the digits, mixers mala / attention / linear, seeds 0 1 2 (the three seeds of a
#    mixer run side by side on the GPU), same size and budget; vit_summary.json holds each
#    mixer's mean and spread of test accuracy
# 3. benchmarks/vision_bench.py: the non-causal op and the mala / lit / linear layers against
#    SDPA at 16K-64K tokens, fwd and fwd+bwd, bf16 (vision_bench.json and a table)
# Knobs: STEPS=1500 BATCH=128 LR=2e-3 D_MODEL=64 LAYERS=4 (the ViTs), SKIP_TESTS=1, SKIP_BENCH=1
# When to run it: after a change to the vision mixers, the non-causal path or the ViT recipe.
set -u
OUT=${OUT:-$PWD/benchmarks/results/vision}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
PY=${PY:-python}
STEPS=${STEPS:-1500}; BATCH=${BATCH:-128}; LR=${LR:-2e-3}; D_MODEL=${D_MODEL:-64}; LAYERS=${LAYERS:-4}
START=$(date +%s)

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== vision GPU tests"
  # 4 xdist workers: most of the time is Triton compiling the float32 ("ieee") and bf16 kernels
  timeout 240 $PY -m pytest -q -m gpu -n 4 tests/vision -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  tail -n 15 "$OUT/gpu_tests.log"
fi

echo "== ViTs on digits: $STEPS steps, batch $BATCH, d_model $D_MODEL, $LAYERS layers ($(( $(date +%s) - START )) s so far)"
for mixer in mala attention linear; do
  for seed in 0 1 2; do
    $PY -m linattn.cli train --task digits --model vit --mixer "$mixer" --seed "$seed" --steps "$STEPS" \
      --batch "$BATCH" --lr "$LR" --d-model "$D_MODEL" --layers "$LAYERS" --eval-every 0 --log-every 100 \
      --out "$OUT/vit_${mixer}_s$seed" --overwrite --no-progress > "$OUT/vit_${mixer}_s$seed.log" 2>&1 &
  done
  wait
  tail -n 3 "$OUT/vit_${mixer}_s0.log"
done
$PY - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for mixer in ("mala", "attention", "linear"):
    accs = [json.loads((out / f"vit_{mixer}_s{s}" / "metrics.json").read_text())["accuracy"]
            for s in range(3) if (out / f"vit_{mixer}_s{s}" / "metrics.json").is_file()]
    if accs:
        summary[mixer] = {"accuracies": accs, "mean": statistics.mean(accs),
                          "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0}
(out / "vit_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("| mixer | test accuracy, mean of seeds | seeds |\n|---|---|---|")
for m, s in summary.items():
    print(f"| {m} | {100 * s['mean']:.2f} +- {100 * s['stdev']:.2f} | {', '.join(f'{100 * a:.2f}' for a in s['accuracies'])} |")
PY

if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== speed ($(( $(date +%s) - START )) s so far)"
  timeout 240 $PY benchmarks/vision_bench.py --out "$OUT"
fi
echo "== done in $(( $(date +%s) - START )) s; results in $OUT"
