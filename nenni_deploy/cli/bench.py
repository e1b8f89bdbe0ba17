"""`nenni bench`: latency and throughput of exported models beside their dense baseline, in the same run."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import NenniError
from ..tables import format_table
from .options import json_option, progress_option, write_json


@click.command(name="bench")
@click.argument("model_paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--baseline",
    "baseline_path",
    type=click.Path(path_type=Path),
    default=None,
    help="The dense model to compare with (interleaved with every MODEL_PATH, round by round).",
)
@click.option(
    "--batch",
    "batches",
    type=click.IntRange(1, 65536),
    multiple=True,
    help="Batch size (repeatable).  [default: 1 and 64]",
)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Intra-op threads (default: all cores).")
@click.option(
    "--warmup",
    type=click.FloatRange(0, 3600),
    default=1.0,
    show_default=True,
    help="Seconds of untimed runs per model and batch size.",
)
@click.option(
    "--duration",
    type=click.FloatRange(0, 86400, min_open=True),
    default=None,
    help="Timed seconds per model and batch size.  [default: 5]",
)
@click.option("--iterations", type=click.IntRange(1), default=None, help="Timed runs per model and batch size.")
@click.option(
    "--rounds",
    type=click.IntRange(2, 10_000),
    default=10,
    show_default=True,
    help="Interleaving rounds (A B A B ...); the speedup's interval is across rounds.",
)
@click.option("--profile", is_flag=True, help="Add an ONNX Runtime operator profile split into NENNI stages.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input images.")
@json_option()
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG: latency distributions and speedup vs batch size.",
)
@click.option(
    "--force", is_flag=True, help="Time against a --baseline that is not this model's dense base (shapes or hashes)."
)
@progress_option()
def command(
    model_paths,
    baseline_path,
    batches,
    provider,
    threads,
    warmup,
    duration,
    iterations,
    rounds,
    profile,
    seed,
    json_path,
    plot_path,
    force,
    progress,
):
    """Time MODEL_PATHS (.onnx files, e.g. a float and an int8 export) and, with --baseline, the dense model
    beside them: latency next to each file's MACs and BitOPs as it runs (float32 or int8) and the fraction of
    the ideal speedup over the baseline it reaches."""
    from ..evaluation.bench import BenchSettings, run_bench

    if duration is not None and iterations is not None:
        raise NenniError("give --duration or --iterations, not both")
    settings = BenchSettings(
        batches=tuple(dict.fromkeys(batches or (1, 64))),
        provider=provider,
        threads=threads,
        warmup=warmup,
        duration=BenchSettings.duration if duration is None and iterations is None else duration,
        iterations=iterations,
        rounds=rounds,
        profile=profile,
        seed=seed,
    )
    report = run_bench(list(model_paths), baseline_path, settings, progress=progress, force=force)
    click.echo(summary_text(report))
    if json_path:
        write_json(json_path, report)
        click.echo(f"wrote {json_path}")
    if plot_path:
        from ..evaluation.bench_plot import plot_report

        plot_report(report, plot_path)
        click.echo(f"wrote {plot_path}")


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _m(value, scale: float) -> str:
    return "-" if value is None else f"{value / scale:,.1f}"


def cost_table(report: dict) -> str:
    """Per batch size and model: measured latency beside MACs and BitOPs as run, and the fraction of the
    MAC- and BitOPs-ideal speedups over the baseline the measured speedup reaches."""
    models = report["models"]
    rows = []
    for b in report["batches"]:
        for label, s in b["models"].items():
            run = models[label].get("as_run") or {}
            sp = (b.get("speedups") or {}).get(label)
            ideal = (b.get("ideals") or {}).get(label) or {}
            frac_mac, frac_bit = ideal.get("fraction_of_mac_ideal"), ideal.get("fraction_of_bitops_ideal")
            rows.append(
                [
                    b["batch"],
                    label,
                    models[label].get("precision", "float32"),
                    _m(run.get("macs"), 1e6),
                    _m(run.get("bitops"), 1e9),
                    _fmt(s["mean_ms"], ".3f"),
                    "baseline" if label == "baseline" else (f"{sp['speedup']:.3f}" if sp else "-"),
                    f"[{sp['ci_low']:.3f}, {sp['ci_high']:.3f}]" if sp else "-",
                    _fmt(ideal.get("mac_speedup")),
                    _fmt(ideal.get("bitops_speedup")),
                    _fmt(frac_mac and 100 * frac_mac, ".0f"),
                    _fmt(frac_bit and 100 * frac_bit, ".1f"),
                ]
            )
    head = ["batch", "model", "precision", "MMACs/img", "GBitOPs/img", "mean ms", "speedup", "95 % CI",
            "MAC-ideal", "BitOPs-ideal", "% of MAC-ideal", "% of BitOPs-ideal"]  # fmt: skip
    loads = ", ".join(f"batch {b['batch']}: {_fmt(b['load']['other_processes_busy_cores'])}" for b in report["batches"])
    note = (
        f"(MACs and BitOPs per image as each file runs: float32 at 32 x 32 bits, int8 at 8 x 8; speedups over the "
        f"baseline; other load in cores {loads})"
    )
    return format_table(head, rows) + "\n" + note


def summary_text(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"{env['cpu_model']} ({env['usable_cores']} usable cores), {env['provider']} -> "
        f"{', '.join(sorted({p[0] for p in env['providers_used'].values() if p}))}, "
        f"{env['intra_op_threads']} intra-op threads, onnxruntime {env['versions']['onnxruntime']}",
    ]
    rows = []
    for b in report["batches"]:
        for label, s in b["models"].items():
            rows.append(
                [
                    b["batch"],
                    label,
                    _fmt(s["mean_ms"], ".3f"),
                    _fmt(s["std_ms"], ".3f"),
                    _fmt(s["min_ms"], ".3f"),
                    _fmt(s["p50_ms"], ".3f"),
                    _fmt(s["p90_ms"], ".3f"),
                    _fmt(s["p95_ms"], ".3f"),
                    _fmt(s["p99_ms"], ".3f"),
                    _fmt(s["throughput_ips"], ".1f"),
                    s["n"],
                ]
            )
    lines.append(
        format_table(["batch", "model", "mean ms", "std", "min", "p50", "p90", "p95", "p99", "img/s", "runs"], rows)
    )
    lines.append(cost_table(report))
    for label, per_batch in report.get("profile", {}).items():
        for batch, prof in per_batch.items():
            shares = ", ".join(f"{k} {100 * v:.0f} %" for k, v in prof["stage_share"].items())
            lines.append(
                f"profile {label} batch {batch}: {prof['kernel_ms_per_run']:.3f} ms kernels/run "
                f"({prof['kernels_per_run']:.0f} kernels): {shares}"
            )
    layouts = report.get("layout") or {}
    if any(v["plain"] for v in layouts.values()):  # a reason for a speed the MACs do not explain
        from ..runtime.layout import ConvLayout

        lines += [f"layout {label}: {ConvLayout(**v).describe()}" for label, v in layouts.items()]
    worst = max((b["load"]["other_processes_busy_cores"] or 0.0) for b in report["batches"])
    if worst > 0.25:
        lines.append(f"warning: other processes kept {worst:.2f} cores busy during the run; compare ratios only")
    return "\n".join(lines)
