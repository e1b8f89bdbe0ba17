"""A pruned model on disk: the model-directory v2 layout (config.json with kind "pruned" + weights.safetensors).

Stand-in until the lead's nenni/io.py v2 lands (it will read and write this same layout): `save_pruned_model`
and `load_pruned_model` are the only two entry points, so replacing them is one import. The loader rebuilds the
registered architecture and resizes every Conv2d, BatchNorm and Linear to the shapes stored in the weights, so
no code but the architecture's own is needed to load a pruned model (no pickle).
"""

from __future__ import annotations

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

FORMAT = "nenni-model"
FORMAT_VERSION = 2
KIND = "pruned"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def is_pruned_dir(path: str | os.PathLike) -> bool:
    """True for a directory whose config.json says kind "pruned" (cheap: reads one small JSON file)."""
    try:
        card = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and card.get("kind") == KIND


def save_pruned_model(
    out_dir: str | os.PathLike,
    model: nn.Module,
    *,
    arch: str,
    pruning: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write atomically (a staging folder beside the target, then one rename)."""
    from ..nenni.io import sha256_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NenniError(f"output path {out} exists and is not a directory")
    tmp = staging_dir(out)
    try:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        card = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "arch": arch,
            "pruning": pruning,
            "layers": [],
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            "versions": {"nenni_deploy": __version__, "torch": torch.__version__},
            "metrics": metrics or {},
            "history": history or [],
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(card, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_pruned_model(model_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture, resize its layers to the stored shapes, load the weights (hash checked)."""
    from ..models import create_model
    from ..nenni.io import sha256_file

    d = Path(model_dir)
    try:
        card = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise NenniError(f"{d / CONFIG_FILE}: cannot read ({exc})") from None
    if card.get("kind") != KIND or card.get("format_version") != FORMAT_VERSION:
        raise NenniError(f"{d} is not a pruned model directory (kind {card.get('kind')!r})")
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise NenniError(f"{d} has no {WEIGHTS_FILE}")
    if sha256_file(weights) != card.get("weights_sha256"):
        raise NenniError(f"{weights}: sha256 does not match config.json (file changed or corrupt)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise NenniError(f"{weights}: cannot read safetensors ({exc})") from None
    model = create_model(card["arch"])
    resize_to_state(model, state)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise NenniError(
            f"{weights} does not fit {card['arch']}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval(), card


def resize_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Give every Conv2d, BatchNorm and Linear the channel counts of its tensors in `state` (in place)."""
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        w = state.get(f"{prefix}weight")
        if w is None:
            continue
        if isinstance(m, nn.Conv2d):
            m.out_channels, m.in_channels = int(w.shape[0]), int(w.shape[1]) * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = int(w.shape[0])
        else:
            continue
        for key, t in m.named_parameters(recurse=False):
            stored = state.get(f"{prefix}{key}")
            if stored is not None and stored.shape != t.shape:
                setattr(m, key, nn.Parameter(torch.empty_like(stored), requires_grad=t.requires_grad))
        for key, t in m.named_buffers(recurse=False):
            stored = state.get(f"{prefix}{key}")
            if t is not None and stored is not None and stored.shape != t.shape:
                m.register_buffer(key, torch.empty_like(stored))
    return model
