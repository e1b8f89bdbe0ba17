"""The attack suite: which attacks apply to a target, each as a row with the exact config that determines it.

Every row crafts adversarial images on a PyTorch model (the target's source, or surrogates for transfer); the
evaluation then replays them on the target as deployed. Attacks that do not apply are skipped with a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attacks import PGD, LogitEnsemble, autoattack, feature_objective, features, mi_fgsm, straight_through
from ..errors import NenniError
from ..models.stages import stage_outputs
from ..nenni.layers import nenni_layers
from .targets import Target, TorchModel

ATTACKS = ("pgd", "autoattack", "bpda", "eot", "pgd-cs", "transfer")
# Attacks that need nothing but the deployed model's outputs (evaluation.blackbox builds their rows).
QUERY_ATTACKS = ("square", "hsj")
TRANSFER_METHODS = ("pgd", "mifgsm", "di", "mi-di")
# Families that differentiate the target's own PyTorch model: the masking checks compare the others to these.
GRADIENT_FAMILIES = ("white-box", "adaptive", "feature")

# (x, y, eps) -> (adversarial x, warnings)
Craft = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, list[str]]]


@dataclass
class Settings:
    """Everything besides the model and the images that decides the outcome (it is part of each cache key)."""

    norm: str = "linf"
    steps: int = 50
    restarts: int = 1
    alpha_factor: float = 2.5  # step = alpha_factor * eps / steps
    eot: int = 20
    aa_version: str = "auto"  # auto: standard for deterministic targets, rand for randomised ones
    aa_attacks: list[str] | None = None  # a cheaper custom subset (version "custom")
    aa_iters: int | None = None  # None: the package's 100 iterations
    cs_layers: list[str] | None = None  # None: each stage of the network in turn
    transfer_steps: int = 20
    transfer_methods: list[str] = field(default_factory=lambda: ["pgd", "mi-di"])
    diversity: float = 0.5
    seed: int = 0
    batch_size: int = 250
    queries: int = 5000  # Square's budget per image
    p_init: float = 0.8  # Square's initial square size (AutoAttack's)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1 or self.eot < 1 or self.transfer_steps < 1 or self.queries < 1:
            raise NenniError("steps, restarts, eot samples, transfer steps and queries must each be >= 1")
        unknown = sorted(set(self.transfer_methods) - set(TRANSFER_METHODS))
        if unknown or not self.transfer_methods:
            raise NenniError(f"transfer methods must be from {', '.join(TRANSFER_METHODS)}, got {unknown or 'none'}")

    def pgd(self, eps: float, **kw: Any) -> PGD:
        base = dict(eps=eps, steps=self.steps, alpha=self.alpha_factor * eps / self.steps, norm=self.norm)
        base.update(restarts=self.restarts, seed=self.seed)
        base.update(kw)
        return PGD(**base)


def _config(pgd: PGD, /, **extra: Any) -> dict[str, Any]:
    """An attack's settings without its budget (the budget is keyed separately); the step as a rule of eps."""
    d = pgd.to_dict()
    d.pop("eps")
    d["alpha"] = f"{pgd.step_size / pgd.eps:g} * eps"
    return {**extra, **d}


@dataclass
class Row:
    name: str
    family: str  # white-box, adaptive, feature, transfer, score-based, replay
    config: dict[str, Any]
    craft: Craft
    uses_eot: bool = False
    # craft also takes start= (the chunk's first index) and progress= (round, images left, queries spent), and
    # may return a third element: per-image information kept with the result (e.g. queries)
    context: bool = False
    min_eps: float | None = None  # the row applies only at budgets at least this (a replayed file's budget)


