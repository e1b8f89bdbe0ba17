"""`nenni demo`: the whole pipeline on the embedded default data set (scikit-learn digits), no download."""

from __future__ import annotations

import click

from .pipeline import pipeline_options, run


@click.command(name="demo")
@pipeline_options()
def command(out, threads, force, dry_run):
    """Train a small CNN on digits, make it NENNI, fine-tune, export both models to ONNX, check, benchmark them side
    by side, attack both (white-box, adaptive, transfer, replayed on ONNX Runtime), and write a report folder.

    The same as `nenni pipeline demo`; its config is `nenni_deploy/pipeline/configs/demo.toml`."""
    run("demo", force, dry_run, out, threads)
