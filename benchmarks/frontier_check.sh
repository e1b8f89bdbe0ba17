#!/usr/bin/env bash
# Re-measure every committed frontier point from its model directory, on an IDLE machine:
#   (a) export it to ONNX (the NENNI model with its custom ops, or the pruned model as plain ONNX),
#   (b) its accuracy in ONNX Runtime on the full CIFAR-10 test set (nenni predict),
#   (c) latency at batch 1 and 64 interleaved with the dense ResNet-20 export (nenni bench).
#
#   bash benchmarks/frontier_check.sh            # every entry of results/frontier/index.json
#   bash benchmarks/frontier_check.sh NAME ...   # just these
# Writes runs/frontier-check/<name>.{onnx,export.json,predict.json,bench.json} and prints one line per point:
# name, accuracy in index.json, accuracy in ONNX Runtime. Env: PY, SHARED, THREADS, OUT, BENCH=0 to skip (c).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's nenni_deploy, whatever the venv installed
PY=${PY:-/work/main/.venv/bin/python}
SHARED=${SHARED:-/work/shared}
THREADS=${THREADS:-2}
OUT=${OUT:-runs/frontier-check}
RESULTS=${RESULTS:-results/frontier}
BENCH=${BENCH:-1}
NENNI=("$PY" -m nenni_deploy.cli)
DATA=(--data cifar10 --data-dir "$SHARED/data/cifar10")
mkdir -p "$OUT"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  mapfile -t names < <("$PY" -c "import json; [print(e['name']) for e in json.load(open('$RESULTS/index.json'))]")
fi
dense="$OUT/dense-resnet20.onnx"
if [ ! -f "$dense" ] && [ "$BENCH" = 1 ]; then  # the dense base: any NENNI point's base with every layer exact
  first_nenni=$("$PY" -c "import json; print(next(e['name'] for e in json.load(open('$RESULTS/index.json')) if e['method'] == 'nenni'))")
  "${NENNI[@]}" export "$RESULTS/$first_nenni" --dense --out "$dense" --data-dir "$SHARED/data/cifar10"
fi
for name in "${names[@]}"; do
  onnx="$OUT/$name.onnx"
  [ -f "$onnx" ] || "${NENNI[@]}" export "$RESULTS/$name" --out "$onnx" --data-dir "$SHARED/data/cifar10" \
    --json "$OUT/$name.export.json"
  "${NENNI[@]}" predict "$onnx" "${DATA[@]}" --threads "$THREADS" --json "$OUT/$name.predict.json" >/dev/null
  if [ "$BENCH" = 1 ]; then
    "${NENNI[@]}" bench "$onnx" --baseline "$dense" --batch 1 --batch 64 --threads "$THREADS" --quiet \
      --json "$OUT/$name.bench.json" --plot "$OUT/$name.bench.png"
  fi
  "$PY" - "$RESULTS/index.json" "$name" "$OUT/$name.predict.json" <<'PY'
import json, sys
index, name, pred = sys.argv[1:]
entry = next(e for e in json.load(open(index)) if e["name"] == name)
p = json.load(open(pred))
acc = p.get("accuracy")
print(f"{name}: index {entry['accuracy']:.2f} %, ONNX Runtime {acc:.2f} % on {p.get('images', p.get('n'))} images")
PY
done
