"""Choosing the essential neurons from the prediction z~: one function per granularity.

Every function takes the ranking score with channels on dim 1 and any trailing spatial dims
((B, n) for linear layers, (B, n, H, W) for convolutions) and returns a boolean mask of the same shape.
"""

from __future__ import annotations

import torch


def ranking_score(pred: torch.Tensor, rank: str) -> torch.Tensor:
    """Signed where a ReLU follows (negatives are clipped anyway); magnitude where the output feeds a residual add."""
    if rank == "magnitude":
        return pred.abs()
    if rank == "signed":
        return pred
    raise ValueError(f"rank must be signed or magnitude, got {rank!r}")


def _scatter_mask(score: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.zeros_like(score, dtype=torch.bool).scatter_(dim, idx, True)


def element_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k channels at every position (the paper's irregular pattern)."""
    idx = score.topk(k, dim=1).indices
    return _scatter_mask(score, idx, 1)


def threshold_mask(score: torch.Tensor, threshold: float) -> torch.Tensor:
    """Neurons whose score exceeds a per-layer threshold calibrated to the target ratio."""
    return score > threshold


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive channels at each position, the n largest."""
    b, c = score.shape[:2]
    grouped = score.reshape(b, c // m, m, *score.shape[2:])
    idx = grouped.topk(n, dim=2).indices
    return _scatter_mask(grouped, idx, 2).reshape(score.shape)


def channel_scores(score: torch.Tensor) -> torch.Tensor:
    """One score per (sample, channel): the mean over the spatial map."""
    return score.flatten(2).mean(dim=2) if score.dim() > 2 else score


def channel_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices of the whole channels to compute exactly, in ascending order (stable across runtimes)."""
    return channel_scores(score).topk(k, dim=1).indices.sort(dim=1).values


def channel_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    idx = channel_indices(score, k)
    mask = torch.zeros(score.shape[:2], dtype=torch.bool, device=score.device).scatter_(1, idx, True)
    return mask.view(*mask.shape, *([1] * (score.dim() - 2))).expand(score.shape)


def select(pred: torch.Tensor, spec) -> torch.Tensor:
    """The essential mask for a layer spec (see config.LayerSpec); computed without gradient."""
    with torch.no_grad():
        score = ranking_score(pred, spec.rank)
        if spec.granularity == "element":
            return element_mask(score, spec.essential)
        if spec.granularity == "nm":
            return nm_mask(score, *spec.nm)
        if spec.granularity == "channel":
            return channel_mask(score, spec.essential)
        if spec.granularity == "threshold":
            if spec.threshold is None:
                raise RuntimeError(f"layer {spec.name}: threshold granularity used before calibration")
            return threshold_mask(score, spec.threshold)
    raise ValueError(f"unknown granularity {spec.granularity!r}")
