#!/usr/bin/env bash
# Longer runs at the frontier's 0.7-MAC budget (the 5-epoch runs ended with the held-out accuracy still rising):
#   nenni-r20-macs0.7-10ep: 5 more epochs from the published 5-epoch NENNI point, a second cosine cycle at half
#     the peak rate (allocation kept, no annealing, distillation from the dense base), 10 epochs in all;
#   pruning-r20-round8-e10-macs0.7: static pruning with 10 epochs from the start (benchmarks/frontier.sh, EPOCHS=10).
#
#   setsid nohup bash benchmarks/frontier_longer.sh [nenni|pruning] >> runs/frontier-longer.log 2>&1 < /dev/null &
#
# Resumable (--resume from runs/frontier/<name>/train); each finished point is published to results/frontier/
# and committed like frontier.sh's. Env: PY, SHARED, THREADS (1), LR (0.0025 for the second NENNI cycle), COMMIT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-${NENNI_SHARED:-../shared}}
THREADS=${THREADS:-1}
LR=${LR:-0.0025}
COMMIT=${COMMIT:-1}
RUNS=runs/frontier
RESULTS=results/frontier
log() { echo "[$(date -u +%F' '%T)] $*"; }
# shellcheck source=benchmarks/_commit_point.sh
source benchmarks/_commit_point.sh

nenni_10ep() {
  local name=nenni-r20-macs0.7-10ep from="$RESULTS/nenni-r20-macs0.7"
  [ -f "$RESULTS/$name/config.json" ] && { log "$name: published"; return 0; }
  log "start or resume $name"
  "$PY" -m nenni_deploy.cli finetune "$from" --data cifar10 --data-dir "$SHARED/data/cifar10" --epochs 5 --lr "$LR" \
    --grad-clip 25 --schedule cosine --batch-size 128 --val-split 0.04 --threads "$THREADS" --no-progress --resume \
    --teacher dense-base --anneal-epochs 0 --out "$RUNS/$name" --json "$RUNS/$name.json" || return 1
  "$PY" benchmarks/frontier_index.py "$RUNS/$name" "$name" --method nenni --budget-metric macs --budget 0.7 \
    --epochs 10 --recipe "nenni-r20-macs0.7 + 5 epochs: --teacher dense-base --anneal-epochs 0 lr=$LR grad-clip=25" \
    || return 1
  commit_point "$name" "results/frontier: $name (ResNet-20, NENNI, 5 + 5 epochs)"
}

pruning_10ep() {
  EPOCHS=10 POINTS=pruning-r20-round8-e10-macs0.7 THREADS="$THREADS" COMMIT="$COMMIT" bash benchmarks/frontier.sh
}

runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(nenni pruning)
for what in "${runs[@]}"; do
  case $what in
    nenni) nenni_10ep || log "nenni-r20-macs0.7-10ep FAILED (rerun to resume)" ;;
    pruning) pruning_10ep ;;
    *) log "unknown run $what (nenni or pruning)"; exit 2 ;;
  esac
done
log "done"
