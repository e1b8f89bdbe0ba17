"""Which channel lowering to use for a layer, from measurements rather than by timing every layer at export.

`benchmarks/crossover.py` times single 3x3 channel NENNI layers in ONNX Runtime over a grid of widths, spatial
sizes, batch sizes, essential ratios and precisions (float32, int8): the skipping body (gathered filters), the
grouped body (static batch: one convolution group per sample), the masked body (dense convolution, then
select) and the dense convolution itself. For every (variant, precision, batch, ratio) it fits

    log(t_variant / t_masked) = a + b * log(width) + c * log(positions)

with width = sqrt(C_in * C_out) (times kh * kw / 9 under the root for other kernels) and positions =
H_out * W_out. Two features because the CIFAR networks keep C^2 * H * W constant across their stages: the
layers of ResNet-20 all have the same MAC count, and only the width tells them apart (the skipping bodies'
per-position costs, the patches and the fill, shrink relative to the filters they skip as the layer widens).
The fit is stored in `lowering_model.json` beside this file; `--channel-lowering auto` asks it for the fastest
predicted of masked, skip and (in static-batch exports) grouped; `--channel-lowering tune` still times skip and
masked on each layer (`tune.py`).

Between the measured ratios the prediction is interpolated linearly; outside them it takes the nearest. Batch
sizes go to the nearest measured one on a log scale.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NenniError

MODEL_FILE = Path(__file__).with_name("lowering_model.json")
FORMAT = "nenni-lowering-model"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Layer:
    """What the model decides on: a convolution's width and output positions per image."""

    c_in: int
    c_out: int
    positions: int  # H_out * W_out
    kernel: tuple[int, int] = (3, 3)

    @property
    def width(self) -> float:
        return math.sqrt(self.c_in * self.c_out * self.kernel[0] * self.kernel[1] / 9)


@dataclass(frozen=True)
class Fit:
    """log(t_variant / t_masked) = a + b log(width) + c log(positions) for one (variant, precision, batch, ratio)."""

    variant: str  # skip or grouped
    precision: str
    batch: int
    ratio: float
    a: float
    b: float
    c: float
    points: int
    misclassified: int  # measured layers on the wrong side of the fitted decision

    def log_ratio(self, layer: Layer) -> float:
        return self.a + self.b * math.log(layer.width) + self.c * math.log(layer.positions)

    def crossover_width(self, positions: int) -> float | None:
        """The width above which the variant is predicted faster than masked at `positions` (None: no width)."""
        if self.b >= 0:
            return None
        return math.exp(-(self.a + self.c * math.log(positions)) / self.b)


@dataclass
class LoweringModel:
    fits: list[Fit]
    measured: dict[str, Any] = field(default_factory=dict)  # machine, threads, settings of the benchmark

    # -- choosing ---------------------------------------------------------------------------------------------
    def predict_log_ratio(self, precision: str, batch: int, ratio: float, layer: Layer, variant: str = "skip") -> float:
        """Predicted log(t_variant / t_masked)."""
        fits = [f for f in self.fits if f.precision == precision and f.variant == variant]
        if not fits:
            raise NenniError(f"the channel lowering model has no measurements of {variant} in {precision}")
        batches = sorted({f.batch for f in fits})
        nearest = min(batches, key=lambda b: abs(math.log(b) - math.log(max(batch, 1))))
        by_ratio = sorted((f for f in fits if f.batch == nearest), key=lambda f: f.ratio)
        if ratio <= by_ratio[0].ratio:
            return by_ratio[0].log_ratio(layer)
        if ratio >= by_ratio[-1].ratio:
            return by_ratio[-1].log_ratio(layer)
        for lo, hi in zip(by_ratio, by_ratio[1:], strict=False):
            if lo.ratio <= ratio <= hi.ratio:
                t = (ratio - lo.ratio) / (hi.ratio - lo.ratio)
                return (1 - t) * lo.log_ratio(layer) + t * hi.log_ratio(layer)
        raise AssertionError("unreachable")

    def variants(self) -> set[str]:
        return {f.variant for f in self.fits}

    def choose(
        self, precision: str, batch: int, ratio: float, layer: Layer, candidates: tuple[str, ...] = ("skip",)
    ) -> str:
        """The lowering predicted fastest: "masked" or one of `candidates` (those the model has measured)."""
        best, best_log = "masked", 0.0
        for variant in candidates:
            if variant in self.variants():
                log_ratio = self.predict_log_ratio(precision, batch, ratio, layer, variant)
                if log_ratio < best_log:
                    best, best_log = variant, log_ratio
        return best

    # -- files ------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": "log(t_variant / t_masked) = a + b log(width) + c log(positions); width = sqrt(C_in C_out), "
            "positions = H_out W_out",
            "measured": self.measured,
            "fits": [asdict(f) for f in self.fits],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoweringModel:
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise NenniError(f"not a channel lowering model (format {data.get('format')!r})")
        keys = ("variant", "precision", "batch", "ratio", "a", "b", "c", "points", "misclassified")
        return cls([Fit(**{k: f[k] for k in keys}) for f in data["fits"]], data.get("measured", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load_lowering_model(path: str | Path | None = None) -> LoweringModel:
    path = Path(path) if path is not None else MODEL_FILE
    try:
        return LoweringModel.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise NenniError(f"no channel lowering model at {path}: run benchmarks/crossover.py") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise NenniError(f"{path} is not a valid channel lowering model ({exc})") from None


def fit_lowering_model(rows: list[dict[str, Any]], measured: dict[str, Any] | None = None) -> LoweringModel:
    """Fit from benchmark rows: dicts with variant, precision, batch, ratio, cin, cout, positions, ms, masked_ms."""
    groups: dict[tuple[str, str, int, float], list[tuple[Layer, float]]] = {}
    for r in rows:
        key = (str(r["variant"]), str(r["precision"]), int(r["batch"]), float(r["ratio"]))
        layer = Layer(int(r["cin"]), int(r["cout"]), int(r["positions"]))
        groups.setdefault(key, []).append((layer, math.log(r["ms"] / r["masked_ms"])))
    fits = []
    for (variant, precision, batch, ratio), pts in sorted(groups.items()):
        x = np.array([[1.0, math.log(p.width), math.log(p.positions)] for p, _ in pts])
        y = np.array([v for _, v in pts])
        # least squares (minimum norm where a feature does not vary over the measured layers)
        a, b, c = (float(v) for v in np.linalg.lstsq(x, y, rcond=None)[0])
        fit = Fit(variant, precision, batch, ratio, a, b, c, len(pts), 0)
        wrong = sum(1 for p, v in pts if (fit.log_ratio(p) < 0) != (v < 0))
        fits.append(Fit(variant, precision, batch, ratio, a, b, c, len(pts), wrong))
    return LoweringModel(fits, measured or {})
