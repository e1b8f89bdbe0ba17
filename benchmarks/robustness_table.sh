#!/usr/bin/env bash
# Robustness of dense vs NENNI on the shared CIFAR-10 ResNet-20 (standard) and ResNet-4B (adversarially trained
# at 2/255), as deployed: each model is exported to ONNX and `nenni eval` replays every adversarial image on ONNX
# Runtime, attacking the PyTorch model it was exported from. Writes OUT/<arch>-<variant>.json/.png and
# OUT/table.md (benchmarks/robustness_summary.py).
#
# The full report (every setting below at its default) is the 1,000-image run:
#     bash benchmarks/robustness_table.sh
# A smaller run on a shared CPU (what docs/results.md reports states its own settings), e.g.:
#     N=100 STEPS=10 AA="--aa-version custom --aa-attacks apgd-ce --aa-iters 20" bash benchmarks/robustness_table.sh
#
# Resumable: calibrated models and ONNX files are kept, and `nenni eval` caches every (attack, eps, chunk) result
# beside its JSON, so rerunning the same command continues where it stopped.
set -euo pipefail

SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/robustness}
ARCHS=${ARCHS:-"resnet20 resnet4b"}
VARIANTS=${VARIANTS:-"dense element nm channel gaussian"}
N=${N:-1000}
STEPS=${STEPS:-50}
RESTARTS=${RESTARTS:-1}
EOT=${EOT:-20}
AA=${AA:-}                  # default: AutoAttack standard (deterministic) / rand (randomised), 100 iterations
CS=${CS:-}                  # e.g. "--cs-layers layer2"; default: each stage
ATTACKS=${ATTACKS:-}        # e.g. "pgd,autoattack,bpda,eot,transfer"; default: every attack that applies
EPS_LIST=${EPS_LIST:-}      # e.g. "1/255,2/255"; default: the budgets per model (below)
TRANSFER_STEPS=${TRANSFER_STEPS:-20}
THREADS=${THREADS:-1}
NENNI=${NENNI:-.venv/bin/nenni}
export OMP_NUM_THREADS=$THREADS

DATA=(--data cifar10 --data-dir "$SHARED/data/cifar10")
# resnet20at: the fast-AT ResNet-20 of benchmarks/robust_resnet20.sh (8/255; not in ../shared, train it first).
declare -A WEIGHTS=(
  [resnet20]="$SHARED/weights/cifar10/akamaster/resnet20-12fca82f.th"
  [resnet4b]="$SHARED/weights/cifar10/abcrown/resnet4b.pth"
  [resnet20at]="${ROBUST_R20:-runs/robust8/fast/weights.safetensors}"
)
declare -A ARCH_OF=([resnet20at]=resnet20)
declare -A EPS=([resnet20]="1/255,2/255,4/255" [resnet4b]="2/255,4/255,8/255" [resnet20at]="2/255,4/255,8/255")
# Settings found by a calibration sweep on the first 1,000 test images (docs/results.md): the configuration of
# each granularity that stays within 1 point of dense accuracy; the gaussian model adds noise to the element one.
declare -A SETTINGS=(
  [resnet20-element]="--granularity element --ratio 0.9 --proj-dim n/2"
  [resnet20-nm]="--granularity nm --nm 4:8 --proj-dim n/2 --include layer3.2.conv2"
  [resnet20-channel]="--granularity channel --ratio 0.75 --proj-dim n/2 --include layer3.2.conv2"
  [resnet20-gaussian]="--granularity element --ratio 0.9 --proj-dim n/2 --noise gaussian --noise-scale 0.5"
  [resnet4b-element]="--granularity element --ratio 0.95 --proj-dim n/2"
  [resnet4b-nm]="${R4B_NM:---granularity nm --nm 4:8 --proj-dim n/2 --include layer2.1.*}"
  [resnet4b-channel]="--granularity channel --ratio 0.95 --proj-dim 1.0"
  [resnet4b-gaussian]="--granularity element --ratio 0.95 --proj-dim n/2 --noise gaussian --noise-scale 1.0"
  [resnet20at-element]="--granularity element --ratio 0.95 --proj-dim n/2"
  [resnet20at-gaussian]="--granularity element --ratio 0.95 --proj-dim n/2 --noise gaussian --noise-scale 1.0"
)

mkdir -p "$OUT"
for arch in $ARCHS; do
  for variant in $VARIANTS; do
    tag="$arch-$variant"
    # The dense baseline is the base model of the element model: the same weights, every layer exact.
    dir="$OUT/models/$arch-${variant/dense/element}"
    if [ ! -f "$dir/config.json" ]; then
      # shellcheck disable=SC2086
      nice -n 19 "$NENNI" calibrate --arch "${ARCH_OF[$arch]:-$arch}" --weights "${WEIGHTS[$arch]}" "${DATA[@]}" \
        ${SETTINGS[$arch-${variant/dense/element}]} --calib-n 1024 --eval-n 1000 --threads "$THREADS" --out "$dir"
    fi
    onnx="$OUT/models/$tag.onnx"
    if [ ! -f "$onnx" ]; then
      extra=()
      [ "$variant" = dense ] && extra=(--dense)
      nice -n 19 "$NENNI" export "$dir" "${extra[@]}" --out "$onnx" --data-dir "$SHARED/data/cifar10" --threads "$THREADS"
    fi
    echo "== $tag $(date -u +%H:%M:%S)"
    # shellcheck disable=SC2086
    nice -n 19 "$NENNI" eval "$onnx" --source "$dir" "${DATA[@]}" --n "$N" --eps "${EPS_LIST:-${EPS[$arch]}}" \
      --steps "$STEPS" --restarts "$RESTARTS" --eot-samples "$EOT" --transfer-steps "$TRANSFER_STEPS" $AA $CS \
      ${ATTACKS:+--attack "$ATTACKS"} \
      --threads "$THREADS" --no-progress --json "$OUT/$tag.json" --plot "$OUT/$tag.png"
  done
done
.venv/bin/python benchmarks/robustness_summary.py "$OUT" > "$OUT/table.md"
echo "wrote $OUT/table.md"
