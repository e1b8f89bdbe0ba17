"""`evaluate(target, x, y, config) -> EvalReport`: robust accuracy of a model as deployed, as one plain function.

`nenni eval` is a thin adapter over it (options -> config -> evaluate -> print / write). What runs depends on
the target: a PyTorch target (or an ONNX file with the PyTorch model it was exported from) gets the white-box,
adaptive, feature and transfer suite; an ONNX file alone gets what needs nothing but the file: transfer from
surrogates and Square on the session's scores. A file of adversarial images crafted elsewhere is replayed on
any target. Every row's images are replayed on the deployed model; the report is the same either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attacks.budget import parse_eps_list
from ..errors import NenniError
from .advfile import AdversarialSet
from .blackbox import BlackBoxTarget, hsj_row, replay_rows, square_row, throughput
from .run import Cache, Evaluation, applies, digest, images_digest, sanity_warnings, to_json, worst_case
from .suite import ATTACKS, QUERY_ATTACKS, Row, Settings, plan
from .targets import Target, TorchModel, describe

PRESET_NAMES = ("quick", "standard", "full")
PROBE_QUERIES = 1000  # Square's budget in the large-eps check, whatever the run's


@dataclass(frozen=True)
class Preset:
    """Attack settings and, when --attack is not given, which attacks run (None: every one that applies)."""

    name: str
    settings: dict[str, Any]
    white_box_attacks: tuple[str, ...] | None
    black_box_attacks: tuple[str, ...]
    summary: str


PRESETS = {
    # The cheapest attacks that still catch gradient masking: APGD's adaptive step with the scale-free DLR
    # loss, BPDA on NENNI, a transfer attack, Square where there is no gradient, and the large-eps check.
    "quick": Preset(
        "quick",
        dict(
            steps=10,
            eot=5,
            aa_version="custom",
            aa_attacks=["apgd-ce", "apgd-dlr"],
            aa_iters=20,
            transfer_steps=10,
            transfer_methods=["pgd"],
            queries=1000,
        ),  # fmt: skip
        ("pgd", "autoattack", "bpda", "eot", "transfer"),
        ("transfer", "square"),
        "PGD-10, APGD-CE + APGD-DLR (20 iterations), BPDA, EOT-5, transfer PGD-10; black-box: Square 1,000",
    ),
    "standard": Preset(
        "standard",
        dict(
            steps=20,
            eot=10,
            aa_version="custom",
            aa_attacks=["apgd-ce", "apgd-t"],
            aa_iters=100,
            transfer_steps=10,
            queries=2000,
        ),  # fmt: skip
        None,
        ("transfer", "square"),
        "PGD-20, APGD-CE + APGD-T (100 iterations), BPDA, EOT-10, PGD-CS, transfer (PGD, MI-DI, 10 steps); "
        "black-box: Square 2,000",
    ),
    "full": Preset(
        "full",
        {},
        None,
        ("transfer", "square"),
        "PGD-50, AutoAttack standard (rand when randomised), BPDA, EOT-20, PGD-CS, transfer (PGD, MI-DI, 20 "
        "steps); black-box: Square 5,000",
    ),
}


def settings_for(preset: str = "full", **overrides: Any) -> Settings:
    """The preset's Settings with `overrides` (None values ignored: the option was not given)."""
    if preset not in PRESETS:
        raise NenniError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise NenniError(f"unknown evaluation settings: {', '.join(unknown)}")
    values = {**PRESETS[preset].settings, **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("aa_version") not in (None, "custom") and overrides.get("aa_attacks") is None:
        values.pop("aa_attacks", None)  # a preset's subset belongs to its custom version only
    return Settings(**values)


@dataclass
class EvalConfig:
    """Everything besides the target, the images and the surrogates that decides what runs."""

    eps: list[tuple[str, float]] | str = "8/255"
    settings: Settings = field(default_factory=Settings)
    preset: str = "full"
    attacks: list[str] | None = None  # None: the preset's choice for this kind of target
    chunk: int = 100
    cache: Path | None = None
    progress: bool = True
    keep_adversarial: bool = False  # keep one adversarial image per image and eps (for --save-adv)
    estimate: bool = True  # time a few passes first and report the expected duration

    def __post_init__(self) -> None:
        if isinstance(self.eps, str):
            self.eps = parse_eps_list(self.eps, self.settings.norm)
        if self.preset not in PRESETS:
            raise NenniError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESET_NAMES)}")
        if self.chunk < 1:
            raise NenniError(f"chunk must be >= 1, got {self.chunk}")
        if self.settings.aa_attacks and self.settings.aa_version not in ("auto", "custom"):
            raise NenniError("--aa-attacks chooses a custom AutoAttack subset: use it with --aa-version custom")
        if self.settings.aa_version == "custom" and not self.settings.aa_attacks:
            raise NenniError("--aa-version custom needs --aa-attacks, e.g. apgd-ce,apgd-t")


