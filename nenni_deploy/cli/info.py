"""`nenni info`: describe a saved NENNI model directory, or list the registered architectures."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import NenniError
from ..tables import format_table


@click.command(name="info")
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@click.option("--models", "list_models_", is_flag=True, help="List the registered architectures.")
@click.option("--json", "as_json", is_flag=True, help="Print the model's config.json as it is.")
def command(model_dir, list_models_, as_json):
    """Describe MODEL_DIR (architecture, layers, fit, accuracy, cost, hashes)."""
    if list_models_:
        click.echo(models_table())
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
        rows.append([name, info.family, info.dataset, "x".join(map(str, info.input_shape)), info.num_classes])
    return format_table(["arch", "family", "data", "input", "classes"], rows)


def describe(card: dict) -> str:
    cfg, m = card["nenni"], card.get("metrics", {})
    lines = [
        f"arch: {card['arch']}   granularity: {cfg['granularity']}"
        + (f" {cfg['nm']}" if cfg["granularity"] == "nm" else f"   ratio: {cfg['ratio']}")
        + f"   proj: {cfg['proj_dim']}   noise: {cfg['noise']}   approx bits: {cfg['approx_bits']}",
        f"weights sha256: {card['weights_sha256'][:16]}...   projection sha256: {card['projection_sha256'][:16]}...",
        f"versions: {', '.join(f'{k} {v}' for k, v in card.get('versions', {}).items())}",
    ]
    if m:
        parts = [
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items() if not isinstance(v, dict)
        ]
        lines.append("metrics: " + ", ".join(parts))
    rows = [
        [
            s["name"],
            s["kind"],
            s["in_dim"],
            s["out_dim"],
            s["proj_dim"],
            s["ratio"],
            s["rank"],
            s.get("fit_rel_error"),
            s.get("residual_rms"),
        ]
        for s in card["layers"]
    ]
    lines.append(format_table(["layer", "kind", "d", "n", "k", "ratio", "rank", "fit err", "resid rms"], rows))
    for h in card.get("history", []):
        lines.append(
            f"history: {h.get('stage')}: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items() if k != "stage")
        )
    return "\n".join(lines)
