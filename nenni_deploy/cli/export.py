"""`nenni export`: a model directory to ONNX (ai.nenni ops for NENNI layers), checked against PyTorch first."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    apply_threads,
    data_options,
    int8_options,
    int8_settings,
    json_option,
    threads_option,
    write_json,
)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def format_parity(report) -> list[str]:
    lines = [
        f"parity on {report.images} images ({report.compared}): max abs diff {report.max_abs_diff:.3g}, "
        f"mean {report.mean_abs_diff:.3g} ({100 * report.relative_error:.2g} % of the mean |logit|), "
        f"top-1 agreement {report.agreement:.2f} %"
    ]
    if report.tolerance:
        lines.append(f"tolerance ({report.tolerance})")
    if report.accuracy_torch is not None:
        lines.append(f"accuracy: PyTorch {report.accuracy_torch:.2f} %  ONNX Runtime {report.accuracy_onnx:.2f} %")
    if report.noise:
        n = report.noise
        lines.append(
            f"noise: seeded sessions equal: {n['seeded_equal']}; runs of one session differ: "
            f"{n['unseeded_runs_differ']} (max {n['run_to_run_max_abs_diff']:.3g})"
        )
        for layer in n["layers"]:
            lines.append(
                f"  {layer['layer']}: noise std measured {layer['measured_std']:.4g}, "
                f"expected {layer['expected_std']:.4g} ({'ok' if layer['ok'] else 'MISMATCH'})"
            )
        if "accuracy_torch_noisy" in n:
            lines.append(
                f"  with noise: accuracy PyTorch {n['accuracy_torch_noisy']:.2f} %  "
                f"ONNX Runtime {n['accuracy_onnx_noisy']:.2f} % (different noise streams)"
            )
    lines += [f"warning: {w}" for w in report.warnings]
    return lines


def format_int8(result) -> list[str]:
    c, cal = result.counts, result.calibration
    integer = ", ".join(f"{op} {n}" for op, n in c["integer_kernels"].items()) or "none"
    floating = ", ".join(f"{op} {n}" for op, n in c["float_compute_kernels"].items()) or "none"
    lines = [
        f"int8: calibrated on {cal['source']} ({cal['method']}); {cal['weights']}",
        f"int8: ONNX Runtime runs {c['integer_total']} integer kernels ({integer}); float compute kernels: "
        f"{floating}; NENNI layers in int8: {c['nenni_layers_int8']} of {c['nenni_layers']}",
    ]
    return lines + [f"warning: {w}" for w in result.warnings]


@click.command(name="export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .onnx file.")
@click.option(
    "--dense", is_flag=True, help="Export the dense model the directory was made from (its original weights)."
)
@click.option(
    "--target",
    type=click.Choice(["ort", "tensorrt"]),
    default="ort",
    show_default=True,
    help="ort: function bodies attached; tensorrt: plugin attributes, no local functions.",
)
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (18-23).")
@click.option("--external-data", is_flag=True, help="Write the weights to <out>.data beside the model.")
@click.option("--check/--no-check", default=True, show_default=True, help="Compare with PyTorch before writing.")
@click.option("--check-n", type=click.IntRange(1), default=256, show_default=True, help="Images for the check.")
@click.option(
    "--noise-seed",
    type=click.IntRange(0, 2**24 - 1),
    default=None,
    help="Seed the noise nodes (reproducible sessions); default: fresh noise in every session.",
)
@click.option("--no-noise", is_flag=True, help="Leave the noise nodes out (the deterministic part only).")
@data_options()
@click.option(
    "--channel-lowering",
    type=click.Choice(["skip", "masked", "grouped", "auto", "tune"]),
    default="skip",
    show_default=True,
    help="Channel layers in ORT: compute only the essential filters (skip), the dense convolution then select "
    "(masked; same outputs), one convolution group per sample over the gathered filters (grouped; needs "
    "--batch), per layer the one of skip and masked the measured lowering model predicts faster for its shape, "
    "the batch size and the precision (auto; benchmarks/crossover.py), or time both on every layer (tune).",
)
@click.option(
    "--batch",
    "static_batch",
    type=click.IntRange(1, 65536),
    default=None,
    help="Fix the batch size of the graph (default: dynamic); --channel-lowering grouped needs it.",
)
@click.option(
    "--tune-batch",
    type=click.IntRange(1, 4096),
    default=1,
    show_default=True,
    help="Batch size --channel-lowering auto decides for and tune times at.",
)
@click.option(
    "--tune-threads",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="ORT threads --channel-lowering tune times layers with (as in deployment).",
)
@int8_options()
@threads_option("Threads for the check.")
@json_option()
def command(
    model_dir,
    out,
    dense,
    target,
    opset,
    external_data,
    check,
    check_n,
    noise_seed,
    no_noise,
    data_name,
    data_dir,
    image_size,
    channel_lowering,
    static_batch,
    tune_batch,
    tune_threads,
    int8,
    calib_n,
    calib_method,
    calib_percentile,
    reduce_range,
    threads,
    json_path,
):
    """Export MODEL_DIR (from calibrate, finetune, train or prune) to ONNX with a dynamic batch axis: images in
    [0, 1] in (normalisation is inside the graph), logits out."""
    from ..app.export import export_onnx
    from ..exporters.export import ExportOptions
    from ..nenni.model import data_for, open_model_dir

    apply_threads(threads)
    model = open_model_dir(model_dir)
    options = ExportOptions(
        target=target,
        opset=opset,
        dense=dense,
        noise=not no_noise,
        noise_seed=noise_seed,
        channel_lowering=channel_lowering,
        tune_batch=tune_batch,
        tune_threads=tune_threads,
        precision="int8" if int8 else "float32",
        batch=static_batch,
    )
    data = data_for(model, data_name, data_dir, image_size) if (data_name or data_dir or image_size) else None
    quantize = int8_settings(int8, calib_n, calib_method, calib_percentile, reduce_range)
    if quantize is not None and data is None and model.data is None and model.source.arch:
        data = data_for(model, None)  # a registered architecture's own data set calibrates it
    report = export_onnx(
        model,
        out,
        options,
        check=check,
        check_n=check_n,
        data=data,
        threads=threads,
        external_data=external_data,
        int8=quantize,
    )
    for note in report.notes:
        click.echo(f"note: {note}")
    if report.int8 is not None:
        for line in format_int8(report.int8):
            click.echo(line)
    if report.parity is not None:
        for line in format_parity(report.parity):
            click.echo(line)
        click.echo(f"(checked on {report.checked_on})")
    result, stats = report.result, report.result.stats
    if target == "tensorrt":  # build_onnx refused the export otherwise
        click.echo("TensorRT check: every node is a native TensorRT op or resolves to a nenni:: plugin")
    what = "dense" if dense or not model.is_nenni else "NENNI"
    click.echo(
        f"wrote {', '.join(map(str, result.files))} ({_mb(result.bytes)}); target {target}, opset {opset}, "
        f"{what}; export {result.seconds:.2f} s"
    )
    click.echo(
        f"nodes: {stats['nodes']} ({stats['nenni_layers']} NENNI layers, {stats['nenni_noise']} noise), "
        f"{stats['functions']} functions, {stats['initializers']} initializers, {stats['parameters']:,} parameters"
    )
    if json_path:
        write_json(json_path, report.to_json())