@dataclass
class EvalReport:
    key: str
    target: dict[str, Any]
    data: dict[str, Any]
    norm: str
    eps: list[str]
    eps_values: list[float]
    clean_accuracy: float
    clean_accuracy_pytorch: float | None
    clean_agreement: float | None
    attacks: dict[str, dict[str, Any]]
    skipped: dict[str, str]
    worst: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    sanity: dict[str, Any]
    cache: str | None
    seconds: float
    preset: str
    notes: list[str] = field(default_factory=list)
    estimate: dict[str, Any] | None = None
    # per eps label: one adversarial image per image, and the attack it came from ("" where none fooled it)
    adversarial: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    fooled_by: dict[str, list[str]] = field(default_factory=dict, repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)  # the images' labels (for --save-adv)

    def to_json(self) -> dict[str, Any]:
        w = self.worst
        return {
            "key": self.key,
            "target": self.target,
            "data": self.data,
            "norm": self.norm,
            "eps": self.eps,
            "eps_values": self.eps_values,
            "clean_accuracy": self.clean_accuracy,
            "clean_accuracy_pytorch": self.clean_accuracy_pytorch,
            "clean_agreement": self.clean_agreement,
            "attacks": self.attacks,
            "skipped": self.skipped,
            "worst_case": {k: v["accuracy"] for k, v in w.items()},
            "worst_case_attack": {k: v["attack"] for k, v in w.items()},
            "worst_case_per_image": {k: v["per_image"] for k, v in w.items()},
            "worst_case_detail": w,
            "settings": self.settings,
            "preset": self.preset,
            "sanity": self.sanity,
            "notes": self.notes,
            "estimate": self.estimate,
            "cache": self.cache,
            "seconds": self.seconds,
        }


def is_black_box(target: Target) -> bool:
    return isinstance(target, BlackBoxTarget)


