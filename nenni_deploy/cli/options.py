"""Option groups shared by several commands (Polygraphy-style): each is a decorator adding a few options."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click
import torch

from ..errors import NenniError


def _compose(*decorators):
    def apply(func):
        for dec in reversed(decorators):
            func = dec(func)
        return func

    return apply


def data_options(default: str = "digits"):
    return _compose(
        click.option(
            "--data",
            "data_name",
            default=default,
            show_default=True,
            type=click.Choice(["digits", "cifar10"]),
            help="Data set (digits ships with scikit-learn).",
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Folder with CIFAR-10 (train.npz/test.npz or the python batches); else $NENNI_DATA_DIR.",
        ),
    )


def runtime_options():
    return _compose(
        click.option(
            "--threads",
            type=click.IntRange(1, 256),
            default=None,
            help="Intra-op threads for PyTorch (default: torch's choice).",
        ),
        click.option("--batch-size", type=click.IntRange(1, 100_000), default=256, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
    )


def json_option():
    return click.option(
        "--json",
        "json_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Write a machine-readable summary here.",
    )


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary name in the same folder and rename, so a failure never leaves half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise NenniError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
