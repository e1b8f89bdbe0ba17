"""Publish one finished frontier point: copy its model directory (without the training subfolder) to
results/frontier/NAME and add or replace its entry in results/frontier/index.json.

    python benchmarks/frontier_index.py RUN_DIR NAME --method nenni|pruning --budget-metric macs|bitops --budget 0.7

The accuracy is the one the run measured on the full test set (it refuses fewer than 10,000 images unless
--allow-partial); the MAC and BitOPs ratios come from nenni/cost.py on the saved model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("name")
    ap.add_argument("--method", choices=["nenni", "pruning"], required=True)
    ap.add_argument("--budget-metric", choices=["macs", "bitops"], required=True)
    ap.add_argument("--budget", type=float, required=True)
    ap.add_argument("--results", type=Path, default=Path("results/frontier"))
    ap.add_argument("--recipe", default="")
    ap.add_argument("--epochs", type=int, default=None, help="Epochs in all (default: the last stage's)")
    ap.add_argument("--allow-partial", action="store_true")
    args = ap.parse_args(argv)

    from nenni_deploy.nenni.cost import cost_report
    from nenni_deploy.nenni.model import open_model_dir

    model = open_model_dir(args.run_dir)
    card, metrics = model.card, model.card.get("metrics", {})
    totals = cost_report(model.module, model.input_shape)["totals"]
    if args.method == "nenni":
        accuracy = metrics["nenni_accuracy"]
        macs_ratio = totals["macs_nenni"] / totals["macs_dense"]
        bitops_ratio = totals["bitops_nenni"] / totals["bitops_dense"]
        granularity = card["nenni"]["granularity"]
        history = card.get("history", [])[-1]
        epochs = history.get("epochs")
    else:
        dense_totals = cost_report(model.source.build(), model.input_shape)["totals"]
        pruning = metrics.get("pruning") or card.get("pruning", {})
        accuracy = metrics["accuracy"]
        macs_ratio = totals["macs_dense"] / dense_totals["macs_dense"]
        bitops_ratio = totals["bitops_dense"] / dense_totals["bitops_dense"]
        rounded = f", widths multiple of {pruning['round_to']}" if pruning.get("round_to") else ""
        granularity = f"channel (static, {pruning.get('importance', 'l1')}, {pruning['mode']}{rounded})"
        epochs = card.get("history", [{}])[-1].get("epochs")
    if metrics.get("eval_images") != 10000 and not args.allow_partial:
        print(
            f"{args.run_dir}: accuracy on {metrics.get('eval_images')} images, not the full test set", file=sys.stderr
        )
        return 1
    dest = args.results / args.name
    tmp = args.results / f".{args.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.run_dir, tmp, ignore=shutil.ignore_patterns("train", ".*"))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    index_path = args.results / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else []
    entry = {
        "name": args.name,
        "method": args.method,
        "architecture": card["arch"],
        "granularity": granularity,
        "budget": args.budget,
        "budget_metric": args.budget_metric,
        "macs_ratio": round(macs_ratio, 4),
        "bitops_ratio": round(bitops_ratio, 4),
        "accuracy": round(float(accuracy), 2),
        "eval_images": metrics.get("eval_images"),
        "epochs": args.epochs or epochs,
        "recipe": args.recipe,
    }
    index = [e for e in index if e.get("name") != args.name] + [entry]
    index.sort(key=lambda e: (e["architecture"], e["method"], e["macs_ratio"]))
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
