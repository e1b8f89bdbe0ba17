#!/usr/bin/env bash
# A robust ResNet-20 on CIFAR-10: adversarial fine-tuning of the shared standard ResNet-20 (akamaster) with
# fast AT (FGSM with random start) at Linf 8/255, with and without SLIM, then NENNI calibrated on the result.
# Usage: SHARED=../shared OUT=runs/robust THREADS=1 bash benchmarks/robust_resnet20.sh [stage ...]
# Stages: fast, fast-slim (the two fine-tunes; independent, run them in parallel), calibrate (NENNI on the
# fast-AT model), eval (the dense models), eval-nenni (the NENNI model).
# Budget: 4 epochs of 150 steps of 128 images (a fresh random 19,200 of the 49,000 training images each
# epoch): 25-30 min per fine-tune on one contended CPU thread; EPOCHS=8 (the 8-epoch pair in docs/results.md,
# OUT=runs/robust8) took about 55 min. 1,000 training images are held out and the best epoch is chosen on
# PGD-10 accuracy over 256 of them. Raise STEPS (or drop --max-steps-per-epoch) and EPOCHS for a stronger model.
# Each stage is skipped when its output exists; an interrupted run continues (--resume).
set -euo pipefail
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/robust}
THREADS=${THREADS:-1}
EPOCHS=${EPOCHS:-4}
STEPS=${STEPS:-150}
EVAL_N=${EVAL_N:-1000}
NENNI=${NENNI:-.venv/bin/nenni}
PY=${PY:-.venv/bin/python}
DATA=(--data cifar10 --data-dir "$SHARED/data/cifar10")
WEIGHTS="$SHARED/weights/cifar10/akamaster/resnet20-12fca82f.th"
mkdir -p "$OUT"

finetune() {  # NAME EXTRA-FLAGS...
  local name=$1; shift
  [ -f "$OUT/$name.json" ] || $NENNI train --arch resnet20 --weights "$WEIGHTS" "${DATA[@]}" \
      --method fast --eps 8/255 "$@" --epochs "$EPOCHS" --max-steps-per-epoch "$STEPS" \
      --lr 0.05 --schedule cosine --warmup-epochs 0.5 --batch-size 128 --weight-decay 5e-4 \
      --val-split 0.02 --val-pgd-n 256 --val-pgd-steps 10 --seed 0 --threads "$THREADS" --no-progress --resume \
      --out "$OUT/$name" --json "$OUT/$name.json"
}

calibrate() {  # NENNI on the robust model: channel granularity (the deployment default), 50 % exact, k = n/4
  [ -d "$OUT/fast-nenni" ] || $NENNI calibrate --arch resnet20 --weights "$OUT/fast/weights.safetensors" "${DATA[@]}" \
      --granularity channel --ratio 0.5 --proj-dim n/4 --eval-n "$EVAL_N" --threads "$THREADS" \
      --out "$OUT/fast-nenni" --json "$OUT/fast-nenni.json"
}

evaluate() {  # clean and PGD-20 accuracy on the first EVAL_N test images (nenni eval is a later issue)
  $PY benchmarks/robust_eval.py "${DATA[@]}" --n "$EVAL_N" --threads "$THREADS" --json "$OUT/eval.json" \
      --model "fast=$OUT/fast/weights.safetensors" --model "fast-slim=$OUT/fast-slim/weights.safetensors" \
      --model "standard=$WEIGHTS"
}
# eval.json keeps, per model, the indices of the images that survive PGD-20 (`robust_indices`): the SLIM
# comparison in docs/results.md counts the images only one of the two models keeps (McNemar).

evaluate_nenni() {
  $PY benchmarks/robust_eval.py "${DATA[@]}" --n "$EVAL_N" --threads "$THREADS" --json "$OUT/eval-nenni.json" \
      --nenni "fast-nenni=$OUT/fast-nenni"
}

run() {
  case $1 in
    fast) finetune fast ;;
    fast-slim) finetune fast-slim --slim --slim-layers auto ;;
    calibrate) calibrate ;;
    eval) evaluate ;;
    eval-nenni) evaluate_nenni ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

for s in "${@:-fast fast-slim calibrate eval eval-nenni}"; do for x in $s; do run "$x"; done; done
