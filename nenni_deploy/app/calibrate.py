"""Calibration: a trained dense model becomes a NENNI model (conversion, fitted approximators, accuracy, cost)."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import Dataset
from ..errors import NenniError
from ..nenni.calibrate import Calibration
from ..nenni.calibrate import calibrate as fit_nenni
from ..nenni.config import NenniConfig
from ..nenni.io import save_model_dir, state_of
from ..nenni.model import Model
from ..tables import format_table


@dataclass
class CalibrateConfig:
    nenni: NenniConfig = field(default_factory=NenniConfig)
    calib_n: int = 2048  # training images the approximators are fitted on
    eval_n: int | None = None  # test images evaluated (None: all)
    batch_size: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        if self.calib_n < 1 or (self.eval_n is not None and self.eval_n < 1) or self.batch_size < 1:
            raise NenniError("calibration image counts and the batch size must be >= 1")


@dataclass
class CalibrationResult:
    model: Model  # the NENNI model
    calibration: Calibration
    config: CalibrateConfig
    base_state: dict  # the dense model as it was given
    eval_images: int
    calib_images: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        c, total = self.calibration, self.calibration.cost["totals"]
        return {
            "dense_accuracy": c.dense_accuracy,
            "nenni_accuracy": c.nenni_accuracy,
            "eval_images": self.eval_images,
            "data": self.model.data.name if self.model.data else None,
            "macs_dense": total["macs_dense"],
            "macs_nenni": total["macs_nenni"],
            "bitops_dense": total["bitops_dense"],
            "bitops_nenni": total["bitops_nenni"],
            "fit_seconds": c.fit_seconds,
            "calib_images": self.calib_images,
        }

    def save(self, out: str | os.PathLike) -> Path:
        """Write the NENNI model directory (with the dense base weights beside it)."""
        c = self.calibration
        path = save_model_dir(
            out,
            self.model.module,
            source=self.model.source,
            config=self.config.nenni,
            specs=c.specs,
            data=self.model.data,
            base_state=self.base_state,
            dense_layers=c.dense_layers,
            metrics=self.metrics,
            history=[*self.history, {"stage": "calibrate", **self.metrics}],
        )
        self.model.path = Path(out)
        return path

    def to_json(self) -> dict[str, Any]:
        c = self.calibration
        rows = {r["name"]: r for r in c.cost["layers"]}
        return {
            **self.metrics,
            "arch": self.model.source.label,
            "model": self.model.source.to_dict(),
            "data_spec": self.model.data.to_dict() if self.model.data else None,
            "model_dir": str(self.model.path) if self.model.path else None,
            "seconds": self.seconds,
            "config": self.config.nenni.to_dict(),
            "layers": [{**s.to_dict(), **rows[s.name]} for s in c.specs],
            "dense_layers": c.dense_layers,
            "cost": c.cost,
        }

    def layer_table(self) -> str:
        c = self.calibration
        fits = {f.name: f for f in c.fits}
        specs = {s.name: s for s in c.specs}
        reasons = {d["name"]: d["reason"] for d in c.dense_layers}
        rows = []
        for r in c.cost["layers"]:
            spec, fit = specs.get(r["name"]), fits.get(r["name"])
            rows.append(
                [
                    r["name"],
                    r["kind"],
                    r["in_dim"],
                    r["out_dim"],
                    r["proj_dim"],
                    r["essential"],
                    spec.rank if spec else "dense",
                    fit.rel_error if fit else None,
                    r["macs_dense"],
                    r["macs_nenni"],
                    r["bitops_nenni"] / r["bitops_dense"] if r["bitops_dense"] else None,
                    "" if spec else reasons.get(r["name"], ""),
                ]
            )
        headers = ["layer", "kind", "d", "n", "k", "K", "rank", "fit err", "MACs dense", "MACs NENNI", "BitOPs ratio"]
        return format_table([*headers, "left dense because"], rows)

    def summary(self) -> str:
        c = self.calibration
        t, a = c.cost["totals"], c.cost["assumptions"]
        return "\n".join(
            [
                f"converted {len(c.specs)} layers, left {len(c.dense_layers)} dense",
                f"accuracy: dense {c.dense_accuracy:.2f} %  NENNI {c.nenni_accuracy:.2f} % ({self.eval_images} images)",
                f"MACs/image: dense {t['macs_dense']:,}  NENNI {t['macs_nenni']:,}"
                f"  ({t['mac_reduction'] * 100:.1f} % fewer; projection charged as dense float MACs)",
                f"BitOPs/image: dense {t['bitops_dense']:,}  NENNI {t['bitops_nenni']:,}"
                f"  ({t['bitops_reduction'] * 100:.1f} % fewer; {a['text']})",
                f"fit: {c.fit_seconds:.1f} s",
            ]
        )


def calibrate(model: Model, train: Dataset, test: Dataset, config: CalibrateConfig) -> CalibrationResult:
    """Convert a copy of `model` (left as it is) to NENNI, fit the approximators on `config.calib_n` training
    images, and measure dense and NENNI accuracy on the test set and the cost of both."""
    if model.is_nenni:
        raise NenniError(f"{model.label} is already a NENNI model: calibrate its dense base")
    check_data(model, train)
    start = time.perf_counter()
    base_state = state_of(model.module)
    module = copy.deepcopy(model.module)
    eval_n = config.eval_n or len(test)
    result = fit_nenni(
        module,
        config.nenni,
        train.x,
        test.x[:eval_n],
        test.y[:eval_n],
        calib_n=config.calib_n,
        batch_size=config.batch_size,
        progress=config.progress,
    )
    nenni = Model(module, model.source, "nenni", model.data)
    history = [h for h in model.card.get("history", [])]
    if model.path is not None:
        history.append({"stage": "source", "model_dir": str(model.path)})
    return CalibrationResult(
        nenni,
        result,
        config,
        base_state,
        eval_images=min(eval_n, len(test)),
        calib_images=min(config.calib_n, len(train)),
        seconds=time.perf_counter() - start,
        history=history,
    )


def check_data(model: Model, data: Dataset) -> None:
    """The data set's images and classes are what the model takes and gives."""
    shape, classes = data.input_shape, data.num_classes
    want = model.source
    if want.input_shape and tuple(want.input_shape) != shape:
        raise NenniError(f"{model.label} takes {tuple(want.input_shape)} images but the data set has {shape}")
    if want.num_classes and want.num_classes != classes:
        raise NenniError(f"{model.label} has {want.num_classes} classes but the data set has {classes}")
