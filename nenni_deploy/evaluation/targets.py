"""What `nenni eval` attacks and replays on: a NENNI model directory, a plain registered model with weights, or an
exported ONNX model (replayed in ONNX Runtime, attacked through the PyTorch model it was exported from)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import NenniError
from ..nenni.layers import nenni_layers, set_mode


def identity_hash(*parts: str) -> str:
    """One sha256 over the parts: what identifies a model or an attack in cache keys."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class TorchModel:
    """A PyTorch classifier (images in [0, 1] in, logits out) and what the evaluation needs to know about it."""

    module: nn.Module
    label: str
    identity: str  # a hash of everything that determines its outputs (the cache key uses it)
    arch: str | None = None

    @property
    def nenni(self) -> bool:
        return any(layer.mode == "nenni" for layer in nenni_layers(self.module).values())

    @property
    def randomised(self) -> bool:
        return any(
            layer.mode == "nenni" and layer.spec.noise == "gaussian" for layer in nenni_layers(self.module).values()
        )

    def dense_copy(self) -> TorchModel:
        """The base model with the same weights: every NENNI layer computes its exact layer."""
        module = copy.deepcopy(self.module)
        set_mode(module, "exact")
        return TorchModel(module.eval(), f"{self.label} (dense base)", identity_hash(self.identity, "dense"), self.arch)


