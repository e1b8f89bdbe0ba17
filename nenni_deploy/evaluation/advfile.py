"""Files of adversarial images (`--adv-from`, `--save-adv`): an npz with `x` and `y`, optionally `eps`.

`x` is (N, C, H, W) for one set, or (E, N, C, H, W) for one set per budget (what `--save-adv` writes when the
run has several eps), float in [0, 1] or uint8; NHWC is accepted where it is unambiguous. `y` holds the N
labels, which must be the data's. `eps` (a number, or one per set) is the budget the images were crafted for;
without it each set's largest perturbation is measured. Written files also carry `norm`, `labels` (the eps as
written) and `fooled_by` (per set and image, the attack the image came from; empty where none fooled it).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import NenniError
from ..files import atomic_output

TOLERANCE = 1e-4  # relative slack on a budget: float32 rounding, never a real violation


@dataclass
class AdversarialSet:
    path: Path
    sha256: str
    x: np.ndarray  # (E, N, C, H, W) float32 in [0, 1]: the evaluation's N images
    labels: list[str]  # one per set: the budget as written, or the measured size
    sizes: list[float]  # the budget each set is valid from
    notes: list[str] = field(default_factory=list)


def _sizes(adv: np.ndarray, x: np.ndarray, norm: str) -> np.ndarray:
    d = (adv - x[None]).reshape(adv.shape[0], adv.shape[1], -1)
    per_image = np.abs(d).max(2) if norm == "linf" else np.sqrt((d.astype(np.float64) ** 2).sum(2))
    return per_image.max(1)


def load_adversarial(
    path: str | Path, x: torch.Tensor, y: torch.Tensor, norm: str, eps_list: list[tuple[str, float]]
) -> AdversarialSet:
    """Read and check `path` against the evaluation's images `x` (N, C, H, W) and labels `y`."""
    from ..nenni.io import sha256_file

    path = Path(path)
    name = f"--adv-from {path}"
    if not path.is_file():
        raise NenniError(f"{name}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise NenniError(f"{name} is not a readable npz file ({exc})") from None
    if "x" not in data or "y" not in data:
        raise NenniError(f"{name} must hold arrays x and y (it has {', '.join(sorted(data)) or 'none'})")
    if "norm" in data and str(data["norm"]) != norm:
        raise NenniError(f"{name} holds {data['norm']} perturbations; this run's --norm is {norm}")
    n, image = len(x), tuple(x.shape[1:])
    adv = _as_sets(data["x"], image, name)
    labels = np.asarray(data["y"])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != adv.shape[1]:
        got = f"{labels.dtype} {list(labels.shape)}"
        raise NenniError(f"{name}: y must be {adv.shape[1]} integer labels, one per image, got {got}")
    notes = []
    if adv.shape[1] < n:
        raise NenniError(f"{name} holds {adv.shape[1]} images; the evaluation takes {n}: pass --n {adv.shape[1]}")
    if adv.shape[1] > n:
        notes.append(f"{path.name} holds {adv.shape[1]} images: replaying its first {n}")
        adv, labels = adv[:, :n], labels[:n]
    wrong = np.flatnonzero(labels != y.numpy())
    if len(wrong):
        raise NenniError(
            f"{name}: its labels differ from the data's at {len(wrong)} of {n} images (first at index {wrong[0]}): "
            "it was crafted for other images or another order"
        )
    if not np.isfinite(adv).all() or adv.min() < 0 or adv.max() > 1:
        raise NenniError(f"{name}: images must be finite and in [0, 1] (or uint8 0-255)")
    measured = _sizes(adv, x.numpy(), norm)
    given = _eps(data.get("eps"), adv.shape[0], name)
    names = [str(v) for v in data["labels"]] if "labels" in data and len(data["labels"]) == adv.shape[0] else None
    sizes, set_labels = [], []
    for k in range(adv.shape[0]):
        if given is not None:
            if measured[k] > given[k] * (1 + TOLERANCE) + 1e-6:
                raise NenniError(
                    f"{name}: images are up to {measured[k]:.4g} ({norm}) from the data's, more than their eps "
                    f"{given[k]:.4g}"
                )
            size = given[k]
        else:
            size = float(measured[k])
            notes.append(f"{path.name} gives no eps: its set {k} is replayed at budgets >= its largest perturbation")
        sizes.append(size)
        set_labels.append(names[k] if names else _label(size, eps_list))
    if not any(size <= eps * (1 + TOLERANCE) + 1e-9 for size in sizes for _, eps in eps_list):
        biggest = max(v for _, v in eps_list)
        raise NenniError(f"{name}: its budget {min(sizes):.4g} exceeds every --eps (largest {biggest:.4g})")
    return AdversarialSet(path, sha256_file(path), adv, set_labels, sizes, notes)


def _as_sets(raw: np.ndarray, image: tuple[int, ...], name: str) -> np.ndarray:
    """(E, N, C, H, W) float32 from NCHW or NHWC, one set or several, float or uint8."""
    if raw.dtype == np.uint8:
        arr = raw.astype(np.float32) / 255
    elif raw.dtype.kind == "f":
        arr = raw.astype(np.float32)
    else:
        raise NenniError(f"{name}: x must be float in [0, 1] or uint8, got {raw.dtype}")
    c, h, w = image
    if arr.ndim == 4:
        arr = arr[None]
    if arr.ndim != 5:
        raise NenniError(f"{name}: x has shape {list(raw.shape)}; the data's images are {c}x{h}x{w}")
    if arr.shape[2:] == (c, h, w):
        return np.ascontiguousarray(arr)
    if arr.shape[2:] == (h, w, c):
        return np.ascontiguousarray(arr.transpose(0, 1, 4, 2, 3))
    raise NenniError(f"{name}: x has images of shape {list(arr.shape[2:])}; the data's are {c}x{h}x{w} (C x H x W)")


def _eps(raw, sets: int, name: str) -> list[float] | None:
    if raw is None:
        return None
    values = np.asarray(raw, dtype=np.float64).reshape(-1)
    if values.size == 1:
        values = np.repeat(values, sets)
    if values.size != sets or not np.isfinite(values).all() or (values <= 0).any():
        raise NenniError(f"{name}: eps must be one positive number or one per set ({sets}), got {raw!r}")
    return values.tolist()


def _label(size: float, eps_list: list[tuple[str, float]]) -> str:
    for label, value in eps_list:
        if abs(value - size) <= 1e-9 * max(1.0, value):
            return label
    return f"{size:.4g}"


def save_adversarial(
    path: str | Path,
    images: dict[str, np.ndarray],
    fooled_by: dict[str, list[str]],
    y: torch.Tensor,
    eps: dict[str, float],
    norm: str,
) -> None:
    """Write one set per eps label (in the order given) atomically: one (N, C, H, W) set, or (E, N, C, H, W)."""
    labels = list(images)
    if not labels:
        raise NenniError("no adversarial images to save")
    x = np.stack([images[k] for k in labels]).astype(np.float32)
    names = np.array([fooled_by[k] for k in labels], dtype=str)
    values = np.array([eps[k] for k in labels], dtype=np.float64)
    if len(labels) == 1:
        x, names, values = x[0], names[0], values[0]
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f, x=x, y=y.numpy().astype(np.int64), eps=values, norm=np.array(norm), labels=np.array(labels, dtype=str),
            fooled_by=names,
        )  # fmt: skip
