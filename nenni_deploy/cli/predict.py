"""`nenni predict`: run an exported ONNX model over a data set with ONNX Runtime and report its accuracy."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import click

from ..errors import NenniError
from .options import data_options, json_option, write_json


def data_for_onnx(metadata: dict[str, str], data_name, data_dir, image_size):
    """--data, else the data set the export records (its folder, its resize), else the architecture's own."""
    import json

    from ..data import DataSpec
    from ..models import list_models, model_info

    if data_name:
        return DataSpec.create(data_name, data_dir, image_size)
    try:
        recorded = DataSpec.from_dict(json.loads(metadata.get("nenni.data") or "{}"))
    except (json.JSONDecodeError, TypeError):
        recorded = None
    if recorded is not None:
        return DataSpec.create(recorded.name, data_dir or recorded.dir, image_size or recorded.image_size)
    arch = metadata.get("nenni.arch")
    if arch in list_models():
        return DataSpec.create(model_info(arch).dataset, data_dir, image_size)
    raise NenniError("the model records no data set: pass --data")


@click.command(name="predict")
@click.argument("model_path", type=click.Path(path_type=Path))
@data_options()
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--n", "count", type=click.IntRange(1), default=None, help="Only the first N images.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Intra-op threads (default: ORT's).")
@click.option("--inter-op-threads", type=click.IntRange(1, 256), default=None)
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=256, show_default=True)
@json_option()
def command(
    model_path,
    data_name,
    data_dir,
    image_size,
    split,
    count,
    provider,
    threads,
    inter_op_threads,
    batch_size,
    json_path,
):
    """Accuracy of MODEL_PATH (an .onnx file) on a data set, with ONNX Runtime."""
    from ..data import subset
    from ..runtime import RuntimeFallbackWarning, accuracy, load_onnx_checked, open_runner, predict_dataset

    loaded = load_onnx_checked(model_path)
    spec = data_for_onnx(loaded.metadata, data_name, data_dir, image_size)
    name = spec.name
    ds = spec.load(split)
    if count:
        ds = subset(ds, count)
    runner = open_runner(loaded, provider=provider, threads=threads, inter_op_threads=inter_op_threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeFallbackWarning)  # reported once below, as one line
        with runner:
            start = time.perf_counter()
            logits = predict_dataset(runner, ds.x, batch_size)
            seconds = time.perf_counter() - start
            used = runner.providers_used()[0]
    for warning in runner.warnings:
        click.echo(f"warning: {warning}", err=True)
    acc = accuracy(logits, ds.y)
    kind = "NENNI" if loaded.is_nenni else "dense"
    if loaded.metadata.get("nenni.precision") == "int8":
        kind += ", int8"
    click.echo(
        f"accuracy: {acc:.2f} % on {len(ds)} {name} {split} images ({kind} model, {used}, "
        f"{seconds:.2f} s, {len(ds) / seconds:.0f} images/s)"
    )
    if json_path:
        write_json(
            json_path,
            {
                "model": str(model_path),
                "data": name,
                "split": split,
                "images": len(ds),
                "accuracy": acc,
                "provider": provider,
                "provider_used": used,
                "threads": threads,
                "batch_size": batch_size,
                "seconds": seconds,
                "nenni": loaded.is_nenni,
                "warnings": runner.warnings,
            },
        )
