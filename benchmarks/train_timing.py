"""Seconds per training epoch of ResNet-20 on CIFAR-10 for every method, measured back to back in one process.

Each method runs STEPS optimiser steps of the real loop (augmentation, attack, SGD) from the same weights,
on one thread; seconds per epoch = measured seconds per step x the steps of a full epoch (45,000 training
images at --val-split 0.1, batch 128 -> 351 steps). Other jobs share the CPU, so compare the ratios.
Usage: .venv/bin/python benchmarks/train_timing.py --data-dir ../shared/data/cifar10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from nenni_deploy.data import load_dataset
from nenni_deploy.models import create_model
from nenni_deploy.training import TrainConfig, make_method, steps_per_epoch, train
from nenni_deploy.training.methods import default_slim_layers

# (label, method name, SLIM, steps timed): fewer timed steps for the 10-step attacks, which cost ~11x.
CASES = [
    ("standard", "standard", False, 12),
    ("fast", "fast", False, 8),
    ("fast+slim", "fast", True, 8),
    ("pgd-10", "pgd", False, 3),
    ("pgd-10+slim", "pgd", True, 3),
    ("trades-10", "trades", False, 3),
    ("mart-10", "mart", False, 3),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--scale", type=float, default=1.0, help="Multiply every case's timed steps.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("cifar10", "train", args.data_dir)
    full_epoch = steps_per_epoch(45_000, TrainConfig(batch_size=128))
    rows = []
    with tempfile.TemporaryDirectory() as run:  # untimed warm-up: first-call allocations and kernel choices
        warm = TrainConfig(epochs=1, batch_size=128, lr=0.01, max_steps_per_epoch=2, val_split=0.1, threads=1)
        train(create_model("resnet20"), data.x, data.y, warm, run, progress=False, curves=False)
    for label, name, slim, steps in CASES:
        steps = max(1, round(steps * args.scale))
        model = create_model("resnet20", weights=args.weights)
        layers = default_slim_layers(model) if slim else []
        method = make_method(name, eps=8 / 255, slim_layers=layers)
        cfg = TrainConfig(epochs=1, batch_size=128, lr=0.01, max_steps_per_epoch=steps, val_split=0.1, threads=1)
        with tempfile.TemporaryDirectory() as run:
            start = time.perf_counter()
            # val_split only sets the training set; no evaluation is timed (records' "seconds" is the epoch)
            result = train(model, data.x, data.y, cfg, run, method=method, progress=False, curves=False)
            wall = time.perf_counter() - start
        per_step = result.history[0]["seconds"] / steps
        rows.append(
            {
                "method": label,
                "steps_timed": steps,
                "seconds_per_step": per_step,
                "seconds_per_epoch": per_step * full_epoch,
                "wall_seconds": wall,
            }
        )
        print(f"{label:12s} {per_step:7.3f} s/step  {per_step * full_epoch:8.0f} s/epoch ({steps} steps)", flush=True)
    base = rows[0]["seconds_per_step"]
    for r in rows:
        r["ratio_to_standard"] = r["seconds_per_step"] / base
    out = {"steps_per_epoch": full_epoch, "load_average": os.getloadavg(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out["load_average"]))


if __name__ == "__main__":
    main()
