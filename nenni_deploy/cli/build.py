"""`nenni build`: a `--target tensorrt` ONNX export to a TensorRT engine (.plan) with the NENNI plugins."""

from __future__ import annotations

from pathlib import Path

import click

from .options import json_option, write_json


@click.command(name="build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .plan file.")
@click.option("--fp16", is_flag=True, help="Allow FP16 kernels (the NENNI plugins stay FP32).")
@click.option("--min-batch", type=click.IntRange(1), default=1, show_default=True, help="Profile: smallest batch.")
@click.option("--opt-batch", type=click.IntRange(1), default=32, show_default=True, help="Profile: tuned batch.")
@click.option("--max-batch", type=click.IntRange(1), default=256, show_default=True, help="Profile: largest batch.")
@click.option("--workspace", type=click.IntRange(1), default=1024, show_default=True, help="Builder workspace, MiB.")
@click.option("--verbose", is_flag=True, help="TensorRT's verbose log.")
@json_option()
def command(model, out, fp16, min_batch, opt_batch, max_batch, workspace, verbose, json_path):
    """Build MODEL.onnx (exported with --target tensorrt, or a dense export) into a TensorRT engine.

    Needs an NVIDIA GPU and TensorRT >= 10.7 (pip install -e '.[tensorrt]'; see docs/tensorrt.md). The graph is
    checked for TensorRT before anything is built; the plan is written under a temporary name and renamed.
    """
    from ..runtime.tensorrt.build import BuildOptions, build_engine

    options = BuildOptions(
        fp16=fp16, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_mib=workspace,
        verbose=verbose,
    )  # fmt: skip
    result = build_engine(model, out, options)
    lo, opt, hi = result.profile
    click.echo(
        f"wrote {result.out} ({result.bytes / 2**20:.2f} MB) with TensorRT {result.tensorrt_version} in "
        f"{result.seconds:.1f} s; {result.input_name} min {list(lo)} opt {list(opt)} max {list(hi)}"
        f"{', fp16' if fp16 else ''}"
    )
    if json_path:
        write_json(json_path, {"model": str(model), **result.to_dict()})
