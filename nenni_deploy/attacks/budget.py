"""Perturbation budgets as users write them ("8/255", "0.03"), parsed strictly."""

from __future__ import annotations

import math
from fractions import Fraction

from ..errors import NenniError

MAX_EPS = {"linf": 1.0, "l2": 64.0}  # a budget past these cannot be an intended image-space radius


def parse_eps(text: str | float, norm: str = "linf", what: str = "eps") -> float:
    """'2/255' or '0.0078' -> float in (0, MAX_EPS[norm]]; anything else is a one-line error naming `what`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip()
        try:
            if "/" in raw:
                num, den = raw.split("/")
                value = float(Fraction(num.strip()) / Fraction(den.strip()))
            else:
                value = float(raw)
        except (ValueError, ZeroDivisionError):
            raise NenniError(f"{what} {text!r} is not a number or a fraction like 8/255") from None
    if not math.isfinite(value) or value <= 0 or value > MAX_EPS[norm]:
        raise NenniError(f"{what} {text!r} is out of range: an {norm} budget must be in (0, {MAX_EPS[norm]:g}]")
    return value


def parse_eps_list(text: str, norm: str = "linf") -> list[tuple[str, float]]:
    """'2/255,4/255' -> [('2/255', 0.0078...), ...], in increasing order, without duplicates."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise NenniError("--eps needs at least one budget, e.g. --eps 2/255,4/255,8/255")
    parsed = [(t, parse_eps(t, norm)) for t in items]
    values = [v for _, v in parsed]
    if len(set(values)) != len(values):
        raise NenniError(f"--eps {text!r} lists the same budget twice")
    return sorted(parsed, key=lambda p: p[1])
