"""NENNI settings: one global config that resolves to one spec per converted layer, both JSON round-trippable."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import NenniError, dataclass_from_dict

GRANULARITIES = ("element", "threshold", "nm", "channel")
NOISE_MODES = ("none", "gaussian")
RANK_MODES = ("auto", "signed", "magnitude")
RANKS = ("signed", "magnitude")  # what "auto" resolves to, per layer
KINDS = ("conv", "linear")


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """Every mode string is checked where it enters: a typo must never fall through to a default branch."""
    if value not in choices:
        raise NenniError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_nm(text: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """'4:8' -> (4, 8), validated (0 < N < M)."""
    if isinstance(text, (tuple, list)):
        n, m = (int(v) for v in text)
    else:
        parts = str(text).split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise NenniError(f"--nm must look like N:M (e.g. 4:8), got {text!r}")
        n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise NenniError(f"N:M needs 0 < N < M, got {n}:{m}")
    return n, m


def resolve_proj_dim(spec: str | int | float, n_out: int, d_in: int) -> int:
    """Projection size k from 'n/4' or 'n' (relative to the output width n), '0.25' (a fraction), or '12'."""
    text = str(spec).strip()
    try:
        if text == "n":
            k = n_out
        elif text.startswith("n/"):
            k = math.ceil(n_out / float(text[2:]))
        elif "." in text:
            frac = float(text)
            if not 0 < frac <= 4:
                raise ValueError
            k = math.ceil(frac * n_out)
        else:
            k = int(text)
    except (ValueError, ZeroDivisionError):
        raise NenniError(f"--proj-dim must be an integer K, a fraction like 0.25 or 'n/4', got {spec!r}") from None
    if k < 1:
        raise NenniError(f"projection size must be >= 1, got {k} from {spec!r}")
    return min(k, d_in)


@dataclass
class LayerSpec:
    """Everything needed to rebuild one NENNI layer; `threshold` and the fit statistics are filled by fitting."""

    name: str
    kind: str  # "conv" or "linear"
    in_dim: int  # d = C_in * kh * kw, or in_features
    out_dim: int  # n
    proj_dim: int  # k
    ratio: float  # essential fraction
    granularity: str
    nm: tuple[int, int] | None
    rank: str  # resolved: "signed" or "magnitude"
    noise: str
    noise_scale: float
    seed: int
    approx_bits: int
    threshold: float | None = None
    fit_rel_error: float | None = None
    residual_rms: float | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, KINDS, f"layer {self.name}: kind")
        check_choice(self.granularity, GRANULARITIES, f"layer {self.name}: granularity")
        check_choice(self.rank, RANKS, f"layer {self.name}: rank")
        check_choice(self.noise, NOISE_MODES, f"layer {self.name}: noise")

    @property
    def essential(self) -> int:
        """K: essential neurons per position (element, nm) or channels per sample (channel)."""
        if self.granularity == "nm":
            n, m = self.nm
            return self.out_dim // m * n
        return min(self.out_dim, max(1, math.ceil(self.ratio * self.out_dim)))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["nm"] = list(self.nm) if self.nm else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSpec:
        d = dict(d)
        d["nm"] = tuple(d["nm"]) if d.get("nm") else None
        return cls(**d)


@dataclass
class NenniConfig:
    """The user's choices; `resolve` turns them into a LayerSpec per eligible layer."""

    ratio: float = 0.5
    granularity: str = "channel"
    nm: tuple[int, int] = (4, 8)
    proj_dim: str = "n/4"
    include: list[str] | None = None  # fnmatch patterns on module names; None = all but first conv/classifier
    exclude: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)  # per-layer overrides by pattern
    proj_dims: dict[str, str] = field(default_factory=dict)  # per-layer projection sizes k by pattern
    rank: str = "auto"
    noise: str = "none"
    noise_scale: float = 1.0
    approx_bits: int = 8
    seed: int = 0
    ridge: float = 1e-4

    def __post_init__(self) -> None:
        self.nm = parse_nm(self.nm)
        self.validate()

    def validate(self) -> None:
        check_choice(self.granularity, GRANULARITIES, "granularity")
        check_choice(self.noise, NOISE_MODES, "noise")
        check_choice(self.rank, RANK_MODES, "rank")
        for r in [self.ratio, *self.ratios.values()]:
            if not (isinstance(r, (int, float)) and 0 < r <= 1 and math.isfinite(r)):
                raise NenniError(f"essential ratio must be in (0, 1], got {r!r}")
        if not (math.isfinite(self.noise_scale) and self.noise_scale >= 0):
            raise NenniError(f"noise scale must be >= 0, got {self.noise_scale}")
        if self.noise == "gaussian" and self.noise_scale == 0:
            raise NenniError("gaussian noise with scale 0 is no noise: use --noise none")
        if not 2 <= int(self.approx_bits) <= 32:
            raise NenniError(f"approximator bit width must be in [2, 32], got {self.approx_bits}")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise NenniError(f"ridge must be >= 0, got {self.ridge}")

    def ratio_for(self, name: str) -> float:
        for pattern, r in self.ratios.items():
            if fnmatch.fnmatchcase(name, pattern):
                return float(r)
        return float(self.ratio)

    def proj_dim_for(self, name: str) -> str:
        for pattern, k in self.proj_dims.items():
            if fnmatch.fnmatchcase(name, pattern):
                return str(k)
        return str(self.proj_dim)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["nm"] = f"{self.nm[0]}:{self.nm[1]}"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NenniConfig:
        return dataclass_from_dict(cls, d, "NENNI")
