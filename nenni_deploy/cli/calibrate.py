"""`nenni calibrate`: convert a trained model to NENNI, fit the approximators, report accuracy and cost."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import NenniError
from ..nenni.calibrate import calibrate
from ..nenni.config import GRANULARITIES, NOISE_MODES, RANK_MODES, NenniConfig
from ..tables import format_table
from .options import apply_threads, arch_option, data_options, json_option, runtime_options, write_json_atomic


def _split_patterns(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


@click.command(name="calibrate")
@arch_option()
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint (.safetensors, or a torch file loaded with weights_only=True).",
)
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
    help="auto: magnitude before a residual add, signed elsewhere.",
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
def command(
    arch,
    weights,
    data_name,
    data_dir,
    ratio,
    granularity,
    nm,
    proj_dim,
    rank,
    noise,
    noise_scale,
    approx_bits,
    layer_ratios,
    layer_proj_dims,
    include,
    exclude,
    ridge,
    calib_n,
    eval_n,
    out,
    threads,
    batch_size,
    seed,
    json_path,
):
    """Fit NENNI approximators to a trained model, evaluate dense vs NENNI, write MODEL_DIR."""
    from ..data import load_dataset
    from ..models import create_model, model_info

    apply_threads(threads)
    info = model_info(arch)
    if info.dataset != data_name:
        raise NenniError(f"--arch {arch} is built for {info.dataset}, not --data {data_name}")
    if weights is None:
        raise NenniError("--weights is required: calibrate a trained model (train one with `nenni train`)")
    config = NenniConfig(
        ratio=ratio,
        granularity=granularity,
        nm=nm,
        proj_dim=proj_dim,
        rank=rank,
        noise=noise,
        noise_scale=noise_scale,
        approx_bits=approx_bits,
        include=_split_patterns(include),
        exclude=_split_patterns(exclude) or [],
        ratios=_parse_layer_ratios(layer_ratios),
        proj_dims=_parse_layer_proj_dims(layer_proj_dims),
        seed=seed,
        ridge=ridge,
    )
    model = create_model(arch, weights=weights)
    train = load_dataset(data_name, "train", data_dir)
    test = load_dataset(data_name, "test", data_dir)
    test_x, test_y = (test.x[:eval_n], test.y[:eval_n]) if eval_n else (test.x, test.y)
    start = time.perf_counter()
    result = calibrate(model, config, train.x, test_x, test_y, calib_n=calib_n, batch_size=batch_size)
    total = result.cost["totals"]
    metrics = {
        "dense_accuracy": result.dense_accuracy,
        "nenni_accuracy": result.nenni_accuracy,
        "eval_images": len(test_x),
        "data": data_name,
        "macs_dense": total["macs_dense"],
        "macs_nenni": total["macs_nenni"],
        "bitops_dense": total["bitops_dense"],
        "bitops_nenni": total["bitops_nenni"],
        "fit_seconds": result.fit_seconds,
        "calib_images": min(calib_n, len(train.x)),
    }
    from ..nenni.io import save_nenni_model

    save_nenni_model(
        out,
        result.model,
        arch=arch,
        config=config,
        specs=result.specs,
        metrics=metrics,
        history=[{"stage": "calibrate", "weights": str(weights), **metrics}],
    )
    click.echo(layer_table(result))
    click.echo(summary(result))
    click.echo(f"wrote {out}")
    if json_path:
        write_json_atomic(
            json_path,
            {
                **metrics,
                "arch": arch,
                "weights": str(weights),
                "model_dir": str(out),
                "seconds": time.perf_counter() - start,
                "config": config.to_dict(),
                "layers": [{**s.to_dict(), **c} for s, c in zip(result.specs, _nenni_rows(result), strict=True)],
                "cost": result.cost,
            },
        )


def _parse_layer_ratios(items: tuple[str, ...]) -> dict[str, float]:
    ratios = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        try:
            ratios[pattern] = float(value)
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise NenniError(f"--layer-ratio takes PATTERN=RATIO (e.g. 'layer3.*=0.75'), got {item!r}")
    return ratios


def _parse_layer_proj_dims(items: tuple[str, ...]) -> dict[str, str]:
    """PATTERN=K pairs; K is checked per layer when the config resolves (any --proj-dim form)."""
    dims = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern or not value.strip():
            raise NenniError(f"--layer-proj-dim takes PATTERN=K (e.g. 'layer3.*=n/4'), got {item!r}")
        dims[pattern] = value.strip()
    return dims


def _nenni_rows(result) -> list[dict]:
    return [r for r in result.cost["layers"] if r["proj_dim"] is not None]


def layer_table(result) -> str:
    fits = {f.name: f for f in result.fits}
    rows = []
    for c in result.cost["layers"]:
        spec = next((s for s in result.specs if s.name == c["name"]), None)
        f = fits.get(c["name"])
        rows.append(
            [
                c["name"],
                c["kind"],
                c["in_dim"],
                c["out_dim"],
                c["proj_dim"],
                c["essential"],
                spec.rank if spec else "dense",
                f.rel_error if f else None,
                c["macs_dense"],
                c["macs_nenni"],
                c["bitops_nenni"] / c["bitops_dense"] if c["bitops_dense"] else None,
            ]
        )
    return format_table(
        ["layer", "kind", "d", "n", "k", "K", "rank", "fit err", "MACs dense", "MACs NENNI", "BitOPs ratio"],
        rows,
    )


def summary(result) -> str:
    t, a = result.cost["totals"], result.cost["assumptions"]
    return "\n".join(
        [
            f"accuracy: dense {result.dense_accuracy:.2f} %  NENNI {result.nenni_accuracy:.2f} %",
            f"MACs/image: dense {t['macs_dense']:,}  NENNI {t['macs_nenni']:,}"
            f"  ({t['mac_reduction'] * 100:.1f} % fewer; projection charged as dense float MACs)",
            f"BitOPs/image: dense {t['bitops_dense']:,}  NENNI {t['bitops_nenni']:,}"
            f"  ({t['bitops_reduction'] * 100:.1f} % fewer; {a['text']})",
            f"fit: {result.fit_seconds:.1f} s",
        ]
    )
