"""A model on disk: one directory for a dense, a channel-pruned or a NENNI model.

    config.json            what it is: kind, how to rebuild the architecture (ModelSource), the data set it was
                           made with, the NENNI config and per-layer specs, hashes, metrics and history
    weights.safetensors    its weights (NENNI: folded base weights, projections, approximators)
    base.safetensors       the dense model it was made from, unchanged (NENNI and pruned models): the honest
                           baseline, whatever fine-tuning did to the weights above
    source/<file>.py       a copy of the user's entry point, so the directory rebuilds anywhere

Everything is checked by hash on load, and written atomically (built beside the target, then renamed).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .. import __version__
from ..data import DataSpec
from ..errors import NenniError
from ..files import apply_umask, atomic_output, sha256_file, staging_dir
from ..models.checkpoint import save_state_dict
from ..models.resize import resize_to_state
from ..models.source import ModelSource, source_for
from .config import LayerSpec, NenniConfig
from .convert import apply_specs, fold_batchnorm
from .layers import nenni_layers, set_mode
from .projection import ternary_projection

FORMAT = "nenni-model"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("dense", "pruned", "nenni")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
BASE_FILE = "base.safetensors"


def projection_hash(model: nn.Module) -> str:
    """One hash over every layer's projection, in layer order: the part that must never change silently."""
    h = hashlib.sha256()
    for name, layer in nenni_layers(model).items():
        h.update(name.encode())
        h.update(layer.proj.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the state dict (what a base model is kept as before conversion changes it)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_model_dir(
    out_dir: str | os.PathLike,
    model: nn.Module,
    *,
    source: ModelSource | str,
    kind: str | None = None,
    config: NenniConfig | None = None,
    specs: list[LayerSpec] | None = None,
    data: DataSpec | None = None,
    base_state: Mapping[str, torch.Tensor] | None = None,
    dense_layers: list[dict[str, str]] | None = None,
    metrics: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    in_place: bool = False,
) -> Path:
    """Write a model directory. `kind` defaults to nenni when the model has NENNI layers, else dense; NENNI
    models need `config` and `specs`; `base_state` is the dense model it was made from.

    By default the directory is built beside `out_dir` and renamed over it (a reader never sees half of it);
    `in_place` writes the files into an existing folder instead (a training run's folder, whose checkpoints
    stay), each file atomically and config.json last."""
    out = Path(out_dir)
    if isinstance(source, str):
        source = source_for(source)
    kind = kind or ("nenni" if nenni_layers(model) else "dense")
    if kind not in KINDS:
        raise NenniError(f"model kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "nenni" and (config is None or specs is None):
        raise NenniError("a NENNI model directory needs its NENNI config and layer specs")
    if out.exists() and not out.is_dir():
        raise NenniError(f"output path {out} exists and is not a directory")

    def write(folder: Path) -> None:
        save_state_dict(model, folder / WEIGHTS_FILE)
        if base_state is not None:
            save_state_dict(base_state, folder / BASE_FILE)
        packaged = source.packaged(folder)
        card = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "arch": packaged.label,
            "model": packaged.to_dict(),
            "data": data.to_dict() if data else None,
            "nenni": config.to_dict() if config else None,
            "layers": [s.to_dict() for s in specs or []],
            "dense_layers": dense_layers or [],
            "weights_sha256": sha256_file(folder / WEIGHTS_FILE),
            "base_weights_sha256": sha256_file(folder / BASE_FILE) if base_state is not None else None,
            "projection_sha256": projection_hash(model) if kind == "nenni" else None,
            "versions": {"nenni_deploy": __version__, "torch": torch.__version__},
            "metrics": metrics or {},
            "history": history or [],
        }
        with atomic_output(folder / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(card, indent=2) + "\n")

    if in_place:
        out.mkdir(parents=True, exist_ok=True)
        write(out)
        return out
    tmp = staging_dir(out)
    try:
        write(tmp)
        apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json, checked, in the current format (a version-1 NENNI directory is read as one)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise NenniError(f"{d} is not a model directory (it does not exist or is a file)")
    try:
        card = json.loads((d / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise NenniError(f"{d} has no {CONFIG_FILE}: not a model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NenniError(f"{d / CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise NenniError(f"{d / CONFIG_FILE} is not a nenni-deploy model config (format != {FORMAT!r})")
    version = card.get("format_version")
    if version not in READABLE_VERSIONS:
        raise NenniError(f"{d}: unsupported model format version {version!r} (this nenni-deploy reads 1 and 2)")
    if version == 1:
        card = _upgrade_v1(card)
    elif "model" not in card and isinstance(card.get("arch"), str):
        # Pruned directories written before model sources were recorded name a registered architecture only.
        card = {**card, "model": _registered_source(card["arch"]).to_dict(), "data": card.get("data")}
    if card.get("kind") not in KINDS or not isinstance(card.get("model"), dict):
        raise NenniError(f"{d / CONFIG_FILE}: malformed (kind {card.get('kind')!r}, model {card.get('model')!r})")
    return card


def _upgrade_v1(card: dict[str, Any]) -> dict[str, Any]:
    """Format 1 held NENNI models of registered architectures only, and no base weights unless one was added
    later (benchmarks/frontier_base.py)."""
    card = dict(card)
    source = _registered_source(card.get("arch"))
    data = card.get("metrics", {}).get("data")
    card.update(
        kind="nenni",
        model=source.to_dict(),
        data={"name": data, "dir": None, "image_size": None} if data else None,
        dense_layers=[],
        base_weights_sha256=card.get("base_weights_sha256"),
    )
    return card


def _registered_source(arch) -> ModelSource:
    try:
        return source_for(str(arch))
    except NenniError as exc:
        raise NenniError(f"an older model directory names an unknown architecture ({exc})") from None


def model_source(card: dict[str, Any], model_dir: str | os.PathLike) -> ModelSource:
    """How to rebuild the directory's architecture (its copied entry point named by an absolute path)."""
    try:
        return ModelSource.from_dict(card["model"]).located(Path(model_dir))
    except (TypeError, KeyError) as exc:
        raise NenniError(f"malformed model source in config.json ({exc})") from None


def data_spec(card: dict[str, Any]) -> DataSpec | None:
    """The data set the model was made with, if recorded (commands default to it)."""
    return DataSpec.from_dict(card.get("data"))


def _load_state(path: Path, expected_sha: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise NenniError(f"{path.parent} has no {path.name}")
    if expected_sha and sha256_file(path) != expected_sha:
        raise NenniError(f"{path}: sha256 does not match config.json (file changed or corrupt)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise NenniError(f"{path}: cannot read safetensors ({exc})") from None


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], where: Path, label: str) -> None:
    problems = []
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        problems.append(f"missing {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {result.unexpected_keys[:5]}")
    if problems:
        raise NenniError(f"{where} does not fit {label}: {', '.join(problems)}")


def load_model_dir(model_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a directory holds (in eval mode) and return it with its config; hashes are verified."""
    d = Path(model_dir)
    card = read_card(d)
    if card.get("weights_sha256") is None:
        raise NenniError(f"{d / CONFIG_FILE} records no weights_sha256")
    state = _load_state(d / WEIGHTS_FILE, card["weights_sha256"])
    source = model_source(card, d)
    model = source.build()
    kind = card["kind"]
    if kind == "nenni":
        try:
            specs = [LayerSpec.from_dict(s) for s in card["layers"]]
            NenniConfig.from_dict(card["nenni"])
        except (KeyError, TypeError) as exc:
            raise NenniError(f"{d / CONFIG_FILE}: malformed layer specs ({exc})") from None
        fold_batchnorm(model)
        apply_specs(model, specs)
    elif kind == "pruned":
        resize_to_state(model, state)
    try:
        _load_into(model, state, d / WEIGHTS_FILE, source.label)
    except RuntimeError as exc:  # shapes that do not fit
        raise NenniError(f"{d / WEIGHTS_FILE} does not fit {source.label}: {str(exc).strip()[:300]}") from None
    for layer in nenni_layers(model).values():
        expected = ternary_projection(tuple(layer.proj.shape), layer.spec.seed)
        if not torch.equal(expected, layer.proj):
            raise NenniError(f"layer {layer.spec.name}: stored projection differs from its seed's projection")
    model.eval()
    return model, card


@dataclass
class BaseModel:
    """A directory's dense baseline and where it came from (`note` says when it is not the original)."""

    module: nn.Module
    sha256: str | None  # of base.safetensors, or of weights.safetensors for a dense directory
    note: str | None = None


def load_base_model(model_dir: str | os.PathLike, model: nn.Module | None = None) -> BaseModel:
    """The dense model a NENNI or pruned directory was made from, as it was; a dense directory is its own."""
    d = Path(model_dir)
    card = read_card(d)
    if card["kind"] == "dense":
        module = model if model is not None else load_model_dir(d)[0]
        return BaseModel(module, card["weights_sha256"])
    if card.get("base_weights_sha256"):
        module = model_source(card, d).build()
        _load_into(module, _load_state(d / BASE_FILE, card["base_weights_sha256"]), d / BASE_FILE, "its base")
        return BaseModel(module.eval(), card["base_weights_sha256"])
    if card["kind"] == "pruned":
        raise NenniError(f"{d} is a pruned model without its unpruned base ({BASE_FILE})")
    # An older NENNI directory kept no base: the exact layers with the current weights are the closest there is.
    module = copy.deepcopy(model if model is not None else load_model_dir(d)[0])
    set_mode(module, "exact")
    note = f"{d} keeps no {BASE_FILE} (an older directory): its base is the exact layers with the current weights"
    return BaseModel(module.eval(), None, note)
