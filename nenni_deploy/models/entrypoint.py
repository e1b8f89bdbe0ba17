"""A user's model named as an entry point, the way pip and uvicorn name code: `path/to/file.py:FUNCTION` or
`package.module:FUNCTION`, a callable that returns an `nn.Module`.

Running it runs the user's code (it is theirs, as a model directory's copy of it is): checkpoints, by contrast,
are never unpickled with code execution.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import NenniError, first_line


def looks_like_entrypoint(spec: str) -> bool:
    """`file.py:fn` or `pkg.mod:fn` (a registered name has no colon)."""
    module, sep, func = str(spec).rpartition(":")
    return bool(sep and module and func.isidentifier())


def split_entrypoint(spec: str) -> tuple[str, str]:
    module, sep, func = str(spec).rpartition(":")
    if not sep or not module or not func.isidentifier():
        raise NenniError(f"entry point {spec!r} must look like path/to/file.py:FUNCTION or package.module:FUNCTION")
    return module, func


def is_file_module(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def resolve_callable(spec: str, *, base_dir: Path | None = None) -> Callable[..., Any]:
    """The function an entry point names; a file path is resolved against `base_dir` (default: the cwd)."""
    module_name, func_name = split_entrypoint(spec)
    if is_file_module(module_name):
        path = Path(module_name)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        module = _import_file(path)
    else:
        module = _import_module(module_name)
    func = getattr(module, func_name, None)
    if func is None:
        raise NenniError(f"entry point {spec}: {module_name} has no {func_name!r}")
    if not callable(func):
        raise NenniError(f"entry point {spec}: {func_name!r} is a {type(func).__name__}, not a callable")
    return func


def call_entrypoint(spec: str, kwargs: dict[str, Any] | None = None, *, base_dir: Path | None = None) -> nn.Module:
    """Call the entry point with `kwargs` and check that it built an `nn.Module`."""
    func = resolve_callable(spec, base_dir=base_dir)
    try:
        model = func(**(kwargs or {}))
    except Exception as exc:  # the user's code can raise anything; the user needs one line naming it
        raise NenniError(f"entry point {spec} raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise NenniError(f"entry point {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def source_file(spec: str, *, base_dir: Path | None = None) -> Path | None:
    """The file that defines the entry point's function (for a copy in a model directory), if it has one."""
    module_name, _ = split_entrypoint(spec)
    if is_file_module(module_name):
        path = Path(module_name)
        return (base_dir / path if base_dir is not None and not path.is_absolute() else path).resolve()
    module = _import_module(module_name)
    origin = getattr(module, "__file__", None)
    return Path(origin).resolve() if origin else None


def _import_file(path: Path):
    if not path.is_file():
        raise NenniError(f"entry point file not found: {path}")
    # A name unique to the file's content, so two model files called model.py never shadow each other.
    digest = hashlib.sha256(str(path.resolve()).encode() + path.read_bytes()).hexdigest()[:16]
    name = f"nenni_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise NenniError(f"cannot import {path} as Python source")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # the file's own sibling imports (helpers beside model.py)
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise NenniError(f"importing {path} failed: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise NenniError(f"entry point module {name!r} not found ({first_line(exc)})") from None
    except Exception as exc:
        raise NenniError(f"importing module {name!r} failed: {type(exc).__name__}: {first_line(exc)}") from None
