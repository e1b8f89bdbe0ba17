"""Fake quantisation of the approximator weights (per output channel, symmetric), straight-through in backward."""

from __future__ import annotations

import torch


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Round each output row of `w` (dim 0) to a symmetric `bits`-bit grid; identity gradient; 32 bits = float."""
    if bits >= 32:
        return w
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-12)
    scale = (amax / qmax).view(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
    return w + (q - w).detach()
