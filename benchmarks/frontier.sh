#!/usr/bin/env bash
# Issue 18's frontier: NENNI (budget allocation + distillation + schedules) against static channel pruning
# (torch-pruning + the same distillation and epochs) on ResNet-20 / CIFAR-10, at the same budgets.
#
#   setsid nohup bash benchmarks/frontier.sh > runs/frontier.log 2>&1 < /dev/null &
#
# Safe to rerun at any time: every run continues with --resume from its last epoch checkpoint
# (runs/frontier/<name>/train), finished points are skipped. Each finished point is copied without its
# training folder to results/frontier/<name>/, entered in results/frontier/index.json and committed on the
# current branch (COMMIT=0 to skip). Env: EPOCHS, THREADS, LR, CLIP, POINTS, RECIPE, SHARED, PY.
# A pruning point named ...-roundN-... keeps its widths multiples of N (--round-to N), any other its exact widths.
# Two copies with disjoint POINTS may run side by side (what the issue-18 grid did, see the lead's notes).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's nenni_deploy, whatever the venv installed
PY=${PY:-.venv/bin/python}  # the repository's venv (make install); PY overrides
SHARED=${SHARED:-${NENNI_SHARED:-../shared}}  # the one shared-data setting the tests use too
EPOCHS=${EPOCHS:-5}
THREADS=${THREADS:-1}  # one thread per run: on a shared machine two 1-thread runs get more done than one 2-thread run
RUNS=${RUNS:-runs/frontier}
RESULTS=${RESULTS:-results/frontier}
COMMIT=${COMMIT:-1}
LR=${LR:-0.005}  # NENNI with distillation diverged at 0.01 (results.md); both methods get the same rate
CLIP=${CLIP:-25}  # a safety net against spikes: typical gradient norms were 5-20
# The NENNI recipe chosen by the ablation (docs/results.md, "Closing the gap"); the pruning runs share the
# epochs, learning rate, schedule, batch and the distillation from the unpruned model.
RECIPE=${RECIPE:---teacher dense-base --anneal-epochs 1}
POINTS=${POINTS:-"nenni-r20-macs0.7 pruning-r20-macs0.7 nenni-r20-bitops0.5 pruning-r20-macs0.5 nenni-r20-macs0.5"}
WEIGHTS_R20="$SHARED/weights/cifar10/akamaster/resnet20-12fca82f.th"
DATA=(--data cifar10 --data-dir "$SHARED/data/cifar10")
COMMON=(--epochs "$EPOCHS" --lr "$LR" --grad-clip "$CLIP" --schedule cosine --batch-size 128 --val-split 0.04 --threads "$THREADS"
        --no-progress --resume)
mkdir -p "$RUNS" "$RESULTS"
log() { echo "[$(date -u +%F' '%T)] $*"; }
# shellcheck source=benchmarks/_commit_point.sh
source benchmarks/_commit_point.sh

base_r20() {  # the calibrated channel model every NENNI point re-allocates from (its dense base is the checkpoint)
  local out="$RUNS/base-r20-channel"
  [ -f "$out/config.json" ] && return 0
  log "calibrate $out"
  nice -n 19 "$PY" -m nenni_deploy.cli calibrate --arch resnet20 --weights "$WEIGHTS_R20" "${DATA[@]}" \
    --granularity channel --ratio 0.5 --proj-dim n/8 --calib-n 2048 --eval-n 1000 --threads "$THREADS" \
    --out "$out" --json "$RUNS/base-r20-channel.json"
}

round_args() {  # NAME -> "--round-to N" for a point named ...-roundN-..., else the exact widths (--round-to 1)
  if [[ $1 =~ -round([0-9]+)- ]]; then echo "--round-to ${BASH_REMATCH[1]}"; else echo "--round-to 1"; fi
}

publish() {  # NAME METHOD METRIC BUDGET
  local name=$1 method=$2 metric=$3 budget=$4
  local recipe="$RECIPE"
  [ "$method" = pruning ] && recipe="--importance l1 --teacher dense $(round_args "$name")"
  "$PY" benchmarks/frontier_index.py "$RUNS/$name" "$name" --method "$method" --budget-metric "$metric" \
    --budget "$budget" --results "$RESULTS" --recipe "$recipe epochs=$EPOCHS lr=$LR grad-clip=$CLIP" || return 1
  commit_point "$name" "results/frontier: $name (ResNet-20, $method, $metric budget $budget)"
}

point() {  # NAME
  local name=$1 method metric budget
  method=${name%%-*}
  metric=$(sed -E 's/.*-(macs|bitops)([0-9.]+)$/\1/' <<<"$name")
  budget=$(sed -E 's/.*-(macs|bitops)([0-9.]+)$/\2/' <<<"$name")
  if [ -f "$RESULTS/$name/config.json" ]; then log "$name: published"; return 0; fi
  if [ ! -f "$RUNS/$name/config.json" ]; then
    log "start or resume $name"
    if [ "$method" = nenni ]; then
      base_r20 || return 1
      # shellcheck disable=SC2086
      nice -n 19 "$PY" -m nenni_deploy.cli finetune "$RUNS/base-r20-channel" "${DATA[@]}" "${COMMON[@]}" \
        --budget-$metric "$budget" --sensitivity-cache "$RUNS/sensitivity-r20-channel.json" $RECIPE \
        --out "$RUNS/$name" --json "$RUNS/$name.json" || return 1
    else
      nice -n 19 "$PY" -m nenni_deploy.cli prune --arch resnet20 --weights "$WEIGHTS_R20" "${DATA[@]}" \
        "${COMMON[@]}" --budget-macs "$budget" --importance l1 --teacher dense $(round_args "$name") \
        --out "$RUNS/$name" --json "$RUNS/$name.json" || return 1
    fi
  fi
  log "publish $name"
  publish "$name" "$method" "$metric" "$budget"
}

log "frontier: points $POINTS; epochs $EPOCHS; recipe: $RECIPE"
for p in $POINTS; do
  point "$p" || log "$p FAILED (rerun the script to retry; it resumes)"
done
log "frontier: done"
