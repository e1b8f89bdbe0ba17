"""`nenni check`: PyTorch against ONNX Runtime for a model directory and its exported ONNX file."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import NenniError
from .export import format_parity
from .options import apply_threads, batch_size_option, data_options, json_option, threads_option, write_json


@click.command(name="check")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("model_path", type=click.Path(path_type=Path))
@data_options()
@click.option("--n", "count", type=click.IntRange(1), default=None, help="Only the first N test images.")
@batch_size_option()
@threads_option()
@click.option(
    "--min-agreement",
    type=float,
    default=None,
    help="Fail below this top-1 agreement (%).  [default: 99 for float32 exports; 90 for int8 exports, which also "
    "fail above a mean logit error of 15 % of the mean |logit|]",
)
@json_option()
def command(
    model_dir, model_path, data_name, data_dir, image_size, count, batch_size, threads, min_agreement, json_path
):
    """Max abs difference, top-1 agreement and accuracy of PyTorch vs ONNX Runtime on real test images; for
    noise models also seeded reproducibility, fresh noise per run and each layer's noise level."""
    from ..app.export import check_onnx
    from ..data import subset
    from ..nenni.model import data_for, open_model_dir

    apply_threads(threads)
    model = open_model_dir(model_dir)
    spec = data_for(model, data_name, data_dir, image_size)
    ds = spec.load("test")
    if count:
        ds = subset(ds, count)
    report = check_onnx(
        model,
        model_path,
        ds.x,
        ds.y,
        data_name=spec.name,
        batch_size=batch_size,
        threads=threads,
        min_agreement=min_agreement,
    )
    for line in format_parity(report.parity):
        click.echo(line)
    if json_path:
        write_json(json_path, report.to_json())
    if report.failure:
        raise NenniError(f"check failed: {report.failure}")
    click.echo("check passed")
