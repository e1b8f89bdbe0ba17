"""curves.png: loss and accuracy per epoch, drawn with matplotlib's Agg canvas (no pyplot, no global backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def accuracy_keys(records: list[dict[str, Any]]) -> list[str]:
    """train_acc, val_acc and any validator metric named '*_acc' (e.g. a PGD accuracy added later)."""
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if k.endswith("_acc") and isinstance(v, (int, float)) and k not in keys:
                keys.append(k)
    return keys


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in records]
    ax_loss.plot(epochs, [r.get("train_loss") for r in records], marker="o", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    for key in accuracy_keys(records):
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax_acc.plot(*zip(*points, strict=True), marker="o", label=key.replace("_", " "))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    # fixed margins: constrained layout costs more than the whole plot
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.88, wspace=0.25)
    fig.savefig(path, dpi=100, format="png")  # explicit: atomic writes go through a temporary name
    return Path(path)
