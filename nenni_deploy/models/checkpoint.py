"""Reading and writing weights without ever running code from a file."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from nenni_deploy.errors import NenniError, first_line
from nenni_deploy.files import atomic_output

# Wrappers that training scripts put around the state dict, tried in this order at every level.
_WRAPPER_KEYS = ("state_dict", "model")
_DATA_PARALLEL_PREFIX = "module."
# BatchNorm fills this counter in itself when an (old) checkpoint lacks it; it is not a weight.
_OPTIONAL_SUFFIX = "num_batches_tracked"
_SHOWN_KEYS = 5


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> nn.Module:
    """Load weights from a `.safetensors` file or a torch pickle (read with `weights_only=True`).

    The state dict may be wrapped in `state_dict` / `model` entries and carry DataParallel's `module.`
    prefix; non-tensor entries are ignored. Every mismatch is checked before the model is touched.
    """
    path = Path(path)
    state = _tensor_entries(_unwrap(_read(path)))
    if not state:
        raise NenniError(f"checkpoint {path} holds no tensors")
    problems = _mismatches(model.state_dict(), state, strict=strict)
    if problems:
        raise NenniError(f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=strict)
    return model


def save_state_dict(model_or_dict: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write tensors as safetensors, atomically: a reader never sees a half-written file."""
    state = model_or_dict.state_dict() if isinstance(model_or_dict, nn.Module) else model_or_dict
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(safetensors.torch.save(tensors))
    return path


def _read(path: Path) -> Any:
    if not path.is_file():
        raise NenniError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except (safetensors.SafetensorError, OSError, ValueError) as exc:
            raise NenniError(f"cannot read safetensors checkpoint {path}: {first_line(exc)}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that is not a checkpoint fails inside the unpickler in arbitrary ways
        raise NenniError(_describe_torch_load_error(path, exc)) from exc


def _describe_torch_load_error(path: Path, exc: BaseException) -> str:
    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return (
            f"refusing checkpoint {path}: loading it would run code named in the file ({refused.group(1)}); "
            "only tensors and plain containers are accepted, so re-save it as a plain state dict"
        )
    # torch wraps the real cause in several lines of advice; keep only the cause.
    cause = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if cause:
        detail = cause.group(1)
    elif isinstance(exc, (KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError)):
        detail = "its bytes are not a pickled state dict"  # the unpickler's own message is a bare number
    else:
        detail = first_line(exc)
    return f"cannot read checkpoint {path} (corrupt or not a torch file): {detail}"


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, Mapping):
        inner = next((obj[key] for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _tensor_entries(obj: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        return {}
    return {
        key.removeprefix(_DATA_PARALLEL_PREFIX): value
        for key, value in obj.items()
        if isinstance(key, str) and isinstance(value, torch.Tensor)
    }


def _mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], *, strict: bool) -> list[str]:
    problems = []
    if strict:
        missing = [key for key in expected if key not in given and not key.endswith(_OPTIONAL_SUFFIX)]
        unexpected = [key for key in given if key not in expected]
        if missing:
            problems.append(f"missing keys {_summarise(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_summarise(unexpected)}")
    shapes = [
        f"{key} {tuple(value.shape)} in the file vs {tuple(expected[key].shape)} in the model"
        for key, value in given.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if shapes:
        problems.append(f"shape mismatch {_summarise(shapes)}")
    return problems


def _summarise(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_SHOWN_KEYS])
    more = len(items) - _SHOWN_KEYS
    return f"[{shown}]" + (f" (+{more} more)" if more > 0 else "")
