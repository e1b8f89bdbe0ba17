"""Evaluating an ONNX classifier with nothing but the file: the target as a black box, the surrogates transfer
attacks are crafted on, and the rows that query the deployed session itself (Square) or replay a file.

A black-box target is a `Target` of kind "onnx" without a PyTorch source: every row either crafts on surrogates
(transfer), searches with the session's scores (Square), or replays images crafted elsewhere (`--adv-from`);
every adversarial image is then replayed on the session, as for any target.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..attacks.hopskipjump import HopSkipJump
from ..attacks.square import Square
from ..errors import NenniError, first_line
from ..runtime.classifier import OnnxClassifier, PixelConvention
from .advfile import AdversarialSet
from .suite import Row, Settings
from .targets import Target, TorchModel, identity_hash, load_surrogates


@dataclass
class BlackBoxTarget(Target):
    """An ONNX classifier known only by its file: scores come from the session through `OnnxClassifier`."""

    classifier: OnnxClassifier | None = None

    @property
    def randomised(self) -> bool:
        return bool(self.classifier.randomised)

    @property
    def nenni(self) -> bool:
        return bool(self.classifier.model.is_nenni)

    @property
    def label_only(self) -> bool:
        return self.classifier.spec.output == "labels"

    def logits(self, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """The session's scores; for a graph that gives labels only, their one-hot rows (argmax is the label)."""
        clf = self.runner()
        if self.label_only:
            labels = clf.labels(x)
            width = max(int(labels.max()) + 1, self.classifier.spec.num_classes or 2)
            out = np.zeros((len(labels), width), np.float32)
            out[np.arange(len(labels)), labels] = 1
            return out
        return clf.scores(x)

    def runner(self) -> OnnxClassifier:
        self.classifier.activate()
        return self.classifier

    def close(self) -> None:
        self.classifier.deactivate()

    def bind(self, x: torch.Tensor, num_classes: int | None) -> None:
        """Check the data fits the graph (shape, layout, classes) and learn what the output holds."""
        spec = self.classifier.bind(x, num_classes)
        if spec.output == "labels":
            spec.num_classes = num_classes  # the data's: the graph does not say
        if spec.batch:
            self.notes.append(f"the graph has a fixed batch of {spec.batch}: inputs are split and padded to it")
        if spec.output == "probabilities":
            self.notes.append("the graph outputs probabilities: attacks use their logarithm (margins as for logits)")
        if spec.output == "labels":
            self.notes.append("the graph outputs labels only: score-based attacks do not apply")


def load_blackbox_target(
    path: Path, pixels: PixelConvention, *, batch_size: int = 256, threads: int | None = None
) -> BlackBoxTarget:
    """An ONNX file as a black box; its identity covers the file and the pixel convention (both change outputs)."""
    from ..nenni.io import sha256_file

    clf = OnnxClassifier(path, pixels, batch_size=batch_size, threads=threads)
    meta = clf.model.metadata
    dataset = meta.get("nenni.dataset") or None
    identity = identity_hash("onnx-blackbox", sha256_file(path), json.dumps(pixels.to_dict(), sort_keys=True))
    return BlackBoxTarget(str(path), "onnx", identity, dataset, None, onnx=clf.model, classifier=clf)


# -- surrogates ---------------------------------------------------------------------------------------------------
def split_specs(values: tuple[str, ...] | list[str] | str | None) -> list[str]:
    """`--surrogate` is repeatable and takes comma-separated lists; both forms give one list, in order."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def load_surrogate_models(
    specs: list[str], target: Target, sample: torch.Tensor, num_classes: int | None
) -> list[TorchModel]:
    """Every surrogate form (`base`, a model directory, `DIR:dense`, `ARCH=WEIGHTS`, an entry point
    `file.py:fn=WEIGHTS`), each checked on two of the data's images: it must take them and score `num_classes`
    classes."""
    models = load_surrogates(specs, target)
    for model in models:
        check_surrogate(model, sample, num_classes)
    return models


def check_surrogate(model: TorchModel, sample: torch.Tensor, num_classes: int | None) -> None:
    try:
        with torch.no_grad():
            out = model.module(sample[:2])
    except Exception as exc:
        shape = "x".join(map(str, sample.shape[1:]))
        raise NenniError(f"surrogate {model.label} cannot take the data's {shape} images: {first_line(exc)}") from None
    if out.dim() != 2 or out.shape[0] != len(sample[:2]):
        raise NenniError(f"surrogate {model.label} gives {list(out.shape)} for 2 images, not one row of scores each")
    if num_classes is not None and out.shape[1] != num_classes:
        raise NenniError(
            f"surrogate {model.label} scores {out.shape[1]} classes; the target and data have {num_classes}"
        )


# -- rows that need no PyTorch model of the target ---------------------------------------------------------------
def square_row(target: Target, settings: Settings) -> Row:
    """Square on the deployed model's scores (the ONNX session, or the PyTorch model of a PyTorch target)."""
    attack = Square(1.0, norm=settings.norm, queries=settings.queries, p_init=settings.p_init, seed=settings.seed)
    config = {k: v for k, v in attack.to_dict().items() if k != "eps"}
    config["attack"] = "square"

    def scores(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(target.logits(x, settings.batch_size)))

    def craft(x, y, eps, *, start=0, progress=None):
        a = Square(eps, norm=settings.norm, queries=settings.queries, p_init=settings.p_init, seed=settings.seed)
        result = a.perturb(scores, x, y, progress=progress)
        return result.x_adv, [], {"queries": result.queries.tolist()}

    return Row("square", "score-based", config, craft, context=True)


def hsj_row(target: Target, settings: Settings) -> Row:
    """HopSkipJump on the deployed model's labels: for graphs that give no scores."""
    attack = HopSkipJump(1.0, norm=settings.norm, queries=settings.queries, seed=settings.seed)
    config = {k: v for k, v in attack.to_dict().items() if k != "eps"}
    config["attack"] = "hopskipjump"

    def labels(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(target.logits(x, settings.batch_size)).argmax(1))

    def craft(x, y, eps, *, start=0, progress=None):
        a = HopSkipJump(eps, norm=settings.norm, queries=settings.queries, seed=settings.seed)
        result = a.perturb(labels, x, y, progress=progress)
        return result.x_adv, [], {"queries": result.queries.tolist()}

    return Row("hsj", "decision-based", config, craft, context=True)


def replay_rows(adv: AdversarialSet, eps_list: list[tuple[str, float]]) -> list[Row]:
    """One row per set of the file; a set counts at every budget at least its own (the file's eps, or its
    measured largest perturbation): an attack valid at eps is valid at any larger one."""
    rows = []
    for k, (set_label, size) in enumerate(zip(adv.labels, adv.sizes, strict=True)):
        name = f"replay:{adv.path.stem}" + (f"@{set_label}" if len(adv.labels) > 1 else "")
        config = {"attack": "replay", "file_sha256": adv.sha256, "set": k, "eps": size}

        def craft(x, y, eps, *, start=0, progress=None, k=k):
            stop = start + len(x)
            return torch.from_numpy(adv.x[k, start:stop]).to(x.dtype), [], {}

        rows.append(Row(name, "replay", config, craft, context=True, min_eps=size))
    return rows


def throughput(target: Target, x: torch.Tensor, batch_size: int, seconds: float = 1.0) -> float:
    """Images per second of the deployed model at `batch_size` (for time estimates)."""
    batch = x[: min(len(x), batch_size)]
    target.logits(batch, batch_size)
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or done == 0:
        target.logits(batch, batch_size)
        done += len(batch)
    return done / (time.perf_counter() - start)
