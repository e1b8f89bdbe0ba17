"""`nenni info`: describe a model directory (dense, pruned or NENNI), or list the registered architectures."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import NenniError
from ..tables import format_table


@click.command(name="info")
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@click.option("--models", "list_models_", is_flag=True, help="List the registered architectures and their checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print the model's config.json as it is.")
def command(model_dir, list_models_, as_json):
    """Describe MODEL_DIR (kind, where the architecture comes from, layers, fit, accuracy, cost, hashes)."""
    if list_models_:
        click.echo(models_table())
        click.echo("Your own model: --arch path/to/file.py:FUNCTION (or package.module:FUNCTION) with --weights.")
        return
    if model_dir is None:
        raise NenniError("give a MODEL_DIR, or --models to list architectures")
    from ..nenni.io import read_card

    card = read_card(model_dir)
    if as_json:
        click.echo(json.dumps(card, indent=2))
        return
    click.echo(describe(card))


def models_table() -> str:
    from ..models import list_models, model_info

    rows = []
    for name in list_models():
        info = model_info(name)
        shape = "x".join(map(str, info.input_shape))
        rows.append([name, info.family, info.dataset, shape, info.num_classes, info.checkpoints])
    return format_table(["arch", "family", "data", "input", "classes", "imports checkpoints (file names)"], rows)


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def describe(card: dict) -> str:
    model, data, m = card["model"], card.get("data") or {}, card.get("metrics", {})
    source = model.get("arch") or f"{model.get('entrypoint')} (from {model.get('origin')})"
    shape = "x".join(map(str, model.get("input_shape") or [])) or "?"
    lines = [
        f"kind: {card['kind']}   model: {source}   input: {shape}   classes: {model.get('num_classes')}",
    ]
    if model.get("kwargs"):
        lines.append(f"arguments: {json.dumps(model['kwargs'])}")
    if model.get("mean"):
        lines.append(f"input normalisation: mean {model['mean']}, std {model['std']} (inside the model)")
    if data:
        lines.append(
            f"data: {data.get('name')}" + (f" (resized to {data['image_size']})" if data.get("image_size") else "")
        )
    cfg = card.get("nenni")
    if cfg:
        pattern = f" {cfg['nm']}" if cfg["granularity"] == "nm" else f"   ratio: {cfg['ratio']}"
        lines.append(
            f"NENNI: granularity {cfg['granularity']}{pattern}   proj: {cfg['proj_dim']}   noise: {cfg['noise']}"
            f"   approx bits: {cfg['approx_bits']}"
        )
    hashes = [f"weights sha256: {card['weights_sha256'][:16]}..."]
    if card.get("base_weights_sha256"):
        hashes.append(f"dense base sha256: {card['base_weights_sha256'][:16]}...")
    if card.get("projection_sha256"):
        hashes.append(f"projection sha256: {card['projection_sha256'][:16]}...")
    lines.append("   ".join(hashes))
    lines.append(f"versions: {', '.join(f'{k} {v}' for k, v in card.get('versions', {}).items())}")
    if m:
        lines.append("metrics: " + ", ".join(f"{k} {_value(v)}" for k, v in m.items() if not isinstance(v, dict)))
    if card.get("layers"):
        rows = [
            [s["name"], s["kind"], s["in_dim"], s["out_dim"], s["proj_dim"], s["ratio"], s["rank"],
             s.get("fit_rel_error"), s.get("residual_rms")]
            for s in card["layers"]
        ]  # fmt: skip
        lines.append(format_table(["layer", "kind", "d", "n", "k", "ratio", "rank", "fit err", "resid rms"], rows))
    for d in card.get("dense_layers", []):
        lines.append(f"dense: {d['name']}: {d['reason']}")
    for h in card.get("history", []):
        lines.append(
            f"history: {h.get('stage')}: "
            + ", ".join(f"{k}={_value(v)}" for k, v in h.items() if k != "stage" and not isinstance(v, (dict, list)))
        )
    return "\n".join(lines)
