"""A NENNI model on disk: a directory with `config.json` (architecture, layer specs, versions, metrics) and
`weights.safetensors` (base weights, projections, approximators), checked by hash on load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..errors import NenniError
from ..files import staging_dir
from .config import LayerSpec, NenniConfig
from .convert import apply_specs, fold_batchnorm
from .layers import nenni_layers
from .projection import ternary_projection

FORMAT = "nenni-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def projection_hash(model: nn.Module) -> str:
    """One hash over every layer's projection, in layer order: the part that must never change silently."""
    h = hashlib.sha256()
    for name, layer in nenni_layers(model).items():
        h.update(name.encode())
        h.update(layer.proj.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_nenni_model(
    out_dir: str | os.PathLike,
    model: nn.Module,
    *,
    arch: str,
    config: NenniConfig,
    specs: list[LayerSpec],
    metrics: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write atomically: build the directory under a temporary name beside the target, then rename."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NenniError(f"output path {out} exists and is not a directory")
    tmp = staging_dir(out)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        card = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": arch,
            "nenni": config.to_dict(),
            "layers": [s.to_dict() for s in specs],
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            "projection_sha256": projection_hash(model),
            "versions": {"nenni_deploy": __version__, "torch": torch.__version__},
            "metrics": metrics or {},
            "history": history or [],
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(card, indent=2) + "\n")
        _apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _apply_umask(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only files; give the model the permissions a plain write would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def read_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    d = Path(model_dir)
    if not d.is_dir():
        raise NenniError(f"{d} is not a NENNI model directory (it does not exist or is a file)")
    try:
        card = json.loads((d / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise NenniError(f"{d} has no {CONFIG_FILE}: not a NENNI model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NenniError(f"{d / CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise NenniError(f"{d / CONFIG_FILE} is not a NENNI model config (format != {FORMAT!r})")
    if card.get("format_version") != FORMAT_VERSION:
        raise NenniError(
            f"{d}: unsupported model format version {card.get('format_version')!r} (expected {FORMAT_VERSION})"
        )
    return card


def load_nenni_model(model_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture, fold, wrap from the stored specs, load weights; verify both hashes."""
    from ..models import create_model
    from ..pruning.io import is_pruned_dir, load_pruned_model

    if is_pruned_dir(model_dir):  # model-directory v2 (kind "pruned"): stand-in until the v2 loader lands
        return load_pruned_model(model_dir)
    d = Path(model_dir)
    card = read_card(d)
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise NenniError(f"{d} has no {WEIGHTS_FILE}")
    if sha256_file(weights) != card.get("weights_sha256"):
        raise NenniError(f"{weights}: sha256 does not match config.json (file changed or corrupt)")
    try:
        specs = [LayerSpec.from_dict(s) for s in card["layers"]]
        NenniConfig.from_dict(card["nenni"])
    except (KeyError, TypeError) as exc:
        raise NenniError(f"{d / CONFIG_FILE}: malformed layer specs ({exc})") from None
    model = create_model(card["arch"])
    fold_batchnorm(model)
    apply_specs(model, specs)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise NenniError(f"{weights}: cannot read safetensors ({exc})") from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise NenniError(
            f"{weights} does not fit {card['arch']}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    for layer in nenni_layers(model).values():
        expected = ternary_projection(tuple(layer.proj.shape), layer.spec.seed)
        if not torch.equal(expected, layer.proj):
            raise NenniError(f"layer {layer.spec.name}: stored projection differs from its seed's projection")
    model.eval()
    return model, card
