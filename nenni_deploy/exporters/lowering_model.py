"""Which channel lowering to use for a layer, from measurements rather than by timing every layer at export.

`benchmarks/crossover.py` times single 3x3 channel NENNI layers in ONNX Runtime over a grid of widths, spatial
sizes, batch sizes, essential ratios and precisions (float32, int8): the skipping body (gathered filters), the
grouped body (static batch: one convolution group per sample), the masked body (dense convolution, then
select) and the dense convolution itself. For every (variant, precision, batch, ratio) it fits
log(t_variant / t_masked) = a + b * log(work), work = C_in * C_out * H_out * W_out per image (the dense layer's
MACs over its kernel area): the skipping bodies' fixed costs (patches, operator launches, the fill) shrink
relative to the layer as it widens. The fit is stored in `lowering_model.json` beside this file;
`--channel-lowering auto` asks it for the fastest of masked, skip and (in static-batch exports) grouped;
`--channel-lowering tune` still times skip and masked on each layer (`tune.py`).

Between the measured ratios the prediction is interpolated linearly; outside them it takes the nearest. Batch
sizes go to the nearest measured one on a log scale.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NenniError

MODEL_FILE = Path(__file__).with_name("lowering_model.json")
FORMAT = "nenni-lowering-model"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Fit:
    """log(t_variant / t_masked) = a + b * log(work) for one (variant, precision, batch, ratio)."""

    variant: str  # skip or grouped
    precision: str
    batch: int
    ratio: float
    a: float
    b: float
    points: int
    misclassified: int  # measured layers on the wrong side of the fitted decision

    def log_ratio(self, work: float) -> float:
        return self.a + self.b * math.log(work)

    @property
    def crossover_work(self) -> float | None:
        """The work above which the variant is predicted faster than masked (None: never, or always)."""
        if self.b >= 0:
            return None
        return math.exp(-self.a / self.b)


@dataclass
class LoweringModel:
    fits: list[Fit]
    measured: dict[str, Any] = field(default_factory=dict)  # machine, threads, settings of the benchmark

    # -- choosing ---------------------------------------------------------------------------------------------
    def predict_log_ratio(self, precision: str, batch: int, ratio: float, work: float, variant: str = "skip") -> float:
        """Predicted log(t_variant / t_masked)."""
        fits = [f for f in self.fits if f.precision == precision and f.variant == variant]
        if not fits:
            raise NenniError(f"the channel lowering model has no measurements of {variant} in {precision}")
        batches = sorted({f.batch for f in fits})
        nearest = min(batches, key=lambda b: abs(math.log(b) - math.log(max(batch, 1))))
        by_ratio = sorted((f for f in fits if f.batch == nearest), key=lambda f: f.ratio)
        if ratio <= by_ratio[0].ratio:
            return by_ratio[0].log_ratio(work)
        if ratio >= by_ratio[-1].ratio:
            return by_ratio[-1].log_ratio(work)
        for lo, hi in zip(by_ratio, by_ratio[1:], strict=False):
            if lo.ratio <= ratio <= hi.ratio:
                t = (ratio - lo.ratio) / (hi.ratio - lo.ratio)
                return (1 - t) * lo.log_ratio(work) + t * hi.log_ratio(work)
        raise AssertionError("unreachable")

    def variants(self) -> set[str]:
        return {f.variant for f in self.fits}

    def choose(
        self, precision: str, batch: int, ratio: float, work: float, candidates: tuple[str, ...] = ("skip",)
    ) -> str:
        """The lowering predicted fastest: "masked" or one of `candidates` (those the model has measured)."""
        best, best_log = "masked", 0.0
        for variant in candidates:
            if variant in self.variants():
                log_ratio = self.predict_log_ratio(precision, batch, ratio, work, variant)
                if log_ratio < best_log:
                    best, best_log = variant, log_ratio
        return best

    # -- files ------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "feature": "work = C_in * C_out * H_out * W_out per image; log(t_variant / t_masked) = a + b log(work)",
            "measured": self.measured,
            "fits": [{**asdict(f), "crossover_work": f.crossover_work} for f in self.fits],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoweringModel:
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise NenniError(f"not a channel lowering model (format {data.get('format')!r})")
        keys = ("variant", "precision", "batch", "ratio", "a", "b", "points", "misclassified")
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
    """Fit from benchmark rows: dicts with variant, precision, batch, ratio, work, ms and masked_ms."""
    groups: dict[tuple[str, str, int, float], list[tuple[float, float]]] = {}
    for r in rows:
        key = (str(r["variant"]), str(r["precision"]), int(r["batch"]), float(r["ratio"]))
        groups.setdefault(key, []).append((math.log(r["work"]), math.log(r["ms"] / r["masked_ms"])))
    fits = []
    for (variant, precision, batch, ratio), pts in sorted(groups.items()):
        a, b = _line(pts)
        wrong = sum(1 for x, y in pts if (a + b * x < 0) != (y < 0))
        fits.append(Fit(variant, precision, batch, ratio, a, b, len(pts), wrong))
    return LoweringModel(fits, measured or {})


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares y = a + b x (a constant through the mean when x does not vary)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b
