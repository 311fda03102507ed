#!/usr/bin/env bash
# LiT on the digits in one device command (< 10 min on an H100), from the repo root:
#     PYTHONPATH=$PWD bash benchmarks/vision_lit_gpu.sh      # results in $OUT (default benchmarks/results/vision_lit)
# 1. the teacher: a softmax DiT (--mixer attention), TEACHER_STEPS steps
# 2. LiT with weight inheritance from it and hybrid distillation, 30% of the teacher's steps
# 3. LiT without inheritance or distillation (from scratch), as many steps as the teacher,
#    evaluated 10 times on the way: the step where it reaches the teacher's sample quality
# (2 and 3 run side by side.) Every run ends with the judge's accuracy on 20 samples per
# class ("accuracy", per class) and the Frechet distance "fd" to the real test digits in the
# judge's features; lit_summary.json collects them and each run's sample grid of class 3 is
# samples_class3.png in its run directory.
# Knobs: TEACHER_STEPS=4000 BATCH=128 LR=1e-3 D_MODEL=64 LAYERS=4 DIFFUSION_STEPS=100
# When to run it: after a change to LiT's weight inheritance or distillation, or to the DiT
# recipe.
set -u
OUT=${OUT:-$PWD/benchmarks/results/vision_lit}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
PY=${PY:-python}
TEACHER_STEPS=${TEACHER_STEPS:-4000}; BATCH=${BATCH:-128}; LR=${LR:-1e-3}
D_MODEL=${D_MODEL:-64}; LAYERS=${LAYERS:-4}; DIFFUSION_STEPS=${DIFFUSION_STEPS:-100}
LIT_STEPS=$(( TEACHER_STEPS * 3 / 10 ))
START=$(date +%s)
COMMON=(--task digits --model dit --batch "$BATCH" --lr "$LR" --d-model "$D_MODEL" --layers "$LAYERS"
        --diffusion-steps "$DIFFUSION_STEPS" --log-every 100 --overwrite --no-progress)

echo "== teacher: softmax DiT, $TEACHER_STEPS steps"
$PY -m linattn.cli train "${COMMON[@]}" --mixer attention --steps "$TEACHER_STEPS" --eval-every $(( TEACHER_STEPS / 4 )) \
  --out "$OUT/dit_attention" > "$OUT/dit_attention.log" 2>&1
tail -n 3 "$OUT/dit_attention.log"

echo "== LiT: inherited + distilled ($LIT_STEPS steps) and from scratch ($TEACHER_STEPS steps) ($(( $(date +%s) - START )) s so far)"
$PY -m linattn.cli train "${COMMON[@]}" --mixer lit --steps "$LIT_STEPS" --eval-every $(( LIT_STEPS / 4 )) \
  --inherit-from "$OUT/dit_attention" --out "$OUT/lit_inherit" > "$OUT/lit_inherit.log" 2>&1 &
$PY -m linattn.cli train "${COMMON[@]}" --mixer lit --steps "$TEACHER_STEPS" --eval-every $(( TEACHER_STEPS / 10 )) \
  --out "$OUT/lit_scratch" > "$OUT/lit_scratch.log" 2>&1 &
wait
tail -n 3 "$OUT/lit_inherit.log" "$OUT/lit_scratch.log"

for run in dit_attention lit_inherit lit_scratch; do
  $PY -m linattn.cli sample "$OUT/$run" --class 3 --n 64
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for run in ("dit_attention", "lit_inherit", "lit_scratch"):
    p = out / run / "metrics.json"
    if not p.is_file():
        continue
    m = json.loads(p.read_text())
    curve = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    tests = [{"step": r["step"], "accuracy": r["accuracy"], "fd": r["fd"]} for r in curve if r["split"] == "test"]
    summary[run] = {"steps": m["steps"], "accuracy": m["accuracy"], "fd": m["fd"], "fd_real": m.get("fd_real"),
                    "per_class_accuracy": m["per_class_accuracy"], "evaluations": tests}
teacher = summary.get("dit_attention")
if teacher and "lit_scratch" in summary:
    reached = [e["step"] for e in summary["lit_scratch"]["evaluations"] if e["accuracy"] >= teacher["accuracy"] - 0.05]
    summary["lit_scratch"]["first_step_within_5_points_of_teacher"] = reached[0] if reached else None
(out / "lit_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("| run | steps | judge accuracy | FD | FD real train vs test |\n|---|---|---|---|---|")
for run, s in summary.items():
    print(f"| {run} | {s['steps']} | {100 * s['accuracy']:.1f} | {s['fd']:.2f} | {s['fd_real']:.2f} |")
if teacher and "lit_inherit" in summary:
    li = summary["lit_inherit"]
    print(f"LiT inherited + distilled: {li['steps']} steps ({100 * li['steps'] / teacher['steps']:.0f}% of the "
          f"teacher's), judge accuracy {100 * (li['accuracy'] - teacher['accuracy']):+.1f} points vs the teacher "
          f"({'within' if li['accuracy'] >= teacher['accuracy'] - 0.05 else 'NOT within'} 5 points)")
if teacher and "lit_scratch" in summary:
    print(f"LiT from scratch within 5 points of the teacher first at step "
          f"{summary['lit_scratch']['first_step_within_5_points_of_teacher']} (evaluated every {teacher['steps'] // 10})")
PY
echo "== done in $(( $(date +%s) - START )) s; results in $OUT"
