"""int8 and NENNI against dense in ONNX Runtime (issue 15): per model and batch size, one interleaved run of
fp32 dense (the baseline), int8 dense, fp32 NENNI and int8 NENNI, with accuracy on the full test set where the
weights are real, and the issue's targets checked.

  python benchmarks/int8_speed.py --out runs/int8          # ResNet-20/56 (shared), PreAct-18, WRN-34-10 (random)

Per model: `nenni calibrate` (channel granularity, --ratio, k = n/8), `nenni export` four times per batch size
(float and --int8, dense and NENNI; NENNI layers with --channel-lowering auto decided for that batch size),
`nenni predict` on the 10,000 test images (real weights only), and `nenni bench` with the three variants
against the fp32 dense baseline, 2 threads. Writes each step's JSON, `summary.md` and `summary.json`.
Resumable: a step whose output exists is skipped. Time nothing else while it runs (about an hour idle).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _cli import nenni, random_weights  # benchmarks/ is the script's own folder on sys.path

WEIGHTS = {
    "resnet20": "akamaster/resnet20-12fca82f.th",
    "resnet56": "akamaster/resnet56-4bfd9763.th",
}
MODELS = ("resnet20", "resnet56", "preact_resnet18", "wide_resnet34_10")
VARIANTS = ("fp32-dense", "int8-dense", "fp32-nenni", "int8-nenni")
GROUPED = ("fp32-grouped", "int8-grouped")  # --grouped: static-batch exports with the grouped lowering


def export(
    model_dir: Path, out: Path, *, dense: bool, int8: bool, batch: int, args, grouped: bool = False, real: bool = True
) -> Path:
    if not out.exists():
        if grouped:
            extra = ["--channel-lowering", "grouped", "--batch", str(batch)]
        else:
            extra = ["--dense"] if dense else ["--channel-lowering", args.lowering, "--tune-batch", str(batch)]
        # Random weights are for timing only: a few images calibrate and check the graph as well as many would.
        calib_n, check_n = (args.calib_n, args.check_n) if real else (min(args.calib_n, 32), min(args.check_n, 32))
        extra += ["--int8", "--calib-n", str(calib_n), "--calib-method", args.calib_method] if int8 else []
        # Random weights give near-tied logits: int8 rounding flips their top-1 without being wrong, so the
        # parity check (whose agreement bound assumes a trained model) is left to the real checkpoints.
        extra += ["--no-check"] if int8 and not real else []
        nenni("export", model_dir, "--out", out, "--data-dir", args.data_dir, "--check-n", str(check_n),
              "--threads", args.threads, "--json", out.with_suffix(".export.json"), *extra)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--ratio", type=float, default=0.25, help="essential ratio of every channel NENNI layer")
    ap.add_argument("--proj-dim", default="n/8")
    ap.add_argument("--calib-n", type=int, default=256, help="int8 calibration images")
    ap.add_argument("--calib-method", default="minmax")
    ap.add_argument("--fit-n", type=int, default=1024, help="NENNI calibration (fitting) images")
    ap.add_argument("--check-n", type=int, default=256)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--duration", default="4")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--accuracy", default=True, action=argparse.BooleanOptionalAction, help="full test set")
    ap.add_argument("--include", default=None, help="convert only these layers (nenni calibrate --include)")
    ap.add_argument("--lowering", default="auto", help="nenni export --channel-lowering of the NENNI variants")
    ap.add_argument("--grouped", action="store_true", help="also time the static-batch grouped lowering")
    # The exports and accuracies do not need an idle machine; the timing does: prepare under load, time later.
    ap.add_argument("--bench", default=True, action=argparse.BooleanOptionalAction, help="time (else prepare only)")
    ap.add_argument("--out", type=Path, default=Path("runs/int8"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_dir = str(args.shared / "data/cifar10")
    summary = []
    for arch in args.models.split(","):
        real = arch in WEIGHTS
        weights = args.shared / "weights/cifar10" / WEIGHTS[arch] if real else random_weights(arch, args.out)
        tag = f"{arch}-channel-{args.ratio:g}" + (f"-{args.include.replace('*', 'x')}" if args.include else "")
        model_dir = args.out / tag
        if not (model_dir / "config.json").exists():
            include = ["--include", args.include] if args.include else []
            nenni("calibrate", "--arch", arch, "--weights", weights, "--data", "cifar10", "--data-dir", args.data_dir,
                  "--granularity", "channel", "--ratio", args.ratio, "--proj-dim", args.proj_dim, *include,
                  "--calib-n", args.fit_n if real else min(args.fit_n, 128), "--eval-n", "1",
                  "--threads", args.threads, "--out", model_dir)  # fmt: skip
        entry = {"arch": arch, "weights": "shared checkpoint" if real else "random (timing only)", "batches": []}
        for batch in (int(b) for b in args.batches.split(",")):
            files = {
                v: export(
                    model_dir,
                    args.out / f"{tag}-{v}-b{batch}.onnx",
                    dense=v.endswith("dense"),
                    int8=v.startswith("int8"),
                    batch=batch,
                    args=args,
                    grouped=v.endswith("grouped"),
                    real=real,
                )  # fmt: skip
                for v in VARIANTS + (GROUPED if args.grouped else ())
            }
            if real and args.accuracy and batch == int(args.batches.split(",")[0]):
                entry["accuracy"] = {v: accuracy(f, args) for v, f in files.items() if v in VARIANTS}
            if not args.bench:
                continue
            bench_json = args.out / f"{tag}-b{batch}.bench.json"
            if not bench_json.exists():
                models = [f for v, f in files.items() if v != "fp32-dense"]
                timing = ["--batch", batch, "--duration", args.duration, "--threads", args.threads, "--no-progress"]
                nenni("bench", *models, "--baseline", files["fp32-dense"], *timing, "--json", bench_json)
            report = json.loads(bench_json.read_text())
            b = report["batches"][0]
            row = {"batch": batch, "other_load": b["load"]["other_processes_busy_cores"], "variants": {}}
            for v, f in files.items():
                label = "baseline" if v == "fp32-dense" else f.name.removesuffix(".onnx")
                stats, model = b["models"][label], report["models"][label]
                row["variants"][v] = {
                    "mean_ms": stats["mean_ms"],
                    "speedup": None if label == "baseline" else b["speedups"][label],
                    "ideal": None if label == "baseline" else b["ideals"][label],
                    "as_run": model["as_run"],
                }
            entry["batches"].append(row)
        summary.append(entry)
    if not args.bench:
        return
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary) + "\n\n" + targets(summary)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)


def accuracy(path: Path, args) -> float:
    out = path.with_suffix(".predict.json")
    if not out.exists():
        nenni("predict", path, "--data-dir", args.data_dir, "--threads", args.threads, "--json", out)
    return json.loads(out.read_text())["accuracy"]


def markdown(summary: list[dict]) -> str:
    head = ["model", "batch", "variant", "ms", "speedup over fp32 dense (95 % CI)", "MAC-ideal", "BitOPs-ideal",
            "% of MAC-ideal", "accuracy %", "other load"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        for row in e["batches"]:
            for v, d in row["variants"].items():
                sp, ideal = d["speedup"], d["ideal"] or {}
                acc = (e.get("accuracy") or {}).get(v)
                cells = [
                    e["arch"], str(row["batch"]), v, f"{d['mean_ms']:.2f}",
                    "1 (baseline)" if sp is None else f"{sp['speedup']:.2f} ({sp['ci_low']:.2f}-{sp['ci_high']:.2f})",
                    _f(ideal.get("mac_speedup")), _f(ideal.get("bitops_speedup")),
                    _f(ideal.get("fraction_of_mac_ideal") and 100 * ideal["fraction_of_mac_ideal"], ".0f"),
                    "-" if acc is None else f"{acc:.2f}", _f(row["other_load"]),
                ]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def targets(summary: list[dict]) -> str:
    """The issue's targets, each with the measurement that decides it."""
    out = ["Targets (issue 15):"]

    def sp(e, batch, v):
        row = next((r for r in e["batches"] if r["batch"] == batch), None)
        s = row and row["variants"][v]["speedup"]
        return s["speedup"] if s else None

    r56 = next((e for e in summary if e["arch"] == "resnet56"), None)
    if r56:
        s64, s1 = sp(r56, 64, "int8-dense"), sp(r56, 1, "int8-dense")
        acc = r56.get("accuracy") or {}
        drop = acc["fp32-dense"] - acc["int8-dense"] if acc else None
        ok = s64 is not None and s1 is not None and s64 >= 2 and s1 >= 1.5 and drop is not None and drop <= 0.5
        out.append(f"- int8 dense ResNet-56 >= 2x at batch 64 ({_f(s64)}x), >= 1.5x at batch 1 ({_f(s1)}x), within "
                   f"0.5 point ({_f(drop)} points): {'met' if ok else 'NOT met'}")  # fmt: skip
    wins = [
        (e["arch"], r["batch"], v, d["speedup"]["speedup"])
        for e in summary
        for r in e["batches"]
        for v, d in r["variants"].items()
        if v not in ("fp32-dense", "int8-dense") and d["speedup"]["speedup"] > 1
    ]
    out.append("- a NENNI export faster than fp32 dense: " + (", ".join(f"{a} b{b} {v} {s:.2f}x" for a, b, v, s in wins)
               if wins else "NOT met"))  # fmt: skip
    int8_wins = []
    for e in summary:
        for r in e["batches"]:
            d = r["variants"]["int8-dense"]["mean_ms"]
            for v in ("int8-nenni", "int8-grouped"):
                n = r["variants"].get(v, {}).get("mean_ms")
                if n and n < d:
                    int8_wins.append(f"{e['arch']} b{r['batch']} {v} {d / n:.2f}x")
    out.append("- int8 NENNI faster than int8 dense: " + (", ".join(int8_wins) if int8_wins else "NOT met"))
    for e in summary:
        acc = e.get("accuracy")
        if acc:
            drop = acc["fp32-nenni"] - acc["int8-nenni"]
            out.append(f"- {e['arch']}: int8 NENNI {acc['int8-nenni']:.2f} % vs fp32 NENNI {acc['fp32-nenni']:.2f} % "
                       f"({drop:+.2f} points): {'within' if abs(drop) <= 0.5 else 'NOT within'} 0.5 point")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