def parse_attacks(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = ATTACKS + QUERY_ATTACKS
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise NenniError(f"unknown attack {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def default_cs_layers(module: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Each stage's output (the last feature map at each resolution, found by running the model once)."""
    return stage_outputs(module, input_shape)


def every_layer(module: nn.Module) -> list[str]:
    """PGD-CS "each layer in turn": every NENNI layer, else every convolution."""
    return list(nenni_layers(module)) or [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]


def _with_gradient(model: TorchModel, via: str | None):
    return straight_through(model.module, via) if via else nullcontext()


def _pgd_craft(model: TorchModel, make: Callable[[float], PGD], via: str | None = None, objective=None) -> Craft:
    def craft(x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, list[str]]:
        with _with_gradient(model, via):
            obj = objective(x) if objective else None
            return make(eps).perturb(model.module, x, y, obj), []

    return craft


def plan(
    target: Target,
    attacks: list[str] | None,
    settings: Settings,
    surrogates: list[TorchModel],
    input_shape: tuple[int, ...] | None = None,
) -> tuple[list[Row], dict[str, str]]:
    """The rows to run and, for every requested attack that does not apply, why."""
    explicit = attacks is not None
    attacks = attacks if explicit else list(ATTACKS)
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    src = target.source
    random = target.randomised
    eot = settings.eot if random else 1
    white_box = [a for a in attacks if a != "transfer" and a not in QUERY_ATTACKS]
    if white_box and src is None:
        raise NenniError(
            f"{', '.join(white_box)} attack the PyTorch model: give --source MODEL_DIR (the model directory "
            f"{target.label} was exported from), or run only --attack transfer with --surrogate"
        )
    via = "exact" if target.nenni else None  # NENNI's top-k hides gradients: feature attacks go through BPDA
    for attack in attacks:
        if attack in QUERY_ATTACKS:
            continue  # built by evaluation.blackbox
        if attack == "pgd":
            for loss in ("ce", "margin"):
                make = lambda eps, loss=loss: settings.pgd(eps, loss=loss)  # noqa: E731
                cfg = _config(settings.pgd(1.0, loss=loss), attack="pgd", gradient="true")
                rows.append(Row(f"pgd-{loss}", "white-box", cfg, _pgd_craft(src, make)))
        elif attack == "autoattack":
            version = settings.aa_version
            if version == "auto":
                version = "custom" if settings.aa_attacks else ("rand" if random else "standard")
            if version == "standard" and random:
                skipped["autoattack-standard"] = "the target is randomised: AutoAttack 'rand' (EOT) applies instead"
                version = "rand"
            cfg = {"attack": "autoattack", "version": version, "attacks": settings.aa_attacks, "norm": settings.norm}
            cfg.update(seed=settings.seed, iterations=settings.aa_iters)
            rows.append(Row(f"autoattack-{version}", "white-box", cfg, _aa_craft(src, settings, version), random))
        elif attack == "bpda":
            if not target.nenni:
                skipped["bpda"] = "the target has no NENNI layers: there is no selection to straight-through"
                continue
            for surrogate in ("exact", "approx"):
                make = lambda eps: settings.pgd(eps, loss="ce", eot=eot)  # noqa: E731
                cfg = _config(settings.pgd(1.0, eot=eot), attack="bpda", gradient=surrogate)
                name = f"bpda-{surrogate}" + ("+eot" if random else "")
                rows.append(Row(name, "adaptive", cfg, _pgd_craft(src, make, surrogate), random))
        elif attack == "eot":
            if not random:
                skipped["eot"] = "the forward pass is deterministic: EOT would average identical gradients"
                continue
            make = lambda eps: settings.pgd(eps, loss="ce", eot=settings.eot)  # noqa: E731
            cfg = _config(settings.pgd(1.0, eot=settings.eot), attack="eot", gradient="true")
            rows.append(Row(f"eot-{settings.eot}", "adaptive", cfg, _pgd_craft(src, make), True))
        elif attack == "pgd-cs":
            layers = settings.cs_layers or (default_cs_layers(src.module, input_shape) if input_shape else [])
            if layers == ["all"]:
                layers = every_layer(src.module)
            if not layers:
                skipped["pgd-cs"] = "no intermediate layer to attack (name one with --cs-layers)"
                continue
            for layer in layers:
                make = lambda eps: settings.pgd(eps, eot=eot)  # noqa: E731
                cfg = _config(settings.pgd(1.0, eot=eot), attack="pgd-cs", layer=layer, gradient=via or "true")
                objective = lambda x, layer=layer: feature_objective(layer, features(src.module, x, layer))  # noqa: E731
                rows.append(Row(f"pgd-cs:{layer}", "feature", cfg, _pgd_craft(src, make, via, objective), random))
        elif attack == "transfer":
            if not surrogates:
                skipped["transfer"] = (
                    "no surrogate: a dense target is its own base model; name independent ones with --surrogate"
                )
                continue
            rows.extend(_transfer_rows(surrogates, settings))
    return rows, skipped


def _aa_craft(model: TorchModel, settings: Settings, version: str) -> Craft:
    def craft(x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, list[str]]:
        return autoattack(
            model.module,
            x,
            y,
            eps,
            norm=settings.norm,
            version=version,
            attacks=settings.aa_attacks if version == "custom" else None,
            seed=settings.seed,
            batch_size=settings.batch_size,
            iterations=settings.aa_iters,
        )

    return craft


def _transfer_attack(method: str, settings: Settings, eps: float) -> PGD:
    steps = settings.transfer_steps
    if method == "pgd":
        return PGD(
            eps=eps, steps=steps, alpha=settings.alpha_factor * eps / steps, norm=settings.norm, seed=settings.seed
        )
    if method == "di":
        return PGD(
            eps=eps,
            steps=steps,
            alpha=settings.alpha_factor * eps / steps,
            norm=settings.norm,
            diversity=settings.diversity,
            seed=settings.seed,
        )
    diversity = settings.diversity if method == "mi-di" else 0.0
    attack = mi_fgsm(eps, steps=steps, diversity=diversity, seed=settings.seed)
    attack.norm = settings.norm
    return attack


def _transfer_rows(surrogates: list[TorchModel], settings: Settings) -> list[Row]:
    sources = [(m.label, m.module, [m.identity]) for m in surrogates]
    if len(surrogates) > 1:
        ensemble = LogitEnsemble([m.module for m in surrogates]).eval()
        sources.append(("ensemble", ensemble, [m.identity for m in surrogates]))
    rows = []
    for label, module, identities in sources:
        for method in settings.transfer_methods:

            def craft(x, y, eps, module=module, method=method):
                return _transfer_attack(method, settings, eps).perturb(module, x, y), []

            attack = _transfer_attack(method, settings, 1.0)
            cfg = _config(attack, attack="transfer", method=method, surrogate=label, surrogate_identity=identities)
            rows.append(Row(f"transfer-{method}:{label}", "transfer", cfg, craft))
    return rows
