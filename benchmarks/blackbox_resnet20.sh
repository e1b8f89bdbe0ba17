#!/usr/bin/env bash
# The black-box evaluation against white-box AutoAttack (issue 16's target), on the shared standard ResNet-20:
#   1. export it with plain torch.onnx (no nenni metadata: the evaluation knows nothing but the file),
#   2. `nenni eval resnet20.onnx` alone: transfer from ResNet-32/44/56 and their ensemble, Square with 5,000 queries,
#   3. `nenni eval resnet20 --weights ...`: AutoAttack standard on the PyTorch source,
#   4. the two worst cases side by side.
# Hours on two busy cores; both evals cache per chunk beside their JSON, so a rerun resumes.
#   NENNI_SHARED=../shared bash benchmarks/blackbox_resnet20.sh [OUT] [N]
set -euo pipefail
SHARED=${NENNI_SHARED:-../shared}
OUT=${1:-runs/blackbox-resnet20}
N=${2:-500}
PY=${PYTHON:-python}
W=$SHARED/weights/cifar10/akamaster
DATA=$SHARED/data/cifar10
mkdir -p "$OUT"

if [ ! -f "$OUT/resnet20.onnx" ]; then
  "$PY" - "$W/resnet20-12fca82f.th" "$OUT/resnet20.onnx" <<'EOF'
import sys, torch
from nenni_deploy.models import create_model
model = create_model("resnet20", weights=sys.argv[1])
batch = torch.export.Dim("batch", min=1, max=4096)
# torch.onnx.export's defaults (the dynamo exporter, weights in resnet20.onnx.data), a dynamic batch axis.
torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), sys.argv[2], dynamic_shapes=({0: batch},))
EOF
fi

"$PY" -m nenni_deploy.cli eval "$OUT/resnet20.onnx" --data cifar10 --data-dir "$DATA" --n "$N" --eps 8/255 \
  --surrogate "resnet32=$W/resnet32-d509ac18.th,resnet44=$W/resnet44-014dd654.th,resnet56=$W/resnet56-4bfd9763.th" \
  --queries 5000 --threads 2 --no-progress --json "$OUT/blackbox.json" --save-adv "$OUT/blackbox-adv.npz"

"$PY" -m nenni_deploy.cli eval resnet20 --weights "$W/resnet20-12fca82f.th" --data cifar10 --data-dir "$DATA" \
  --n "$N" --eps 8/255 --attack autoattack --threads 2 --no-progress --json "$OUT/whitebox.json"

"$PY" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
black, white = (json.load(open(f"{out}/{n}.json")) for n in ("blackbox", "whitebox"))
for name, r in (("black box (ONNX file only)", black), ("white box (AutoAttack on PyTorch)", white)):
    e = r["eps"][0]
    print(f"{name}: clean {r['clean_accuracy']:.1f} %, worst case {r['worst_case'][e]:.1f} % "
          f"({r['worst_case_attack'][e]}), per image {r['worst_case_per_image'][e]:.1f} %, {r['seconds'] / 60:.0f} min")
    for a, v in r["attacks"].items():
        q = (v.get("queries") or {}).get(e)
        extra = f", median {q['median_queries_broken']} queries" if q else ""
        print(f"  {a}: {v['accuracy'][e]:.1f} %{extra}")
EOF
