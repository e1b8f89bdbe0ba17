"""Accuracy over a data set in batches: used by calibration, training and evaluation alike."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict_labels(
    model: nn.Module, x: torch.Tensor, batch_size: int = 256, progress: str | None = None
) -> torch.Tensor:
    """Top-1 labels for every row of x, in eval mode; `progress` names a tqdm bar (None: no bar)."""
    from tqdm.auto import tqdm

    model.eval()
    starts = range(0, len(x), batch_size)
    out = [
        model(x[i : i + batch_size]).argmax(1)
        for i in tqdm(starts, desc=progress, disable=progress is None, leave=False)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, progress: str | None = None
) -> float:
    """Top-1 accuracy in percent."""
    if len(x) == 0:
        return float("nan")
    return 100.0 * int((predict_labels(model, x, batch_size, progress) == y).sum()) / len(x)
