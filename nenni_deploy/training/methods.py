"""Training methods: what loss a batch contributes. Adversarial methods (PGD-AT, TRADES, MART, SLIM) plug in
here and reuse the one loop in `loop.py`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class Method(Protocol):
    """`loss` returns the scalar to minimise and the logits that training accuracy is read from.

    It is called with the model in training mode; a method that crafts inputs may switch modes inside, and
    must leave the model as it found it. `to_dict` (optional) records the method's settings with checkpoints.
    """

    name: str

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Standard:
    """Plain cross-entropy on the (augmented) clean batch."""

    label_smoothing: float = 0.0
    name: str = "standard"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def method_record(method: Method) -> dict[str, Any]:
    """The method's settings as stored in last.json; a resume refuses a different record."""
    to_dict = getattr(method, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {"name": method.name}
