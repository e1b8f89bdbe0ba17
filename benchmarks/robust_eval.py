"""Clean and PGD-20 accuracy (Linf 8/255, step 2/255, one random start) on the first N CIFAR-10 test images.

A stand-in until `nenni eval` lands: the same attack class, a smaller sample. NENNI models are attacked through
their own forward pass and with BPDA through the exact layers; the worse of the two is their robust accuracy
(per image: an image counts as robust only if both attacks fail).
Usage: .venv/bin/python benchmarks/robust_eval.py --data-dir DIR --n 1000 --model NAME=WEIGHTS --nenni NAME=DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext

import torch

from nenni_deploy.attacks import PGD, straight_through
from nenni_deploy.data import load_dataset
from nenni_deploy.metrics import accuracy
from nenni_deploy.models import create_model
from nenni_deploy.nenni.io import load_nenni_model


def robust_correct(model, x, y, attack: PGD, batch_size: int, via: str | None) -> torch.Tensor:
    """Per image: still classified correctly after the attack (kept for paired comparisons of models)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with straight_through(model, via) if via else nullcontext():
            adv = attack.perturb(model, xb, yb)
        with torch.no_grad():
            out.append(model(adv).argmax(1) == yb)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--model", action="append", default=[], help="NAME=WEIGHTS of a resnet20")
    ap.add_argument("--nenni", action="append", default=[], help="NAME=NENNI model directory")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    test = load_dataset(args.data, "test", args.data_dir)
    x, y = test.x[: args.n], test.y[: args.n]
    attack = PGD(eps=8 / 255, steps=20, alpha=2 / 255, seed=0)
    results = {}
    entries = [(s.split("=", 1), False) for s in args.model] + [(s.split("=", 1), True) for s in args.nenni]
    for (name, path), is_nenni in entries:
        start = time.perf_counter()
        model = load_nenni_model(path)[0] if is_nenni else create_model("resnet20", weights=path)
        row = {"path": path, "n": len(x), "clean": accuracy(model, x, y, args.batch_size)}
        robust = robust_correct(model, x, y, attack, args.batch_size, None)
        row["pgd20"] = 100 * float(robust.float().mean())
        if is_nenni:
            bpda = robust_correct(model, x, y, attack, args.batch_size, "exact")
            row["pgd20_bpda_exact"] = 100 * float(bpda.float().mean())
            robust = robust & bpda  # per image, the worse of the two attacks
            row["pgd20_worst"] = 100 * float(robust.float().mean())
        row["robust_indices"] = robust.nonzero().flatten().tolist()
        row["seconds"] = time.perf_counter() - start
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "robust_indices"}), flush=True)
    out = {"attack": attack.to_dict(), "images": len(x), "load_average": os.getloadavg(), "models": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
