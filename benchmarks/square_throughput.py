"""Square's query loop against the bare ONNX Runtime session: is the attack dominated by Python overhead?

Runs Square on N images of CIFAR-10 (or digits), records the batch of every query round and the time spent inside
`session.run`, then replays exactly that sequence of batch sizes through the same session with nothing else around
it. Reports images per second for both, and the share of Square's wall time inside the session (measured in the
same time window, so it is the figure to trust on a loaded machine).

    python benchmarks/square_throughput.py --onnx resnet20.onnx --data-dir ../shared/data/cifar10 --n 100
    python benchmarks/square_throughput.py --arch resnet20 --weights WEIGHTS --queries 5000

Without --onnx it exports --arch/--weights with plain torch.onnx first. Run it on an idle machine: a second
process on the cores changes both numbers, and the ratio less than either.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def export(arch: str, weights: str, out: Path) -> Path:
    from nenni_deploy.models import create_model, model_info

    model = create_model(arch, weights=weights)
    shape = model_info(arch).input_shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.rand(1, *shape),), str(out), input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False,
        )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, default=None)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--weights", default="../shared/weights/cifar10/akamaster/resnet20-12fca82f.th")
    parser.add_argument("--data", default="cifar10", choices=["digits", "cifar10"])
    parser.add_argument("--data-dir", default=os.environ.get("NENNI_DATA_DIR", "../shared/data/cifar10"))
    parser.add_argument("--n", type=int, default=100, help="images attacked at once (the largest round batch)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from nenni_deploy.attacks.square import Square
    from nenni_deploy.data import load_dataset
    from nenni_deploy.runtime.classifier import OnnxClassifier

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data, "test", args.data_dir if args.data == "cifar10" else None)
    x, y = ds.x[: args.n], ds.y[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx or export(args.arch, args.weights, Path(tmp) / "model.onnx")
        with OnnxClassifier(path, threads=args.threads, batch_size=max(args.n, 1)) as clf:
            clf.bind(x, ds.num_classes)
            batches: list[int] = []
            inside = [0.0]  # seconds inside session.run during the attack: measured in the same time window
            run_once = clf._run_once

            def timed(feed):
                t0 = time.perf_counter()
                try:
                    return run_once(feed)
                finally:
                    inside[0] += time.perf_counter() - t0

            clf._run_once = timed

            def scores(t: torch.Tensor) -> torch.Tensor:
                batches.append(len(t))
                return torch.from_numpy(clf.scores(t))

            start = time.perf_counter()
            result = Square(args.eps, norm=args.norm, queries=args.queries).perturb(scores, x, y)
            square_s = time.perf_counter() - start
            clf._run_once = run_once

            # The same batch sizes, in the same order, through the bare session.
            feed = {clf.spec.input_name: clf._feed(x.numpy())}
            session, output = clf.ort.session, clf.spec.output_name
            start = time.perf_counter()
            for b in batches:
                session.run([output], {k: v[:b] for k, v in feed.items()})
            plain_s = time.perf_counter() - start
            fixed = {}
            for b in sorted({1, 10, args.n}):
                part = {k: v[:b] for k, v in feed.items()}
                session.run([output], part)
                t0, done = time.perf_counter(), 0
                while time.perf_counter() - t0 < 1.0:
                    session.run([output], part)
                    done += b
                fixed[str(b)] = done / (time.perf_counter() - t0)
    images = int(sum(batches))
    report = {
        "model": str(args.onnx or f"{args.arch} ({Path(args.weights).name})"),
        "images_attacked": len(x),
        "queries_budget": args.queries,
        "eps": args.eps,
        "norm": args.norm,
        "threads": args.threads,
        "rounds": len(batches),
        "images_scored": images,
        "robust_accuracy": float((~result.fooled).float().mean() * 100),
        "square_seconds": square_s,
        "session_seconds_same_batches": plain_s,
        "square_images_per_s": images / square_s,
        "session_images_per_s_same_batches": images / plain_s,
        "overhead_share": 1 - plain_s / square_s,
        "session_share_during_square": inside[0] / square_s,
        "session_images_per_s_fixed_batch": fixed,
        "load_average": os.getloadavg(),
    }
    print(
        f"Square: {images} images scored in {len(batches)} rounds, {square_s:.1f} s = {images / square_s:.0f} img/s; "
        f"the bare session on the same batches: {plain_s:.1f} s = {images / plain_s:.0f} img/s; "
        f"{report['overhead_share'] * 100:.1f} % of Square's time outside the session"
    )
    print(f"measured inside the attack: {inside[0] / square_s * 100:.1f} % of its wall time in session.run")
    print("bare session at a fixed batch (img/s): " + ", ".join(f"{b}: {v:.0f}" for b, v in fixed.items()))
    print(f"load average during the run: {', '.join(f'{v:.2f}' for v in report['load_average'])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