def plan_rows(
    target: Target,
    config: EvalConfig,
    surrogates: Sequence[TorchModel] = (),
    replay: AdversarialSet | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> tuple[list[Row], dict[str, str]]:
    """The rows to run and, for every attack that does not apply, why (`input_shape` finds PGD-CS's layers)."""
    preset = PRESETS[config.preset]
    settings = config.settings
    black = is_black_box(target)
    if config.attacks is not None:
        wanted = list(config.attacks)
    elif black or target.source is None:
        wanted = list(preset.black_box_attacks)
    else:
        wanted = list(preset.white_box_attacks or ATTACKS)
    gradient = [a for a in wanted if a in ATTACKS]
    rows, skipped = plan(target, gradient, settings, list(surrogates), input_shape) if gradient else ([], {})
    if "transfer" in skipped and target.source is None:
        skipped["transfer"] = "no surrogate: name models to craft on with --surrogate (ARCH=WEIGHTS, a model DIR)"
    label_only = black and target.label_only
    if "square" in wanted:
        if label_only:
            skipped["square"] = "the graph outputs labels only: Square needs scores (HopSkipJump runs instead)"
        else:
            rows.append(square_row(target, settings))
    if "hsj" in wanted or (label_only and "square" in wanted):
        rows.append(hsj_row(target, settings))
    if replay is not None:
        rows.extend(replay_rows(replay, config.eps))
    return rows, skipped


def evaluate(
    target: Target,
    x: torch.Tensor,
    y: torch.Tensor,
    config: EvalConfig,
    *,
    surrogates: Sequence[TorchModel] = (),
    replay: AdversarialSet | None = None,
    notes: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> EvalReport:
    """Attack `target` on (x, y) with every row the config and target allow; reduce to a worst case per eps and
    check the evaluation for the signs of one that cannot be trusted. A black-box target is bound to the data
    here unless the caller did (`BlackBoxTarget.bind`, which also checks the class count); the caller closes it."""
    start = time.perf_counter()
    settings = config.settings
    say = log or (lambda _m: None)
    if len(x) != len(y) or len(x) == 0:
        raise NenniError(f"need as many labels as images (and at least one): got {len(x)} images, {len(y)} labels")
    if is_black_box(target):
        spec = target.classifier.spec
        if spec.output is None:
            target.bind(x, None)  # not bound by the caller: the class count is checked against the labels below
        if spec.num_classes and int(y.max()) >= spec.num_classes:
            raise NenniError(f"the labels go up to {int(y.max())} but {target.label} scores {spec.num_classes} classes")
    rows, skipped = plan_rows(target, config, surrogates, replay, tuple(x.shape[1:]))
    if not rows:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no attack was chosen"
        raise NenniError("no attack applies to this target: " + reasons)
    notes = [*notes, *getattr(target, "notes", [])]
    if replay is not None:
        notes += replay.notes
    for note in notes:
        say(f"note: {note}")
    eps_list = list(config.eps)
    ev = Evaluation(
        target,
        x,
        y,
        settings,
        chunk=config.chunk,
        cache=Cache(config.cache),
        progress=config.progress,
        keep_adversarial=config.keep_adversarial,
    )
    torch.manual_seed(settings.seed)
    estimate = None
    if config.estimate:
        estimate = estimate_seconds(ev, rows, eps_list, target, surrogates)
        say(_estimate_text(estimate))
    clean = ev.clean()
    results = ev.run(rows, eps_list, clean["correct"])
    randomness = ev.randomness()
    probe = _probe_row(rows)
    if probe is not None and probe.name == "square":
        # The check must not fail for want of queries: at this budget a working search breaks images quickly.
        probe = square_row(target, replace(settings, queries=max(settings.queries, PROBE_QUERIES)))
    large = ev.large_eps(probe) if probe is not None else None
    labels = [label for label, _ in eps_list]
    worst = worst_case(results, labels)
    warnings = sanity_warnings(results, labels, worst, randomness, target, large)
    for r in results:
        warnings += [f"{r.name}: {w}" for w in r.warnings]
    if is_black_box(target):
        warnings += _black_box_warnings(target, x, rows)
    key = digest(
        {
            "target": target.identity,
            "images": images_digest(x, y),
            "attacks": [r.config for r in rows],
            "eps": [v for _, v in eps_list],
            "settings": settings.__dict__,
        }
    )
    described = describe(target)
    if is_black_box(target):
        described["classifier"] = target.classifier.describe()
    return EvalReport(
        key=key,
        target=described,
        data={"images": len(x)},
        norm=settings.norm,
        eps=labels,
        eps_values=[v for _, v in eps_list],
        clean_accuracy=clean["accuracy"],
        clean_accuracy_pytorch=clean.get("accuracy_pytorch"),
        clean_agreement=clean.get("agreement"),
        attacks={r.name: to_json(r) for r in results},
        skipped=skipped,
        worst=worst,
        settings=dict(settings.__dict__),
        sanity={"randomness": randomness, "large_eps": large, "warnings": warnings},
        cache=str(config.cache) if config.cache else None,
        seconds=time.perf_counter() - start,
        preset=config.preset,
        notes=notes,
        estimate=estimate,
        adversarial=ev.adversarial,
        fooled_by={k: [w or "" for w in v] for k, v in ev.fooled_by.items()},
        labels=y,
    )


def _probe_row(rows: list[Row]) -> Row | None:
    """The attack the large-eps check runs: BPDA (with EOT) on NENNI, EOT on noise, else PGD-CE or AutoAttack;
    with no gradient of the target, Square (HopSkipJump on labels), else a transfer attack."""
    for prefix in ("bpda-exact", "eot", "pgd-ce", "autoattack", "square", "hsj", "transfer-pgd", "transfer"):
        for r in rows:
            if r.name.startswith(prefix):
                return r
    return None


def _black_box_warnings(target: BlackBoxTarget, x: torch.Tensor, rows: list[Row]) -> list[str]:
    out = []
    if any(r.name == "square" for r in rows):
        saturated = target.classifier.saturation(x[: min(len(x), 256)])
        if saturated > 0:
            out.append(
                f"the graph's probabilities are exactly 1.0 on {saturated:.1f} % of clean images: the other classes "
                "underflow there, so Square sees a flat loss; its accuracy may overstate robustness (export logits)"
            )
    return out


# -- how long it will take -------------------------------------------------------------------------------------
def _pass_seconds(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds per image of one forward and backward pass (an attack step) of `module`."""
    batch = x[: min(len(x), 16)].clone()

    def step() -> None:
        xr = batch.clone().requires_grad_(True)
        with torch.enable_grad():
            out = module(xr)
            (g,) = torch.autograd.grad(out.sum(), xr)

    step()
    start, done = time.perf_counter(), 0
    while done < 3 or time.perf_counter() - start < 0.3:
        step()
        done += 1
    return (time.perf_counter() - start) / done / len(batch)


def _row_passes(row: Row, settings: Settings) -> tuple[str, float, float]:
    """(which model the row runs, passes per image at least, passes per image at most)."""
    c = row.config
    kind = c.get("attack")
    if kind in ("pgd", "bpda", "eot", "pgd-cs"):
        n = c.get("steps", settings.steps) * c.get("restarts", 1) * c.get("eot", 1)
        return "source", n, n
    if kind == "autoattack":
        iters = c.get("iterations") or 100
        version = c.get("version")
        if version == "rand":
            return "source", 20 * iters, 2 * 20 * iters
        attacks = c.get("attacks") or ["apgd-ce", "apgd-t", "fab-t", "square"]
        cost = {"apgd-ce": iters, "apgd-dlr": iters, "apgd-t": 9 * iters, "fab": 2 * iters, "fab-t": 18 * iters}
        each = [cost.get(a, 5000 / 3) for a in attacks]  # Square's queries are forward passes only
        return "source", each[0], sum(each)
    if kind == "transfer":
        return f"surrogate:{c.get('surrogate')}", c.get("steps", settings.transfer_steps), c.get("steps", 0)
    if kind in ("square", "hopskipjump"):
        q = c.get("queries", settings.queries)
        return "target", max(q / 100, 1), q
    return "target", 1, 1


def estimate_seconds(
    ev: Evaluation, rows: list[Row], eps_list: list[tuple[str, float]], target: Target, surrogates: Sequence[TorchModel]
) -> dict[str, Any]:
    """A range for the run, from a second of timing: low where attacks that stop early (AutoAttack's later
    stages, Square) break every image at once, high where no image breaks; chunks in the cache cost nothing."""
    x = ev.x
    per_target = 1 / throughput(target, x, ev.settings.batch_size, seconds=0.3)
    cost = {"target": per_target}
    if target.source is not None:
        cost["source"] = _pass_seconds(target.source.module, x)
    for m in surrogates:
        cost[f"surrogate:{m.label}"] = _pass_seconds(m.module, x)
    if len(surrogates) > 1:
        cost["surrogate:ensemble"] = sum(cost[f"surrogate:{m.label}"] for m in surrogates)
    low = high = 0.0
    cached = todo = 0
    for row in rows:
        model, lo, hi = _row_passes(row, ev.settings)
        each = cost.get(model, per_target)
        for _, eps in eps_list:
            if not applies(row, eps):
                continue
            for i, (a, b) in enumerate(ev.chunks):
                if ev.cache.get(ev._key(row.config, eps, i)) is not None:
                    cached += 1
                    continue
                todo += 1
                n = b - a
                low += n * (lo * each + per_target)
                high += n * (hi * each + per_target)
    return {"low_seconds": low, "high_seconds": high, "chunks_cached": cached, "chunks_to_run": todo}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _estimate_text(e: dict[str, Any]) -> str:
    cached = f"; {e['chunks_cached']} chunks already in the cache" if e["chunks_cached"] else ""
    if e["chunks_to_run"] == 0:
        return f"estimated time: only the cached results to read{cached}"
    low, high = _duration(e["low_seconds"]), _duration(e["high_seconds"])
    span = low if low == high else f"{low} to {high}"
    return (
        f"estimated time: {span} on this machine as loaded now (the low end if attacks that stop early break "
        f"images at once, the high end if nothing breaks){cached}"
    )


__all__ = [
    "PRESETS",
    "PRESET_NAMES",
    "EvalConfig",
    "EvalReport",
    "Preset",
    "QUERY_ATTACKS",
    "estimate_seconds",
    "evaluate",
    "plan_rows",
    "settings_for",
]
