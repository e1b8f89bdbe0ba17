"""Projected gradient descent: the one iterative attack that evaluation and adversarial training share.

Inputs live in [0, 1] (models normalise inside). Every attack here is deterministic under its seed for a
deterministic model, never touches parameter gradients (it differentiates w.r.t. the perturbation only) and
leaves the model's train/eval mode alone: callers choose it (training attacks in eval mode, for batch norm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NenniError

# (model, x_adv, y) -> per-sample loss the attack maximises.
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin")


def ce_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: best wrong logit minus the true one (positive once misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(1) - true


def margin_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return margin_loss(model(x), y)


OBJECTIVES: dict[str, Objective] = {"ce": ce_objective, "margin": margin_objective}


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)


@dataclass
class PGD:
    """PGD (Madry et al.) under an Linf or L2 budget, with random start, restarts and EOT.

    Two transfer-attack options ride on the same loop: `momentum` > 0 is MI-FGSM (Dong et al. 2018: the step
    follows an accumulated, L1-normalised gradient) and `diversity` > 0 is DI (Xie et al. 2019: with that
    probability per step, the model sees a randomly shrunk and padded copy of the input), both to craft examples
    on a surrogate that generalise to other models instead of overfitting the surrogate's gradient.

    `alpha` defaults to 2.5 * eps / steps, enough to cross the ball from any start. `eot` > 1 averages the
    gradient over that many forward passes (expectation over transformation), for models whose forward pass is
    random. With `restarts` > 1 a sample keeps the first restart that fools the model, else the one with the
    highest loss. `steps=1, alpha=1.25*eps` is FGSM with random start ("fast AT", Wong et al. 2020).
    """

    eps: float
    steps: int = 10
    alpha: float | None = None
    norm: str = "linf"
    loss: str = "ce"
    random_start: bool = True
    restarts: int = 1
    eot: int = 1
    seed: int = 0
    momentum: float = 0.0
    diversity: float = 0.0

    def __post_init__(self) -> None:
        if not (self.eps >= 0 and self.eps == self.eps):
            raise NenniError(f"eps must be >= 0, got {self.eps}")
        if self.steps < 1 or self.restarts < 1 or self.eot < 1:
            raise NenniError("steps, restarts and eot must each be >= 1")
        if self.norm not in NORMS:
            raise NenniError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.loss not in LOSSES:
            raise NenniError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise NenniError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.momentum <= 10:
            raise NenniError(f"momentum must be in [0, 10], got {self.momentum}")
        if not 0 <= self.diversity <= 1:
            raise NenniError(f"diversity (a probability) must be in [0, 1], got {self.diversity}")

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- pieces -----------------------------------------------------------------------------------------------
    def _start(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if not self.random_start or self.eps == 0:
            return torch.zeros_like(x)
        if self.norm == "linf":
            noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            return (2 * noise - 1) * self.eps
        # Uniform direction, radius uniform in [0, eps].
        d = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        r = torch.rand((x.shape[0],), generator=gen, device=x.device, dtype=x.dtype)
        return d / _per_sample_norm(d) * (r * self.eps).view(-1, *([1] * (x.dim() - 1)))

    def _diverse(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """DI: with probability `diversity`, shrink to a random size in [0.9 H, H) and pad back at a random offset
        (the CIFAR-sized variant: the model keeps its input size)."""
        h, w = x.shape[-2:]
        if h < 2 or float(torch.rand((), generator=gen, device=gen.device)) >= self.diversity:
            return x
        low = min(max(1, int(0.9 * h)), h - 1)
        size = int(torch.randint(low, h, (), generator=gen, device=gen.device))
        small = F.interpolate(x, size=(size, size * w // h), mode="nearest")
        top = int(torch.randint(0, h - size + 1, (), generator=gen, device=gen.device))
        left = int(torch.randint(0, w - small.shape[-1] + 1, (), generator=gen, device=gen.device))
        return F.pad(small, (left, w - small.shape[-1] - left, top, h - size - top))

    def gradient(
        self,
        model: nn.Module,
        x_adv: torch.Tensor,
        y: torch.Tensor,
        objective: Objective,
        gen: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the summed objective w.r.t. the input (EOT-averaged) and the per-sample loss."""
        if self.diversity and gen is None:
            gen = torch.Generator(device=x_adv.device).manual_seed(self.seed)
        grad = torch.zeros_like(x_adv)
        total = torch.zeros(x_adv.shape[0], device=x_adv.device)
        for _ in range(self.eot):
            xr = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = objective(model, self._diverse(xr, gen) if self.diversity else xr, y)
                (g,) = torch.autograd.grad(loss.sum(), xr)
            grad += g
            total += loss.detach()
        return grad / self.eot, total / self.eot

    def _step(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return delta + self.step_size * grad.sign()
        return delta + self.step_size * grad / _per_sample_norm(grad)

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective, gen) -> torch.Tensor:
        delta = self._start(x, gen)
        delta = (x + delta).clamp(0, 1) - x
        velocity = torch.zeros_like(x)
        for _ in range(self.steps):
            grad, _ = self.gradient(model, x + delta, y, objective, gen)
            if self.momentum:
                l1 = grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
                velocity = self.momentum * velocity + grad / l1
                grad = velocity
            delta = project(self._step(delta, grad), self.eps, self.norm)
            delta = (x + delta).clamp(0, 1) - x
        return (x + delta).detach()

    # -- the attack -------------------------------------------------------------------------------------------
    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective | None = None
    ) -> torch.Tensor:
        """Adversarial examples for (x, y): within the budget of x and inside [0, 1]."""
        objective = objective or OBJECTIVES[self.loss]
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        x = x.detach()
        if self.restarts == 1:
            return self._run(model, x, y, objective, gen)
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            adv = self._run(model, x, y, objective, gen)
            with torch.no_grad():
                logits = model(adv)
                loss = objective(model, adv, y)
            now_fooled = logits.argmax(1) != y
            take = ~fooled & (now_fooled | (loss > best_loss))
            best[take] = adv[take]
            best_loss = torch.where(take, loss, best_loss)
            fooled |= now_fooled
            if bool(fooled.all()):
                break
        return best


def fgsm_rs(eps: float, alpha: float | None = None, seed: int = 0) -> PGD:
    """FGSM with random start, the single-step attack of fast adversarial training."""
    return PGD(eps=eps, steps=1, alpha=alpha if alpha is not None else 1.25 * eps, seed=seed)


def mi_fgsm(eps: float, steps: int = 10, momentum: float = 1.0, diversity: float = 0.0, seed: int = 0) -> PGD:
    """MI-FGSM (Dong et al. 2018) as published: no random start, step eps / steps, decay `momentum`; with
    `diversity` > 0 it is MI-DI-FGSM."""
    return PGD(
        eps=eps, steps=steps, alpha=eps / steps, random_start=False, momentum=momentum, diversity=diversity, seed=seed
    )