@dataclass
class Target:
    """The model as deployed: `replay` runs it; `source` is the PyTorch model white-box attacks differentiate."""

    label: str
    kind: str  # "nenni", "dense" or "onnx"
    identity: str
    dataset: str | None
    source: TorchModel | None
    onnx: object | None = None  # runtime.LoadedModel
    onnx_randomised: bool = False
    notes: list[str] = field(default_factory=list)
    _runner: object | None = None

    @property
    def randomised(self) -> bool:
        if self.kind == "onnx":
            return self.onnx_randomised
        return self.source is not None and self.source.randomised

    @property
    def nenni(self) -> bool:
        if self.kind == "onnx":
            return bool(self.onnx.is_nenni)
        return self.source is not None and self.source.nenni

    def logits(self, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """The deployed model's logits: ONNX Runtime for an ONNX target, else the PyTorch model."""
        if self.kind == "onnx":
            from ..runtime import predict_dataset

            return predict_dataset(self.runner(), x.detach().float().contiguous(), batch_size)
        return torch_logits(self.source.module, x, batch_size)

    def runner(self):
        if self._runner is None:
            from ..runtime import open_runner

            self._runner = open_runner(self.onnx, provider="cpu")
            self._runner.activate()
        return self._runner

    def close(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None


def torch_logits(module: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(module(x[start : start + batch_size]).detach().cpu().numpy())
    return np.concatenate(out)


def _file_sha(path: Path) -> str:
    from ..files import sha256_file

    return sha256_file(path)


def load_torch_model(spec: str | os.PathLike, *, weights: Path | None = None, dense: bool = False) -> TorchModel:
    """A model directory (dense, pruned or NENNI; `dense`: the dense model it was made from), or a registered
    architecture or entry point (`file.py:fn`) with `weights`."""
    from ..nenni.model import load_model, open_model_dir

    path = Path(spec)
    if path.is_dir():
        if weights is not None:
            raise NenniError(f"--weights is for an architecture name; {path} is a model directory with its own")
        model = open_model_dir(path)
        card = model.card
        identity = identity_hash("model-dir", card["weights_sha256"], card.get("projection_sha256") or "")
        if dense and model.kind != "dense":
            base = model.base()
            label = f"{path} (dense base)"
            return TorchModel(
                base.module.eval(), label, identity_hash(identity, "dense", base.sha256 or ""), model.source.label
            )
        return TorchModel(model.module, str(path), identity, model.source.label)
    from ..models import list_models
    from ..models.entrypoint import looks_like_entrypoint

    name = str(spec)
    if name not in list_models() and not looks_like_entrypoint(name):
        if path.exists():
            raise NenniError(f"{path} is neither a model directory nor an .onnx file")
        raise NenniError(
            f"{name!r} is not a model directory, an .onnx file, a registered architecture "
            f"(known: {', '.join(list_models())}) or an entry point file.py:FUNCTION"
        )
    if weights is None:
        raise NenniError(f"{name} needs --weights: evaluating an untrained network says nothing")
    if not Path(weights).is_file():
        raise NenniError(f"--weights {weights}: no such file")
    model = load_model(name, weights=weights)
    identity = identity_hash("registry", name, _file_sha(Path(weights)))
    return TorchModel(model.module, f"{model.source.label} ({Path(weights).name})", identity, name)


def looks_like_onnx(spec: str | os.PathLike) -> bool:
    path = Path(spec)
    return path.suffix.lower() == ".onnx" or (path.is_file() and not path.is_dir())


def load_target(
    spec: str | os.PathLike,
    *,
    weights: Path | None = None,
    source: Path | None = None,
    dense: bool = False,
) -> Target:
    """TARGET as the user named it; for an ONNX file, `source` (a model directory) is what it was exported from."""
    if looks_like_onnx(spec):
        return _onnx_target(Path(spec), source, weights)
    if source is not None:
        raise NenniError("--source is only for an ONNX target (the model directory it was exported from)")
    model = load_torch_model(spec, weights=weights, dense=dense)
    dataset = _recorded_dataset(Path(spec), model.arch)
    kind = "nenni" if model.nenni else "dense"
    return Target(model.label, kind, model.identity, dataset, model)


def _onnx_target(path: Path, source: Path | None, weights: Path | None) -> Target:
    from ..runtime import load_onnx_checked

    if weights is not None:
        raise NenniError("--weights is not used with an ONNX target (its weights are inside the file)")
    loaded = load_onnx_checked(path)
    meta = loaded.metadata
    src = None
    if source is not None:
        if not Path(source).is_dir():
            raise NenniError(f"--source {source} must be the model directory {path.name} was exported from")
        from ..nenni.io import read_card

        # The dense base only for a `--dense` export: a pruned (or dense) directory's own export is its own model.
        kind = read_card(source)["kind"]
        exported_dense = meta.get("nenni.dense") == "true" or (kind == "nenni" and not loaded.is_nenni)
        src = load_torch_model(source, dense=exported_dense)
        _check_source(path, meta, Path(source))
    dataset = meta.get("nenni.dataset") or _recorded_dataset(None, meta.get("nenni.arch"))
    identity = identity_hash("onnx", _file_sha(path), src.identity if src else "")
    return Target(str(path), "onnx", identity, dataset, src, onnx=loaded, onnx_randomised=loaded.noise_nodes > 0)


def _check_source(path: Path, meta: dict[str, str], source: Path) -> None:
    """White-box results transfer to the ONNX model only if --source holds the very weights it was exported from."""
    from ..nenni.io import read_card

    card = read_card(source)
    recorded = meta.get("nenni.weights_sha256")
    if not recorded:
        raise NenniError(f"{path} records no weight hash: cannot check that --source {source} is its PyTorch model")
    if recorded != card.get("weights_sha256"):
        raise NenniError(f"--source {source} is not the model {path.name} was exported from (weight hashes differ)")
    if meta.get("nenni.arch") and meta["nenni.arch"] != card.get("arch"):
        raise NenniError(f"--source {source} is a {card.get('arch')}, {path.name} a {meta['nenni.arch']}")


def load_surrogates(specs: list[str], target: Target) -> list[TorchModel]:
    """`base` (the dense model with the target's weights), a model directory (NENNI or its `DIR:dense` base),
    or `ARCH=WEIGHTS` (an independent model: a registered architecture or an entry point `file.py:fn`, with a
    checkpoint)."""
    out = []
    for spec in specs:
        if spec == "base":
            if target.source is None:
                raise NenniError("surrogate 'base' needs the target's PyTorch model (give --source for an ONNX target)")
            if not target.source.nenni:
                raise NenniError("surrogate 'base' is the target itself for a dense model: name independent surrogates")
            out.append(target.source.dense_copy())
            out[-1].label = "base"
            continue
        if "=" in spec:
            arch, _, w = spec.partition("=")
            model = load_torch_model(arch.strip(), weights=Path(w.strip()))
            module, sep, func = arch.strip().rpartition(":")
            model.label = f"{Path(module).stem}:{func}" if sep else arch.strip()
        else:
            dense = spec.endswith(":dense")
            d = spec[: -len(":dense")] if dense else spec
            if not Path(d).is_dir():
                raise NenniError(
                    f"surrogate {spec!r}: use 'base', a model directory, ARCH=WEIGHTS or file.py:fn=WEIGHTS"
                )
            model = load_torch_model(d, dense=dense)
            model.label = Path(d).name + (":dense" if dense else "")
        out.append(model)
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise NenniError(f"two surrogates have the same name: {', '.join(labels)}")
    return out


def describe(target: Target) -> dict:
    return {
        "target": target.label,
        "kind": target.kind,
        "nenni": target.nenni,
        "randomised": target.randomised,
        "identity": target.identity,
        "source": target.source.label if target.source else None,
        "onnx_metadata": {
            k: v for k, v in (target.onnx.metadata.items() if target.onnx else []) if k != "nenni.layers"
        },
        "nenni_config": (json.loads(target.onnx.metadata.get("nenni.config", "{}")) if target.onnx else None),
    }


def _recorded_dataset(model_dir: Path | None, arch: str | None) -> str | None:
    """The data set a model directory records, else the one a registered architecture is built for."""
    if model_dir is not None and model_dir.is_dir():
        from ..nenni.io import data_spec, read_card

        spec = data_spec(read_card(model_dir))
        if spec is not None:
            return spec.name
    from ..models import list_models, model_info

    return model_info(arch).dataset if arch in list_models() else None
