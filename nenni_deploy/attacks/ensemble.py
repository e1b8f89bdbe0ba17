"""Ensembles of surrogate models for transfer attacks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import NenniError


class LogitEnsemble(nn.Module):
    """The mean of several models' logits (Liu et al. 2017; Dong et al. 2018 fuse logits the same way):
    one gradient that must fool every member at once, which transfers better than any single surrogate."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise NenniError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)
