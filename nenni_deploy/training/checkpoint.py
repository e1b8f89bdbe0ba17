"""Checkpoint files in a run directory, every one written atomically (temporary name, then os.replace).

last.safetensors       the model's state_dict
last.optim.safetensors the SGD momentum buffers keyed by parameter name
last.json              epoch, step, RNG states, best metric, config, method; written last
best.safetensors       the model at the best value of the chosen metric
metrics.jsonl          one JSON record per epoch
curves.png             loss and accuracy per epoch, drawn at the end of a call to `train`
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import NenniError
from ..files import atomic_output

LAST = "last.safetensors"
LAST_OPTIM = "last.optim.safetensors"
LAST_STATE = "last.json"
BEST = "best.safetensors"
METRICS = "metrics.jsonl"
CURVES = "curves.png"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` for a temporary path beside `path`, then rename it over `path` (files.atomic_output)."""
    with atomic_output(path) as tmp:
        write(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: tmp.write_bytes(safetensors.torch.save(state, metadata=metadata)))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise NenniError(f"{path}: cannot read safetensors ({exc})") from None


def tensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise NenniError(f"{path}: cannot read safetensors ({exc})") from None


def save_model(path: Path, model: nn.Module, tag: str) -> None:
    save_tensors_atomic(path, model.state_dict(), {"checkpoint": tag})


def load_model(path: Path, model: nn.Module) -> None:
    state = load_tensors(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys[:5], result.unexpected_keys[:5]
        raise NenniError(f"{path} does not fit this model: missing {missing}, unexpected {unexpected}")


def optimizer_buffers(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Momentum buffers by parameter name (parameters without one yet are left out)."""
    out = {}
    for name, p in params.items():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf
    return out


def restore_optimizer(
    optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], buffers: dict[str, torch.Tensor]
) -> None:
    unknown = set(buffers) - set(params)
    if unknown:
        raise NenniError(f"optimizer checkpoint names parameters the run does not train: {sorted(unknown)[:5]}")
    for name, buf in buffers.items():
        p = params[name]
        optimizer.state[p]["momentum_buffer"] = buf.to(device=p.device, dtype=p.dtype).clone()


def rng_state_list(state: torch.Tensor) -> list[int]:
    return state.tolist()


def rng_state_tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """last.json, after checking that both tensor files belong to the same epoch (a crash between renames)."""
    path = Path(run_dir) / LAST_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NenniError(f"{path} is not valid JSON ({exc})") from None
    for name in (LAST, LAST_OPTIM):
        file = Path(run_dir) / name
        if not file.is_file():
            raise NenniError(f"{run_dir} has {LAST_STATE} but no {name}: cannot resume")
        if tensors_metadata(file).get("checkpoint") != state.get("tag"):
            raise NenniError(
                f"{file} is from another epoch than {LAST_STATE} (interrupted while saving): cannot resume"
            )
    return state


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash: everything after it is unusable too
    return records


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in records))


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
