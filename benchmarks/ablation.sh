#!/usr/bin/env bash
# The schedule ablation of issue 18 (docs/results.md): ResNet-20, channel NENNI at one uniform setting, a few
# short fine-tunes that each add one ingredient. Sequential, resumable (each variant's --resume), nice 19.
#   bash benchmarks/ablation.sh            # writes runs/ablation/<variant>/ and runs/ablation/summary.tsv
# Env: BASE (calibrated model dir), EPOCHS, STEPS (max steps per epoch), EVAL_N, THREADS, LR, VARIANTS.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's nenni_deploy, whatever the venv installed
PY=${PY:-.venv/bin/python}  # the repository's venv (make install); PY overrides
BASE=${BASE:-runs/abl/r20-c05}
OUT=${OUT:-runs/ablation-clip}
EPOCHS=${EPOCHS:-2}
STEPS=${STEPS:-150}
EVAL_N=${EVAL_N:-1000}
THREADS=${THREADS:-1}
LR=${LR:-0.005}
CLIP=${CLIP:-25}  # as in the frontier: without it kd_anneal wrecked the base weights (exact accuracy 9 %)
SENS=${SENS:-runs/frontier/sensitivity-r20-channel.json}  # written by the frontier's first NENNI point
mkdir -p "$OUT"
declare -A FLAGS=(
  [ce]="--teacher none"
  [kd]="--teacher dense-base"
  [kd_anneal]="--teacher dense-base --anneal-epochs 1"
  [kd_anneal_scale]="--teacher dense-base --anneal-epochs 1 --train-scale"
  [kd_anneal_alr3]="--teacher dense-base --anneal-epochs 1 --approx-lr-scale 3"
  [kd_anneal_feat]="--teacher dense-base --anneal-epochs 1 --distill-features 1"
  [ce_anneal]="--teacher none --anneal-epochs 1"
  # the uniform model's own cost (0.644 of dense MACs), re-allocated by sensitivity
  [ce_alloc]="--teacher none --budget-macs 0.644 --sensitivity-cache $SENS"
  [kd_anneal_alloc]="--teacher dense-base --anneal-epochs 1 --budget-macs 0.644 --sensitivity-cache $SENS"
)
VARIANTS=${VARIANTS:-"kd_anneal ce_anneal kd_anneal_alloc ce_alloc ce kd kd_anneal_scale"}
for v in $VARIANTS; do
  if [ -f "$OUT/$v/config.json" ]; then echo "$v: done"; continue; fi
  echo "== $v: ${FLAGS[$v]}  ($(date -u +%H:%M:%S))"
  # shellcheck disable=SC2086
  nice -n 19 "$PY" -m nenni_deploy.cli finetune "$BASE" --data cifar10 --epochs "$EPOCHS" --lr "$LR" --grad-clip "$CLIP" \
    --max-steps-per-epoch "$STEPS" --eval-n "$EVAL_N" --threads "$THREADS" --no-progress --resume \
    --json "$OUT/$v.json" --out "$OUT/$v" ${FLAGS[$v]} || echo "$v: FAILED"
done
"$PY" - "$OUT" $VARIANTS <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
rows = ["variant\tnenni_before\tnenni_after\texact_after\ts_per_epoch"]
for n in names:
    try:
        r = json.load(open(f"{out}/{n}.json"))
    except OSError:
        continue
    rows.append(f"{n}\t{r['nenni_accuracy_before']:.2f}\t{r['nenni_accuracy_after']:.2f}\t{r['exact_accuracy_after']:.2f}\t{r['seconds_per_epoch']:.0f}")
open(f"{out}/summary.tsv", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
