"""Writing outputs safely: everything is built under a temporary name beside its target, then renamed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_output(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it is renamed to `out`, on failure removed."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise NenniError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
