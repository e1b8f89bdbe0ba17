"""`nenni check`: PyTorch against ONNX Runtime for a model directory and its exported ONNX file."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import NenniError
from .export import format_parity, parity_failure
from .options import apply_threads, json_option, write_json_atomic


@click.command(name="check")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--data", "data_name", type=click.Choice(["digits", "cifar10"]), default=None, help="Data set.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="CIFAR-10 folder.")
@click.option("--n", "count", type=click.IntRange(1), default=None, help="Only the first N test images.")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=256, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@click.option(
    "--min-agreement", type=float, default=99.0, show_default=True, help="Fail below this top-1 agreement (%)."
)
@json_option()
def command(model_dir, model_path, data_name, data_dir, count, batch_size, threads, min_agreement, json_path):
    """Max abs difference, top-1 agreement and accuracy of PyTorch vs ONNX Runtime on real test images; for
    noise models also seeded reproducibility, fresh noise per run and each layer's noise level."""
    from ..data import load_dataset, subset
    from ..models import model_info
    from ..nenni.io import load_nenni_model
    from ..runtime import load_onnx_checked
    from ..runtime.parity import check_parity

    apply_threads(threads)
    model, card = load_nenni_model(model_dir)
    loaded = load_onnx_checked(model_path, require_functions=False)
    name = data_name or model_info(card["arch"]).dataset
    ds = load_dataset(name, "test", data_dir)
    if count:
        ds = subset(ds, count)
    recorded = loaded.metadata.get("nenni.weights_sha256")
    if recorded and recorded != card.get("weights_sha256"):
        click.echo(f"warning: {model_path} was exported from other weights than {model_dir}", err=True)
    report = check_parity(model, loaded, ds.x, ds.y, batch_size=batch_size, threads=threads)
    for line in format_parity(report):
        click.echo(line)
    failure = parity_failure(report, min_agreement)
    if json_path:
        write_json_atomic(
            json_path,
            {
                "model_dir": str(model_dir),
                "model": str(model_path),
                "data": name,
                "weights_match": recorded == card.get("weights_sha256") if recorded else None,
                **report.to_dict(),
                "passed": failure is None,
            },
        )
    if failure:
        raise NenniError(f"check failed: {failure}")
    click.echo("check passed")
