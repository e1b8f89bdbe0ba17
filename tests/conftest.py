"""Shared fixtures: where ../shared lives (data and weights that are not part of the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# The one place that decides where the shared data and weights are; NENNI_SHARED moves them.
SHARED = Path(os.environ.get("NENNI_SHARED", REPO_ROOT.parent / "shared"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one torch thread each, not two each competing.
    torch.set_num_threads(1)


def _shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"../shared not found (set NENNI_SHARED): {path} is missing")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _shared_path("")


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The folder with CIFAR-10 `train.npz` / `test.npz`."""
    return _shared_path("data/cifar10/test.npz").parent


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """The folder with the pretrained CIFAR-10 checkpoints (`akamaster/`, `abcrown/`)."""
    return _shared_path("weights/cifar10")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from two threads and lose a lot when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
