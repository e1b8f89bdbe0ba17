"""AutoAttack (Croce and Hein 2020) through the official package, `pyautoattack`: never re-implemented here."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import NenniError

VERSIONS = ("standard", "rand", "custom")
# What set_iterations reaches into: APGD derives its step-size checkpoints from n_iter in __init__ and the
# package has no setter. Tested with pyautoattack 0.2 (pinned in pyproject.toml); tests/test_attacks_core.py
# fails if a release renames or re-derives them.
APGD_SCHEDULE = ("n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
NORMS = {"linf": "Linf", "l2": "L2"}


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    version: str = "standard",
    attacks: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 250,
    iterations: int | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """AutoAttack's adversarial examples for (x, y) and the warnings of its own sanity checks (randomness,
    dynamic defence, Square beating the gradient attacks). `standard` for deterministic models, `rand` (APGD with 20
    EOT draws) for randomised ones, `custom` runs only `attacks` (a cheaper subset, stated in every report).
    `iterations` overrides the package's 100 APGD/FAB iterations (a cheaper, weaker run; reported as such)."""
    from pyautoattack import AutoAttack

    if version not in VERSIONS:
        raise NenniError(f"AutoAttack version must be one of {', '.join(VERSIONS)}, got {version!r}")
    if norm not in NORMS:
        raise NenniError(f"AutoAttack norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if version == "custom":
        unknown = sorted(set(attacks or []) - set(ATTACKS))
        if not attacks or unknown:
            raise NenniError(f"custom AutoAttack needs attacks from {', '.join(ATTACKS)}; got {attacks!r}")
    elif attacks:
        raise NenniError("AutoAttack attacks can only be chosen with version 'custom'")
    adversary = AutoAttack(
        model,
        attacks=list(attacks) if version == "custom" else None,
        device=x.device,
        eps=float(eps),
        norm=NORMS[norm],
        seed=seed,
        version=version,
    )
    if iterations is not None:
        if iterations < 1:
            raise NenniError(f"AutoAttack iterations must be >= 1, got {iterations}")
        set_iterations(adversary, int(iterations))
    # Its per-attack debug lines would interleave with our progress bars; its warnings are kept for the report.
    collected = _Collect()
    adversary.logger.setLevel(logging.WARNING)
    adversary.logger.propagate = False
    adversary.logger.addHandler(collected)
    try:
        x_adv, _ = adversary.run_standard_evaluation(x.detach(), y.detach(), batch_size=batch_size)
    finally:
        adversary.logger.removeHandler(collected)
    return x_adv.detach(), collected.messages


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


def set_iterations(adversary, iterations: int) -> None:
    """Run AutoAttack's APGD and FAB for `iterations` instead of the package's 100 (a cheaper, weaker run).

    The step-size schedule is taken from a fresh APGD the package itself builds with that many iterations, so
    it follows the package's own rules; only the attributes in APGD_SCHEDULE are copied."""
    from pyautoattack.autopgd_base import APGDAttack

    reference = APGDAttack(adversary.model, n_iter=iterations, eps=adversary.epsilon, norm=adversary.norm)
    for attack in (adversary.apgd, adversary.apgd_targeted):
        for name in APGD_SCHEDULE:
            setattr(attack, name, getattr(reference, name))
    adversary.fab.n_iter = iterations
