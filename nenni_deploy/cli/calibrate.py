"""`nenni calibrate`: convert a trained model to NENNI, fit the approximators, report accuracy and cost."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import NenniError
from ..nenni.config import GRANULARITIES, NOISE_MODES, RANK_MODES
from .options import (
    apply_threads,
    data_options,
    json_option,
    model_and_data,
    model_options,
    runtime_options,
    write_json,
)


def _split_patterns(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


@click.command(name="calibrate")
@model_options()
@data_options()
@click.option("--ratio", type=float, default=0.5, show_default=True, help="Essential fraction per layer.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="channel", show_default=True)
@click.option("--nm", default="4:8", show_default=True, help="N:M pattern for --granularity nm.")
@click.option(
    "--proj-dim",
    default="n/4",
    show_default=True,
    help="Projection size k: an integer, a fraction of the layer width (0.25) or 'n/4'.",
)
@click.option(
    "--rank",
    type=click.Choice(RANK_MODES),
    default="auto",
    show_default=True,
    help="auto: signed where a rectifying activation follows, magnitude elsewhere (residual adds, concatenations).",
)
@click.option("--noise", type=click.Choice(NOISE_MODES), default="none", show_default=True)
@click.option("--noise-scale", type=float, default=1.0, show_default=True, help="Multiple of the residual RMS.")
@click.option(
    "--approx-bits",
    type=click.IntRange(2, 32),
    default=8,
    show_default=True,
    help="Fake-quantise the approximator to this many bits (the paper uses 4; 32 = float).",
)
@click.option(
    "--layer-ratio",
    "layer_ratios",
    multiple=True,
    metavar="PATTERN=RATIO",
    help="Per-layer essential ratio by name pattern (repeatable), e.g. 'layer3.*=0.75'.",
)
@click.option(
    "--layer-proj-dim",
    "layer_proj_dims",
    multiple=True,
    metavar="PATTERN=K",
    help="Per-layer projection size k by name pattern (repeatable), e.g. 'layer3.*=n/4'.",
)
@click.option("--include", default=None, help="Comma-separated name patterns of layers to convert.")
@click.option("--exclude", default=None, help="Comma-separated name patterns of layers to leave dense.")
@click.option("--ridge", type=float, default=1e-4, show_default=True, help="Relative ridge penalty of the fit.")
@click.option("--calib-n", type=click.IntRange(1), default=2048, show_default=True, help="Training images used to fit.")
@click.option("--eval-n", type=click.IntRange(1), default=None, help="Test images to evaluate (default all).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model directory to write.")
@runtime_options()
@json_option()
def command(data_name, data_dir, image_size, out, threads, batch_size, seed, json_path, calib_n, eval_n, **kw):
    """Fit NENNI approximators to a trained model, evaluate dense vs NENNI, write MODEL_DIR."""
    from ..app.calibrate import CalibrateConfig, calibrate
    from ..nenni.config import NenniConfig

    apply_threads(threads)
    if kw["weights"] is None and not Path(kw["arch"]).is_dir():
        raise NenniError("--weights is required: calibrate a trained model (train one with `nenni train`)")
    nenni = NenniConfig(
        ratio=kw.pop("ratio"),
        granularity=kw.pop("granularity"),
        nm=kw.pop("nm"),
        proj_dim=kw.pop("proj_dim"),
        rank=kw.pop("rank"),
        noise=kw.pop("noise"),
        noise_scale=kw.pop("noise_scale"),
        approx_bits=kw.pop("approx_bits"),
        include=_split_patterns(kw.pop("include")),
        exclude=_split_patterns(kw.pop("exclude")) or [],
        ratios=_parse_layer_ratios(kw.pop("layer_ratios")),
        proj_dims=_parse_pairs(kw.pop("layer_proj_dims"), "--layer-proj-dim", "PATTERN=K", "layer3.*=n/4"),
        seed=seed,
        ridge=kw.pop("ridge"),
    )
    config = CalibrateConfig(nenni, calib_n=calib_n, eval_n=eval_n, batch_size=batch_size)
    model, spec, train, test = model_and_data(kw, data_name, data_dir, image_size)
    result = calibrate(model, train, test, config)
    result.save(out)
    click.echo(result.layer_table())
    click.echo(result.summary())
    click.echo(f"wrote {out}")
    if json_path:
        write_json(json_path, result.to_json())


def _parse_layer_ratios(items: tuple[str, ...]) -> dict[str, float]:
    pairs = _parse_pairs(items, "--layer-ratio", "PATTERN=RATIO", "layer3.*=0.75")
    try:
        return {pattern: float(value) for pattern, value in pairs.items()}
    except ValueError:
        bad = next(f"{p}={v}" for p, v in pairs.items() if not _is_float(v))
        raise NenniError(f"--layer-ratio takes PATTERN=RATIO (e.g. 'layer3.*=0.75'), got {bad!r}") from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_pairs(items: tuple[str, ...], option: str, form: str, example: str) -> dict[str, str]:
    """PATTERN=VALUE pairs of a repeatable option; each value is checked where the config resolves it."""
    pairs = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern or not value.strip():
            raise NenniError(f"{option} takes {form} (e.g. '{example}'), got {item!r}")
        pairs[pattern] = value.strip()
    return pairs
