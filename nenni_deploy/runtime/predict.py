"""Batching a data set through any Runner."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import NenniError
from .runners import Runner


def predict_dataset(runner: Runner, x: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits for every image of `x` (N, C, H, W), `batch_size` at a time (a static-batch model's own batch
    size); the runner must be active."""
    if batch_size < 1:
        raise NenniError(f"batch size must be >= 1, got {batch_size}")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if len(x) == 0:
        raise NenniError("no images to predict")
    spec = runner.input_specs()[0]
    fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    if fixed is not None:  # a static-batch graph takes exactly its batch: the last chunk is padded, then cut
        batch_size = fixed
    outputs = []
    for start in range(0, len(x), batch_size):
        chunk = np.ascontiguousarray(x[start : start + batch_size])
        n = len(chunk)
        if fixed is not None and n < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
        result = runner.infer({spec.name: chunk})
        outputs.append(next(iter(result.values()))[:n])
    return np.concatenate(outputs, axis=0)


def accuracy(logits: np.ndarray, labels: np.ndarray | torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return float((logits.argmax(axis=1) == labels).mean() * 100.0)
