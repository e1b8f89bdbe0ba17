#!/usr/bin/env bash
# Channel lowerings of one NENNI model vs its dense export, each in its own interleaved `nenni bench` run
# (issue 4's variant table). Usage: bash benchmarks/lowering_table.sh [ARCH] [RATIO] [OUT]
# Time nothing else while it runs; the JSONs record the machine's other load.
set -euo pipefail
ARCH=${1:-resnet20}
RATIO=${2:-0.3}
OUT=${3:-runs/lowerings-$ARCH}
SHARED=${NENNI_SHARED:-../shared}
declare -A WEIGHTS=([resnet20]=akamaster/resnet20-12fca82f.th [resnet56]=akamaster/resnet56-4bfd9763.th)
NENNI=${NENNI:-.venv/bin/nenni}
mkdir -p "$OUT"
DIR="$OUT/$ARCH-channel-$RATIO"
[ -d "$DIR" ] || $NENNI calibrate --arch "$ARCH" --weights "$SHARED/weights/cifar10/${WEIGHTS[$ARCH]}" --data cifar10 \
    --data-dir "$SHARED/data/cifar10" --granularity channel --ratio "$RATIO" --proj-dim n/8 --calib-n 1024 \
    --eval-n 1000 --out "$DIR" --json "$DIR.calibrate.json"
[ -f "$OUT/dense.onnx" ] || $NENNI export "$DIR" --dense --out "$OUT/dense.onnx" --check-n 32 --data-dir "$SHARED/data/cifar10"
for LOWERING in skip masked auto tune; do
    [ -f "$OUT/$LOWERING.onnx" ] || $NENNI export "$DIR" --out "$OUT/$LOWERING.onnx" --check-n 32 \
        --data-dir "$SHARED/data/cifar10" --channel-lowering "$LOWERING" --tune-batch 64 --tune-threads 2
    [ -f "$OUT/$LOWERING.bench.json" ] || $NENNI bench "$OUT/$LOWERING.onnx" --baseline "$OUT/dense.onnx" \
        --batch 1 --batch 64 --duration 4 --threads 2 --profile --no-progress --json "$OUT/$LOWERING.bench.json" \
        --plot "$OUT/$LOWERING.bench.png"
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| lowering | batch | NENNI ms | dense ms | speedup (95 % CI) | MAC-ideal | % of ideal | other load (cores) |")
print("|---|---|---|---|---|---|---|---|")
for low in ("skip", "masked", "auto", "tune"):
    r = json.loads((out / f"{low}.bench.json").read_text())
    for b in r["batches"]:
        m, d, s = b["models"]["model"], b["models"]["baseline"], b["speedup"]
        print(f"| {low} | {b['batch']} | {m['mean_ms']:.2f} | {d['mean_ms']:.2f} | {s['speedup']:.3f} "
              f"({s['ci_low']:.3f}-{s['ci_high']:.3f}) | {b['ideal']['mac_speedup']:.2f} | "
              f"{100 * b['ideal']['fraction_of_mac_ideal']:.0f} | {b['load']['other_processes_busy_cores']:.2f} |")
PY
