"""Give frontier points written before model directories kept their dense base (the grid's branch) the checkpoint
they started from: `base.safetensors` and its hash in config.json, so that `nenni export DIR --dense` exports the
original dense model and every export records the dense-base hash `nenni bench` pairs on.

    python benchmarks/frontier_base.py results/frontier/* \
        --weights ../shared/weights/cifar10/akamaster/resnet20-12fca82f.th

Only the base is added: the weights, the layer specs and the measured accuracy stay as they were.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nenni_deploy.files import atomic_output, sha256_file
from nenni_deploy.models import create_model, save_state_dict
from nenni_deploy.nenni.io import BASE_FILE, CONFIG_FILE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--weights", type=Path, required=True, help="the dense checkpoint every point started from")
    args = ap.parse_args()
    for d in (d for d in args.dirs if (d / CONFIG_FILE).is_file()):
        card = json.loads((d / CONFIG_FILE).read_text())
        if card.get("base_weights_sha256"):
            print(f"{d}: has its base")
            continue
        save_state_dict(create_model(card["arch"], weights=args.weights).state_dict(), d / BASE_FILE)
        card["base_weights_sha256"] = sha256_file(d / BASE_FILE)
        card.setdefault("history", []).append({"stage": "base", "weights": args.weights.name})
        with atomic_output(d / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(card, indent=2) + "\n")
        print(f"{d}: base {args.weights.name} ({card['base_weights_sha256'][:12]})")


if __name__ == "__main__":
    main()
