"""What the benchmark scripts share: running `nenni` as a user would, and seeded random weights for timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def nenni(*args) -> None:
    """One `nenni` command in a fresh process (as a user runs it), echoed first; a failure stops the script."""
    cmd = [sys.executable, "-m", "nenni_deploy.cli", *map(str, args)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def random_weights(arch: str, out: Path) -> Path:
    """Timing needs no trained weights: a seeded random initialisation, saved once."""
    import torch

    from nenni_deploy.models import create_model, save_state_dict

    path = out / f"{arch}-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_state_dict(create_model(arch).state_dict(), path)
    return path
