#!/usr/bin/env bash
# The numbers grid on the GPU machine, in device commands of under 9 minutes each, from the
# repo root:
#     bash benchmarks/numbers_gpu.sh mul5    # 5-digit multiplication, reversed then forward, every
#                                            # mixer (all 10 cells at once, 380 s each, compiled,
#                                            # Qiu et al.'s simple-sample mix); then the operand
#                                            # probe of the reversed attention and hybrid models
#     bash benchmarks/numbers_gpu.sh long    # the two reversed 5x5 cells for the 99% bar (attention,
#                                            # 3:1 hybrid; 8 layers, simple-sample mix, compiled, 2 at
#                                            # once, 450 s each, tag "long"); a second and third call
#                                            # continue them from their checkpoints in $RUNS (the
#                                            # cosine spans 1100 s of training: three calls)
#     bash benchmarks/numbers_gpu.sh rest    # 3-digit addition both orders for every mixer, 5-digit
#                                            # by 1-digit multiplication both orders for every mixer,
#                                            # the tokenization cells (13 at once, 150 s each);
#                                            # probes of the reversed-addition attention and
#                                            # gated_deltanet models; their length generalisation
#                                            # (linattn eval --digits 3-7)
#     bash benchmarks/numbers_gpu.sh nupa    # optional third command: the NUPA cells (8 at once, 240 s)
# Writes into $OUT (default benchmarks/results): numbers.jsonl (JSON Lines, one record per cell,
# appended), numbers.md, numbers.png, numbers_probe_*.json/.png, numbers_lengths_*.txt.
# Resumable: when $OUT is elsewhere, benchmarks/results/numbers.jsonl is copied there first, so
# cells already recorded in the checkout are skipped (copy $OUT/numbers.jsonl back into
# benchmarks/results/ between commands). A second run of the same command continues the cells
# that did not fit. GRID_ARGS="..." is appended to every grid call (later flags win), e.g. to try
# the script on a CPU at toy size.
# Checkpoints: $RUNS (default runs/numbers in the checkout, ignored by git) holds each cell's
# run directory; `long` continues only what $RUNS holds, so call it again on the same device
# machine while it is warm (checkpoints of 50-100 MB do not travel back through $OUT).
#
# When to run it: after a change to the arithmetic tasks or to how a mixer learns them; it is
# the source of the README's numbers grid.
set -u
OUT=${OUT:-$PWD/benchmarks/results}
mkdir -p "$OUT"
RES=$OUT/numbers.jsonl
if [ "$(realpath "$OUT")" != "$(realpath benchmarks/results)" ] && [ -f benchmarks/results/numbers.jsonl ] \
        && [ ! -f "$RES" ]; then
    cp benchmarks/results/numbers.jsonl "$RES"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
RUNS=${RUNS:-$PWD/runs/numbers}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

probe() {  # probe RUN NAME: the operand probe of a saved cell, if it was trained here
    if [ -d "$RUNS/$1" ]; then
        python3 benchmarks/numbers_probe.py --run "$RUNS/$1" --out "$OUT/numbers_probe_$2" \
            --batches 2 --batch-size 512 2>&1 | tail -8
    fi
}

case "${1:-}" in
    mul5)
        python3 benchmarks/numbers_grid.py --phases mul5 --workers 10 --cell-s 380 --budget-s 480 \
            --train-lengths simple --compile default --save-dir "$RUNS" --out "$RES" ${GRID_ARGS:-}
        probe mul5-mul5_reversed-attention mul5_attention
        probe mul5-mul5_reversed-hybrid mul5_hybrid
        ;;
    long)
        python3 benchmarks/numbers_grid.py --phases mul5 --mixers attention,hybrid --orders reversed \
            --workers 2 --layers 8 --train-lengths simple --compile default --tag long --cell-s 450 \
            --budget-s 480 --schedule-s 1100 --save-dir "$RUNS" --continue --out "$RES" ${GRID_ARGS:-}
        probe mul5-mul5_reversed-attention-long mul5_attention_long
        probe mul5-mul5_reversed-hybrid-long mul5_hybrid_long
        ;;
    rest)
        python3 benchmarks/numbers_grid.py --phases add3,mul5x1,tok --workers 13 --cell-s 150 \
            --budget-s 470 --save-dir "$RUNS" --out "$RES" ${GRID_ARGS:-}
        probe add3-add3_reversed-attention add3_attention
        probe add3-add3_reversed-gated_deltanet add3_gated_deltanet
        for m in attention gated_deltanet; do
            if [ -d "$RUNS/add3-add3_reversed-$m" ]; then
                python3 -m linattn.cli eval "$RUNS/add3-add3_reversed-$m" --digits 3-7 --batches 4 \
                    --batch-size 512 | tee "$OUT/numbers_lengths_add3_$m.txt"
            fi
        done
        ;;
    nupa)
        python3 benchmarks/numbers_grid.py --phases nupa --workers 8 --cell-s 240 --budget-s 400 \
            --save-dir "$RUNS" --out "$RES" ${GRID_ARGS:-}
        ;;
    *)
        echo "usage: bash benchmarks/numbers_gpu.sh mul5|long|rest|nupa" >&2
        exit 2
        ;;
esac
