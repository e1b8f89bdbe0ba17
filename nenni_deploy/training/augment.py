"""Batched data augmentation on tensors: one gather per batch, no per-image Python loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NenniError

# kind -> (zero padding, horizontal flip). A random crop of the padded image is a random shift.
KINDS = {"none": (0, False), "crop_flip": (4, True), "translate": (1, False)}


def resolve_augment(name: str, image_shape: tuple[int, ...]) -> str:
    """'auto' -> 'crop_flip' for 32x32 colour images (CIFAR), else 'translate' (digits must not be mirrored)."""
    if name != "auto":
        if name not in KINDS:
            raise NenniError(f"unknown augmentation {name!r}; choose auto, {', '.join(KINDS)}")
        return name
    c, h, w = image_shape[-3:]
    return "crop_flip" if (c == 3 and h >= 32 and w >= 32) else "translate"


def random_shift(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every image by its own offset in [-pad, pad]^2, filling with zeros (= crop of the zero-padded image)."""
    if pad == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment an NCHW batch; values stay in the input's range (zero padding, pixels only move)."""
    pad, flip = KINDS[kind]
    x = random_shift(x, pad, generator)
    return random_flip(x, generator) if flip else x
