#!/usr/bin/env bash
# Worst-case robust accuracy of the frontier's points as deployed (issue 18): `nenni eval` of each point's
# ONNX export (from frontier_check.sh) with its directory as the white-box source, and of the dense ResNet-20,
# on the first N test images at small Linf budgets (a standard CIFAR model is at 0 % by 8/255).
#
#   bash benchmarks/frontier_robust.sh [NAME ...]     # default: every point of results/frontier/index.json
# Env: N (500), EPS (1/255,2/255), PRESET (quick), THREADS (1), OUT (runs/frontier-robust), CHECK (runs/frontier-check),
# EXTRA (more `nenni eval` options, e.g. "--attack autoattack --aa-version standard" for AutoAttack alone).
# Cached per chunk beside each JSON: a rerun resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}  # the repository's venv (make install); PY overrides
SHARED=${SHARED:-${NENNI_SHARED:-../shared}}  # the one shared-data setting the tests use too
N=${N:-500}
EPS=${EPS:-1/255,2/255}
PRESET=${PRESET:-quick}
THREADS=${THREADS:-1}
OUT=${OUT:-runs/frontier-robust}
CHECK=${CHECK:-runs/frontier-check}
RESULTS=${RESULTS:-results/frontier}
mkdir -p "$OUT"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  mapfile -t names < <("$PY" -c "import json; [print(e['name']) for e in json.load(open('$RESULTS/index.json'))]")
fi
# shellcheck disable=SC2206
COMMON=(--data-dir "$SHARED/data/cifar10" --n "$N" --eps "$EPS" --preset "$PRESET" --threads "$THREADS" --no-progress
        ${EXTRA:-})
[ -f "$OUT/dense-resnet20.json" ] || "$PY" -m nenni_deploy.cli eval "$RESULTS/${names[0]}" --dense "${COMMON[@]}" \
  --json "$OUT/dense-resnet20.json" | tee "$OUT/dense-resnet20.txt"
for name in "${names[@]}"; do
  [ -f "$OUT/$name.json" ] || "$PY" -m nenni_deploy.cli eval "$CHECK/$name.onnx" --source "$RESULTS/$name" \
    "${COMMON[@]}" --json "$OUT/$name.json" | tee "$OUT/$name.txt"
done
