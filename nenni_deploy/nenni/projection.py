"""The fixed sparse ternary (Achlioptas) random projection P in sqrt(3/k) * {-1, 0, +1}^(k x d)."""

from __future__ import annotations

import numpy as np
import torch

# Achlioptas: +1 / 0 / -1 with probability 1/6, 2/3, 1/6, so E[P^T P] = I and ||P x|| ~ ||x||.
P_NONZERO = 1.0 / 3.0


def ternary_projection(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A k x (C_in, kh, kw) or k x d projection, drawn with numpy's PCG64 so a seed means the same P everywhere.

    The first dimension is k. Values are exactly sqrt(3/k) * {-1, 0, +1} in float32.
    """
    k = shape[0]
    u = np.random.Generator(np.random.PCG64(seed)).random(shape)
    signs = np.where(u < P_NONZERO / 2, 1.0, np.where(u >= 1.0 - P_NONZERO / 2, -1.0, 0.0))
    return torch.from_numpy((signs * np.sqrt(3.0 / k)).astype(np.float32))


def layer_seed(global_seed: int, layer_index: int) -> int:
    """Each layer gets its own stream; mixing keeps seeds of neighbouring layers unrelated."""
    return int(np.random.SeedSequence([int(global_seed), int(layer_index)]).generate_state(1)[0])


def nonzeros(proj: torch.Tensor) -> int:
    """Additions per output position that multiplying by P costs."""
    return int(torch.count_nonzero(proj))
