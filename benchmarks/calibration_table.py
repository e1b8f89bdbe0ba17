"""Calibration-only accuracy and cost of NENNI on the shared CIFAR-10 ResNets (issue 2's table).

Usage: python benchmarks/calibration_table.py --shared ../shared --out runs/calibration [--archs resnet20,resnet56]
Runs `nenni calibrate` for every (arch, granularity, ratio), keeps each JSON summary, and writes table.md.
Resumable: settings whose JSON already exists are not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WEIGHTS = {
    "resnet20": "akamaster/resnet20-12fca82f.th",
    "resnet32": "akamaster/resnet32-d509ac18.th",
    "resnet44": "akamaster/resnet44-014dd654.th",
    "resnet56": "akamaster/resnet56-4bfd9763.th",
    "resnet4b": "abcrown/resnet4b.pth",
}
# (granularity, ratio, extra flags): N:M over groups of 8 gives the same essential ratios as the others.
SETTINGS = [
    *(("element", r, []) for r in (0.1, 0.25, 0.5)),
    *(("nm", n / 8, ["--nm", f"{n}:8"]) for n in (1, 2, 4)),
    *(("channel", r, []) for r in (0.1, 0.25, 0.5)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--out", type=Path, default=Path("runs/calibration"))
    ap.add_argument("--archs", default="resnet20,resnet56")
    ap.add_argument("--proj-dim", default="n/4")
    ap.add_argument("--eval-n", type=int, default=10000)
    ap.add_argument("--calib-n", type=int, default=2048)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in args.archs.split(","):
        for gran, ratio, extra in SETTINGS:
            tag = f"{arch}-{gran}-{ratio:g}-k{args.proj_dim.replace('/', '_')}"
            js = args.out / f"{tag}.json"
            if not js.exists():
                cmd = [
                    sys.executable,
                    "-m",
                    "nenni_deploy.cli",
                    "calibrate",
                    "--arch",
                    arch,
                    "--weights",
                    str(args.shared / "weights/cifar10" / WEIGHTS[arch]),
                    "--data",
                    "cifar10",
                    "--data-dir",
                    str(args.shared / "data/cifar10"),
                    "--granularity",
                    gran,
                    "--ratio",
                    str(ratio),
                    "--proj-dim",
                    args.proj_dim,
                    "--eval-n",
                    str(args.eval_n),
                    "--calib-n",
                    str(args.calib_n),
                    "--out",
                    str(args.out / tag),
                    "--json",
                    str(js),
                    "--threads",
                    "2",
                    *extra,
                ]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            s = json.loads(js.read_text())
            t = s["cost"]["totals"]
            label = f"nm {s['config']['nm']}" if gran == "nm" else gran
            rows.append(
                [
                    arch,
                    label,
                    ratio,
                    args.proj_dim,
                    f"{s['dense_accuracy']:.2f}",
                    f"{s['nenni_accuracy']:.2f}",
                    f"{t['mac_reduction'] * 100:.1f}",
                    f"{t['bitops_reduction'] * 100:.1f}",
                    f"{s['fit_seconds']:.1f}",
                    s["eval_images"],
                ]
            )
    head = ["model", "granularity", "ratio", "k", "dense %", "NENNI %", "MACs -%", "BitOPs -%", "fit s", "test images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
