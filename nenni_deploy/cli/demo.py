"""`nenni demo`: the whole pipeline on the embedded default data set (scikit-learn digits), no download.

Each stage is the real command a user would type, run in sequence, so the demo exercises the same code paths;
a report folder collects their JSON summaries into one Markdown page.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .options import write_json_atomic
from .tables import format_table


def _run(args: list[str]) -> None:
    from . import main

    click.secho("$ nenni " + " ".join(args), fg="cyan")
    main.main(args=args, prog_name="nenni", standalone_mode=False)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


@click.command(name="demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--epochs", type=click.IntRange(1, 1000), default=20, show_default=True, help="Dense training epochs.")
@click.option("--finetune-epochs", type=click.IntRange(1, 1000), default=30, show_default=True)
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True)
def command(out: Path, epochs: int, finetune_epochs: int, ratio: float, threads: int) -> None:
    """Train a small CNN on digits, convert it to NENNI, fine-tune, export, check, and write a report."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    t = ["--threads", str(threads)]
    dense_dir, cal_dir, nenni_dir = out / "dense", out / "nenni-calibrated", out / "nenni"
    _run(
        [
            "train",
            "--arch",
            "small_cnn",
            "--data",
            "digits",
            "--epochs",
            str(epochs),
            "--lr",
            "0.05",
            "--batch-size",
            "64",
            "--out",
            str(dense_dir),
            "--json",
            str(out / "train.json"),
            "--no-progress",
            *t,
        ]
    )
    _run(
        [
            "calibrate",
            "--arch",
            "small_cnn",
            "--weights",
            str(dense_dir / "model.safetensors"),
            "--data",
            "digits",
            "--granularity",
            "channel",
            "--ratio",
            str(ratio),
            "--proj-dim",
            "n/4",
            "--calib-n",
            "1024",
            "--out",
            str(cal_dir),
            "--json",
            str(out / "calibrate.json"),
            *t,
        ]
    )
    _run(
        [
            "finetune",
            str(cal_dir),
            "--data",
            "digits",
            "--epochs",
            str(finetune_epochs),
            "--lr",
            "0.01",
            "--batch-size",
            "64",
            "--out",
            str(nenni_dir),
            "--json",
            str(out / "finetune.json"),
            "--no-progress",
            *t,
        ]
    )
    _export_stage(out, nenni_dir, cal_dir, threads)
    _run(["info", str(nenni_dir)])
    summary = _summarise(out, time.perf_counter() - start)
    write_json_atomic(out / "summary.json", summary)
    (out / "report.md").write_text(_report(summary))
    click.echo("")
    click.secho(f"report: {out / 'report.md'}", bold=True)
    for line in summary["headline"]:
        click.echo("  " + line)


def _export_stage(out: Path, nenni_dir: Path, cal_dir: Path, threads: int) -> None:
    """Export both models and check parity.

    The dense baseline comes from the calibrated directory, whose base weights are still the trained dense
    model's; fine-tuning moves the base weights to serve the masked network.
    """
    t = ["--threads", str(threads)]
    _run(["export", str(nenni_dir), "--out", str(out / "nenni.onnx")])
    _run(["export", str(cal_dir), "--dense", "--out", str(out / "dense.onnx")])
    _run(["check", str(nenni_dir), str(out / "nenni.onnx"), "--data", "digits", "--json", str(out / "check.json")])
    _run(["predict", str(out / "nenni.onnx"), "--data", "digits", "--json", str(out / "predict-nenni.json"), *t])
    _run(["predict", str(out / "dense.onnx"), "--data", "digits", "--json", str(out / "predict-dense.json"), *t])


def _summarise(out: Path, seconds: float) -> dict:
    tr, cal, ft = _load(out / "train.json"), _load(out / "calibrate.json"), _load(out / "finetune.json")
    totals = cal["cost"]["totals"]
    summary = {
        "dense_accuracy": tr["test_accuracy"],
        "nenni_calibrated_accuracy": cal["nenni_accuracy"],
        "nenni_finetuned_accuracy": ft["nenni_accuracy_after"],
        "base_after_finetune_accuracy": ft["exact_accuracy_after"],
        "macs_dense": totals["macs_dense"],
        "macs_nenni": totals["macs_nenni"],
        "mac_reduction": totals["mac_reduction"],
        "bitops_reduction": totals["bitops_reduction"],
        "config": cal["config"],
        "seconds": seconds,
    }
    summary["onnx"] = {
        "check": _load(out / "check.json"),
        "nenni_accuracy": _load(out / "predict-nenni.json").get("accuracy"),
        "dense_accuracy": _load(out / "predict-dense.json").get("accuracy"),
    }
    summary["headline"] = [
        f"dense small CNN on digits: {summary['dense_accuracy']:.2f} %",
        f"NENNI channel {cal['config']['ratio']}: {summary['nenni_calibrated_accuracy']:.2f} % calibrated, "
        f"{summary['nenni_finetuned_accuracy']:.2f} % fine-tuned",
        f"MACs {totals['mac_reduction'] * 100:.1f} % fewer, BitOPs {totals['bitops_reduction'] * 100:.1f} % fewer",
        f"total time {seconds:.0f} s",
    ]
    return summary


def _report(s: dict) -> str:
    rows = [
        ["dense (trained here)", f"{s['dense_accuracy']:.2f}", f"{s['macs_dense']:,}"],
        ["NENNI, calibrated only", f"{s['nenni_calibrated_accuracy']:.2f}", f"{s['macs_nenni']:,}"],
        ["NENNI, fine-tuned", f"{s['nenni_finetuned_accuracy']:.2f}", f"{s['macs_nenni']:,}"],
        [
            "base weights after fine-tuning, all exact",
            f"{s['base_after_finetune_accuracy']:.2f}",
            f"{s['macs_dense']:,}",
        ],
    ]
    rows.append(["NENNI in ONNX Runtime", f"{s['onnx']['nenni_accuracy']:.2f}", f"{s['macs_nenni']:,}"])
    rows.append(["dense in ONNX Runtime", f"{s['onnx']['dense_accuracy']:.2f}", f"{s['macs_dense']:,}"])
    lines = [
        "# nenni demo report (scikit-learn digits)",
        "",
        format_table(["model", "test accuracy %", "MACs / image"], rows, markdown=True),
        "",
        f"MAC reduction {s['mac_reduction'] * 100:.1f} %, BitOPs reduction {s['bitops_reduction'] * 100:.1f} %"
        " (projection charged as dense float MACs; BitOPs with exact W8A8, approximator W8A8).",
        "",
        "Configuration: `" + json.dumps(s["config"]) + "`",
        "",
        "Files: `train.json`, `calibrate.json`, `finetune.json`, `summary.json`; models in `dense/`,"
        " `nenni-calibrated/`, `nenni/`; training curves in `nenni/train/curves.png`.",
    ]
    return "\n".join(lines) + "\n"
