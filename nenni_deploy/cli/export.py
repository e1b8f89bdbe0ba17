"""`nenni export`: a NENNI model directory to ONNX (ai.nenni ops), checked against PyTorch before it is written."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import NenniError
from .options import apply_threads, json_option, write_json_atomic

PARITY_MIN_AGREEMENT = 99.0  # percent top-1 agreement below which an export is refused


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def check_images(dataset: str, data_dir: Path | None, n: int):
    """(x, y, description) of the first n test images; random images (y None) when the data set is absent."""
    import torch

    from ..data import load_dataset, subset

    try:
        ds = subset(load_dataset(dataset, "test", data_dir), n)
        return ds.x, ds.y, f"{len(ds)} {dataset} test images"
    except NenniError as exc:
        generator = torch.Generator().manual_seed(0)
        shape = _DATASET_SHAPES.get(dataset)
        if shape is None:
            raise
        x = torch.rand(n, *shape, generator=generator)
        return x, None, f"{n} random images ({exc})"


_DATASET_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}


def format_parity(report) -> list[str]:
    lines = [
        f"parity on {report.images} images ({report.compared}): max abs diff {report.max_abs_diff:.3g}, "
        f"mean {report.mean_abs_diff:.3g}, top-1 agreement {report.agreement:.2f} %"
    ]
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


def parity_failure(report, min_agreement: float) -> str | None:
    if report.agreement < min_agreement:
        return f"top-1 agreement {report.agreement:.2f} % is below {min_agreement:.1f} %"
    if not report.noise_ok:
        return "the noise checks failed (see above)"
    return None


@click.command(name="export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .onnx file.")
@click.option("--dense", is_flag=True, help="Export the base model of the same weights (every layer exact).")
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
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="CIFAR-10 folder for the check (else $NENNI_DATA_DIR).",
)
@click.option(
    "--channel-lowering",
    type=click.Choice(["skip", "masked", "auto"]),
    default="skip",
    show_default=True,
    help="Channel layers in ORT: compute only the essential filters (skip), the dense convolution then select "
    "(masked; same outputs), or time both per layer and keep the faster (auto).",
)
@click.option(
    "--tune-batch",
    type=click.IntRange(1, 4096),
    default=1,
    show_default=True,
    help="Batch size --channel-lowering auto times layers at.",
)
@click.option(
    "--tune-threads",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="ORT threads --channel-lowering auto times layers with (as in deployment).",
)
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Threads for the check.")
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
    data_dir,
    channel_lowering,
    tune_batch,
    tune_threads,
    threads,
    json_path,
):
    """Export MODEL_DIR to ONNX with a dynamic batch axis; images in [0, 1] in, logits out."""
    from ..exporters.export import ExportOptions, build_onnx, export_to_file
    from ..models import model_info
    from ..nenni.io import load_nenni_model
    from ..runtime import check_proto, load_onnx_checked
    from ..runtime.parity import check_parity

    apply_threads(threads)
    model, card = load_nenni_model(model_dir)
    info = model_info(card["arch"])
    options = ExportOptions(
        target=target,
        opset=opset,
        dense=dense,
        noise=not no_noise,
        noise_seed=noise_seed,
        channel_lowering=channel_lowering,
        tune_batch=tune_batch,
        tune_threads=tune_threads,
    )
    exported = build_onnx(model, card, info.input_shape, options)
    summary = {"model_dir": str(model_dir), "out": str(out), **options.__dict__, "stats": exported.stats}
    report = None
    if check:
        x, y, described = check_images(info.dataset, data_dir, check_n)
        report = check_parity(model, check_proto(exported.proto, require_functions=False), x, y, threads=threads)
        for line in format_parity(report):
            click.echo(line)
        click.echo(f"(checked on {described})")
        failure = parity_failure(report, PARITY_MIN_AGREEMENT)
        if failure:
            raise NenniError(f"parity check failed: {failure}; nothing written (use --no-check to write anyway)")
    result = export_to_file(model, card, info.input_shape, out, options, external_data=external_data, exported=exported)
    load_onnx_checked(out, require_functions=target == "ort")  # the written file reads back
    stats = result.stats
    if target == "tensorrt":  # build_onnx refused the export otherwise
        click.echo("TensorRT check: every node is a native TensorRT op or resolves to a nenni:: plugin")
    click.echo(
        f"wrote {', '.join(map(str, result.files))} ({_mb(result.bytes)}); target {target}, opset {opset}, "
        f"{'dense' if dense else 'NENNI'}; export {result.seconds:.2f} s"
    )
    click.echo(
        f"nodes: {stats['nodes']} ({stats['nenni_layers']} NENNI layers, {stats['nenni_noise']} noise), "
        f"{stats['functions']} functions, {stats['initializers']} initializers, {stats['parameters']:,} parameters"
    )
    if json_path:
        summary.update(
            files=[str(f) for f in result.files],
            bytes=result.bytes,
            seconds=result.seconds,
            metadata=result.metadata,
            parity=report.to_dict() if report else None,
        )
        write_json_atomic(json_path, summary)
