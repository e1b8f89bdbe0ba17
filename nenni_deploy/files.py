"""Writing outputs safely: everything is built under a temporary name beside its target, then renamed."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import NenniError


def staging_dir(out: Path) -> Path:
    """A fresh temporary folder in `out`'s parent (same filesystem, so the final rename is atomic)."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as exc:
        raise NenniError(f"cannot write {out}: {exc.strerror or exc}") from None
