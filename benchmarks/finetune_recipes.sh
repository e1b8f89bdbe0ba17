#!/usr/bin/env bash
# NENNI fine-tuning recipes on the shared CIFAR-10 ResNets (issue 2's fine-tuned rows).
# Usage: SHARED=../shared OUT=runs/finetune THREADS=2 bash benchmarks/finetune_recipes.sh [recipe ...]
# ResNet-56 diverged at lr 0.01 (NaN loss at step 37), so its recipes use lr 0.005 and gradient clipping.
# Each step is skipped when its output exists; an interrupted fine-tune continues with --resume.
set -euo pipefail
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/finetune}
THREADS=${THREADS:-2}
EPOCHS=${EPOCHS:-4}
NENNI=${NENNI:-.venv/bin/nenni}
DATA=(--data cifar10 --data-dir "$SHARED/data/cifar10")
mkdir -p "$OUT"

weights() { case $1 in resnet20) echo "$SHARED/weights/cifar10/akamaster/resnet20-12fca82f.th" ;;
                       resnet56) echo "$SHARED/weights/cifar10/akamaster/resnet56-4bfd9763.th" ;; esac; }

# recipe NAME ARCH EPOCHS LR GRAD-CLIP CALIBRATE-FLAGS...
recipe() {
  local name=$1 arch=$2 epochs=$3 lr=$4 clip=$5; shift 5
  [ -d "$OUT/$name-cal" ] || $NENNI calibrate --arch "$arch" --weights "$(weights "$arch")" "${DATA[@]}" "$@" \
      --eval-n 10000 --threads "$THREADS" --out "$OUT/$name-cal" --json "$OUT/$name-cal.json"
  [ -f "$OUT/$name-ft.json" ] || $NENNI finetune "$OUT/$name-cal" "${DATA[@]}" --epochs "$epochs" --lr "$lr" \
      --grad-clip "$clip" --schedule cosine --batch-size 128 --val-split 0.04 --threads "$THREADS" --no-progress --resume \
      --out "$OUT/$name-ft" --json "$OUT/$name-ft.json"
}

run() {
  case $1 in
    r20-channel) recipe r20-channel-0.3-k8 resnet20 "$EPOCHS" 0.01 0 --granularity channel --ratio 0.3 --proj-dim n/8 ;;
    r20-nm48) recipe r20-nm48-k4 resnet20 "$EPOCHS" 0.01 0 --granularity nm --nm 4:8 --proj-dim n/4 ;;
    r56-channel) recipe r56-channel-0.3-k8 resnet56 "$EPOCHS" 0.005 1.0 --granularity channel --ratio 0.3 --proj-dim n/8 ;;
    r56-nm48) recipe r56-nm48-k4 resnet56 "$EPOCHS" 0.005 1.0 --granularity nm --nm 4:8 --proj-dim n/4 ;;
    *) echo "unknown recipe $1" >&2; exit 2 ;;
  esac
}

for r in "${@:-r20-channel r20-nm48 r56-channel r56-nm48}"; do for x in $r; do run "$x"; done; done
