"""Essential ratio vs measured ONNX Runtime speedup vs accuracy (issue 4's curve), and the README's speed table.

Usage:
  python benchmarks/speedup_curve.py --arch resnet56 --ratios 0.1,0.25,0.5,0.75 --out runs/curve-r56
  python benchmarks/speedup_curve.py --arch preact_resnet18 --random-weights --ratios 0.25,0.5 --eval-n 0 ...

For every ratio: `nenni calibrate` (channel granularity), `nenni export`, and `nenni bench` against the dense
export of the same weights, interleaved in one run. Writes each step's JSON, `curve.md` (table) and
`curve.png` (suffixed with the lowering). Resumable: a step whose JSON exists is not run again.
Time nothing else while it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _cli import nenni, random_weights  # benchmarks/ is the script's own folder on sys.path

WEIGHTS = {
    "resnet20": "akamaster/resnet20-12fca82f.th",
    "resnet56": "akamaster/resnet56-4bfd9763.th",
    "resnet4b": "abcrown/resnet4b.pth",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--random-weights", action="store_true", help="time a seeded random initialisation")
    ap.add_argument("--ratios", default="0.1,0.25,0.5,0.75")
    ap.add_argument("--proj-dim", default="n/8")
    ap.add_argument("--calib-n", type=int, default=1024)
    ap.add_argument("--eval-n", type=int, default=1000, help="test images for accuracy (0: skip accuracy)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--duration", default="4")
    ap.add_argument("--threads", default="2")
    ap.add_argument(
        "--lowering", default="skip", choices=["skip", "masked", "auto", "tune"], help="nenni export --channel-lowering"
    )
    ap.add_argument("--tune-batch", default="64")
    ap.add_argument("--out", type=Path, default=Path("runs/curve"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    weights = (
        random_weights(args.arch, args.out)
        if args.random_weights
        else args.shared / "weights/cifar10" / WEIGHTS[args.arch]
    )
    data_dir = str(args.shared / "data/cifar10")
    batches = [x for b in args.batches.split(",") for x in ("--batch", b)]
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    dense_onnx = args.out / f"{args.arch}-dense.onnx"
    for ratio in ratios:
        tag = f"{args.arch}-channel-{ratio:g}"
        model_dir, onnx_path = args.out / tag, args.out / f"{tag}-{args.lowering}.onnx"
        cal_json, bench_json = args.out / f"{tag}.calibrate.json", args.out / f"{tag}-{args.lowering}.bench.json"
        eval_n = ["--eval-n", str(args.eval_n)] if args.eval_n else ["--eval-n", "1"]
        if not cal_json.exists():
            nenni(
                "calibrate",
                "--arch",
                args.arch,
                "--weights",
                str(weights),
                "--data",
                "cifar10",
                "--data-dir",
                data_dir,
                "--granularity",
                "channel",
                "--ratio",
                str(ratio),
                "--proj-dim",
                args.proj_dim,
                "--calib-n",
                str(args.calib_n),
                *eval_n,
                "--out",
                str(model_dir),
                "--json",
                str(cal_json),
            )
        if not onnx_path.exists():
            nenni(
                "export",
                str(model_dir),
                "--out",
                str(onnx_path),
                "--check-n",
                "32",
                "--data-dir",
                data_dir,
                "--channel-lowering",
                args.lowering,
                "--tune-batch",
                args.tune_batch,
                "--tune-threads",
                args.threads,
            )
        if not dense_onnx.exists():
            nenni(
                "export", str(model_dir), "--dense", "--out", str(dense_onnx), "--check-n", "32", "--data-dir", data_dir
            )
        if not bench_json.exists():
            nenni(
                "bench",
                str(onnx_path),
                "--baseline",
                str(dense_onnx),
                *batches,
                "--duration",
                args.duration,
                "--threads",
                args.threads,
                "--no-progress",
                "--json",
                str(bench_json),
            )
        cal, bench = json.loads(cal_json.read_text()), json.loads(bench_json.read_text())
        row = {
            "ratio": ratio,
            "dense_acc": cal["dense_accuracy"] if args.eval_n else None,
            "nenni_acc": cal["nenni_accuracy"] if args.eval_n else None,
            "mac_reduction": 1 - cal["macs_nenni"] / cal["macs_dense"],
            "mac_ideal": bench["ideal"]["mac"],
        }
        for b in bench["batches"]:
            row[f"speedup_b{b['batch']}"] = b["speedup"]["speedup"]
            row[f"ci_b{b['batch']}"] = (b["speedup"]["ci_low"], b["speedup"]["ci_high"])
            row[f"load_b{b['batch']}"] = b["load"]["other_processes_busy_cores"]
        rows.append(row)
    write_table(rows, args)
    plot(rows, args)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}" if v <= 1 else f"{v:.2f}"


def write_table(rows: list[dict], args) -> None:
    bs = args.batches.split(",")
    head = ["ratio", "dense %", "NENNI %", "MACs -%", "MAC-ideal"]
    for b in bs:
        head += [f"speedup b{b} (95 % CI)", f"other load b{b}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{r['ratio']:g}",
            _acc(r["dense_acc"]),
            _acc(r["nenni_acc"]),
            f"{100 * r['mac_reduction']:.1f}",
            f"{r['mac_ideal']:.2f}",
        ]
        for b in bs:
            lo, hi = r[f"ci_b{b}"]
            cells += [f"{r[f'speedup_b{b}']:.3f} ({lo:.3f}-{hi:.3f})", f"{r[f'load_b{b}']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / f"curve-{args.lowering}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _acc(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def plot(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ratios = [r["ratio"] for r in rows]
    for b in args.batches.split(","):
        sp = [r[f"speedup_b{b}"] for r in rows]
        err = [
            [s - r[f"ci_b{b}"][0] for s, r in zip(sp, rows, strict=True)],
            [r[f"ci_b{b}"][1] - s for s, r in zip(sp, rows, strict=True)],
        ]
        ax.errorbar(ratios, sp, yerr=err, marker="o", capsize=3, label=f"measured, batch {b}")
    ax.plot(ratios, [r["mac_ideal"] for r in rows], "k--", label="MAC-ideal")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("essential ratio (channel)")
    ax.set_ylabel("speedup over dense (ORT CPU)")
    if rows and rows[0]["nenni_acc"] is not None:
        ax2 = ax.twinx()
        ax2.plot(ratios, [r["nenni_acc"] for r in rows], "g:s", label="NENNI accuracy")
        ax2.axhline(rows[0]["dense_acc"], color="g", linewidth=0.8, label="dense accuracy")
        ax2.set_ylabel("accuracy % (calibration only)")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{args.arch}: essential ratio vs speedup ({args.lowering} lowering)")
    fig.tight_layout()
    fig.savefig(args.out / f"curve-{args.lowering}.png", dpi=120)


if __name__ == "__main__":
    main()
