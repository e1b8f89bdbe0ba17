#!/usr/bin/env bash
# Re-measure every committed frontier point from its model directory (the bench on an IDLE machine):
#   (a) export it to ONNX, float32 and int8 (the NENNI model with its custom ops, the pruned one as plain ONNX),
#   (b) accuracy of both exports in ONNX Runtime on the full CIFAR-10 test set (nenni predict),
#   (c) one `nenni bench` of every export, interleaved with the dense ResNet-20 (float32 and int8) at batch
#       1 and 64, 2 threads.
#
#   bash benchmarks/frontier_check.sh            # every entry of results/frontier/index.json
#   bash benchmarks/frontier_check.sh NAME ...   # just these
# Writes OUT/<name>[-int8].{onnx,export.json,predict.json} and OUT/bench.json (read by frontier_table.py), and
# prints each point's accuracy in index.json and in ONNX Runtime. Env: PY, SHARED, THREADS, OUT, BENCH=0 skips (c),
# DURATION (timed seconds per file and batch size, over all rounds: 5).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's nenni_deploy, whatever the venv installed
PY=${PY:-.venv/bin/python}  # the repository's venv (make install); PY overrides
SHARED=${SHARED:-${NENNI_SHARED:-../shared}}  # the one shared-data setting the tests use too
THREADS=${THREADS:-2}
OUT=${OUT:-runs/frontier-check}
RESULTS=${RESULTS:-results/frontier}
BENCH=${BENCH:-1}
DURATION=${DURATION:-5}
NENNI=("$PY" -m nenni_deploy.cli)
DATA=(--data cifar10 --data-dir "$SHARED/data/cifar10")
mkdir -p "$OUT"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  mapfile -t names < <("$PY" -c "import json; [print(e['name']) for e in json.load(open('$RESULTS/index.json'))]")
fi
export_both() {  # SOURCE STEM [--dense]: float32 and int8 exports with their accuracy on the full test set
  local src=$1 stem=$2; shift 2
  [ -f "$OUT/$stem.onnx" ] || "${NENNI[@]}" export "$src" "$@" --out "$OUT/$stem.onnx" --data-dir "$SHARED/data/cifar10" \
    --json "$OUT/$stem.export.json" >/dev/null
  [ -f "$OUT/$stem-int8.onnx" ] || "${NENNI[@]}" export "$src" "$@" --int8 --out "$OUT/$stem-int8.onnx" \
    --data-dir "$SHARED/data/cifar10" --json "$OUT/$stem-int8.export.json" >/dev/null
  for f in "$stem" "$stem-int8"; do
    [ -f "$OUT/$f.predict.json" ] || "${NENNI[@]}" predict "$OUT/$f.onnx" "${DATA[@]}" --threads "$THREADS" \
      --json "$OUT/$f.predict.json" >/dev/null
  done
}
# The dense base: the shared checkpoint every point started from (base.safetensors; benchmarks/frontier_base.py
# gave it to the points the grid wrote before directories kept it).
first_nenni=$("$PY" -c "import json; print(next(e['name'] for e in json.load(open('$RESULTS/index.json')) if e['method'] == 'nenni'))")
export_both "$RESULTS/$first_nenni" dense-resnet20 --dense
files=("$OUT/dense-resnet20-int8.onnx")
for name in "${names[@]}"; do
  export_both "$RESULTS/$name" "$name"
  files+=("$OUT/$name.onnx" "$OUT/$name-int8.onnx")
  "$PY" - "$RESULTS/index.json" "$name" "$OUT" <<'PY'
import json, sys
index, name, out = sys.argv[1:]
entry = next(e for e in json.load(open(index)) if e["name"] == name)
f, i = (json.load(open(f"{out}/{s}.predict.json"))["accuracy"] for s in (name, f"{name}-int8"))
print(f"{name}: index {entry['accuracy']:.2f} %, ONNX Runtime float32 {f:.2f} %, int8 {i:.2f} %")
PY
done
if [ "$BENCH" = 1 ]; then
  # --force: exports made before frontier_base.py gave the grid's directories their base record no dense-base hash;
  # every file here comes from the same shared checkpoint
  "${NENNI[@]}" bench "${files[@]}" --baseline "$OUT/dense-resnet20.onnx" --batch 1 --batch 64 --threads "$THREADS" \
    --duration "$DURATION" --no-progress --force --json "$OUT/bench.json" >"$OUT/bench.txt"
  cat "$OUT/bench.txt"
fi
