"""A user's own data set from a folder: `train.npz` + `test.npz`, or image folders `train/<class>/*.png` and
`test/<class>/...` (classes are the sorted folder names, as torchvision's ImageFolder has them).

Decoding a large image folder takes minutes, so the decoded arrays are cached (uint8, compressed) under
$NENNI_CACHE_DIR (default ~/.cache/nenni-deploy), keyed by every file's path, size and mtime and the resize.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import NenniError, first_line
from ..files import atomic_output
from .dataset import Dataset

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_ENV = "NENNI_CACHE_DIR"
_CACHE_VERSION = 1


def folder_kind(folder: Path) -> str | None:
    """'npz', 'images', or None when the folder holds neither layout."""
    if any((folder / f"{s}.npz").is_file() for s in SPLITS):
        return "npz"
    if any((folder / s).is_dir() for s in SPLITS):
        return "images"
    return None


def load_folder(folder: Path, split: str, image_size: tuple[int, int] | None = None) -> Dataset:
    kind = folder_kind(folder)
    if kind is None:
        raise NenniError(f"data folder {folder} holds neither train.npz/test.npz nor train/ and test/ image folders")
    if kind == "npz":
        if image_size is not None:
            raise NenniError("--image-size resizes image folders; an npz data set is used at its own size")
        return _load_npz_split(folder, split)
    return _load_image_split(folder, split, image_size)


# -- npz ---------------------------------------------------------------------------------------------------------
def _npz_path(folder: Path, split: str) -> Path:
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise NenniError(f"data folder {folder} has no {split}.npz (a data set needs train.npz and test.npz)")
    return path


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            if not {"x", "y"} <= names:
                raise NenniError(f"{path} must hold arrays x and y, found {', '.join(sorted(names)) or 'none'}")
            classes = archive["classes"] if "classes" in names else None
            return archive["x"], archive["y"], classes
    except NenniError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise NenniError(f"cannot read {path} (expected an npz with arrays x and y): {first_line(exc)}") from None


def _labels_of(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["y"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise NenniError(f"cannot read labels y from {path}: {first_line(exc)}") from None


def _images_nchw(path: Path, x: np.ndarray) -> np.ndarray:
    """uint8 NHWC (0-255) or float NCHW in [0, 1] -> float32 NCHW in [0, 1]; (N, H, W) is one channel."""
    if x.ndim == 3:
        x = x[:, None] if x.dtype != np.uint8 else x[..., None]
    if x.ndim != 4:
        raise NenniError(f"{path}: x must be images (N, H, W, C) uint8 or (N, C, H, W) float, found shape {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[3] not in (1, 3, 4):
            raise NenniError(f"{path}: uint8 images must be NHWC with 1, 3 or 4 channels, found shape {x.shape}")
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0
    if x.dtype in (np.float32, np.float64, np.float16):
        if x.shape[1] not in (1, 3, 4):
            raise NenniError(f"{path}: float images must be NCHW with 1, 3 or 4 channels, found shape {x.shape}")
        x = x.astype(np.float32)
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise NenniError(f"{path}: float images must be finite and in [0, 1] (uint8 images may be 0-255)")
        return x
    raise NenniError(f"{path}: x must be uint8 (NHWC, 0-255) or float32 (NCHW, [0, 1]), found {x.dtype}")


def _load_npz_split(folder: Path, split: str) -> Dataset:
    paths = {s: _npz_path(folder, s) for s in SPLITS}  # both splits: the class count spans them
    x, y, classes = _read_arrays(paths[split])
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise NenniError(f"{paths[split]}: y must be a vector of integer labels, found {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise NenniError(f"{paths[split]}: x has {len(x)} images but y has {len(y)} labels")
    labels = [_labels_of(p) for p in paths.values()]
    top = max((int(v.max()) for v in labels if v.size), default=-1)
    lowest = min((int(v.min()) for v in labels if v.size), default=0)
    if classes is not None:
        names = tuple(str(c) for c in classes.tolist())
        if top >= len(names):
            raise NenniError(f"{folder}: labels reach {top} but `classes` names only {len(names)} classes")
    else:
        names = tuple(str(i) for i in range(top + 1))
    if lowest < 0:
        raise NenniError(f"{folder}: labels must be 0..C-1, found {lowest}")
    if len(names) < 2:
        raise NenniError(f"{folder}: a classifier needs at least 2 classes, the labels give {len(names)}")
    images = torch.from_numpy(_images_nchw(paths[split], x))
    return Dataset(images, torch.from_numpy(y.astype(np.int64)), str(folder), len(names), names)


# -- image folders -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Listing:
    classes: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]]  # split -> (file, label), sorted by class then name


def _list_images(folder: Path) -> _Listing:
    missing = [s for s in SPLITS if not (folder / s).is_dir()]
    if missing:
        raise NenniError(f"image folder {folder} has no {missing[0]}/ (a data set needs train/ and test/)")
    per_split = {}
    for split in SPLITS:
        per_split[split] = sorted(d.name for d in (folder / split).iterdir() if d.is_dir())
        if not per_split[split]:
            raise NenniError(f"{folder / split} has no class folders (expected {split}/<class>/*.png|jpg|jpeg)")
    if per_split["train"] != per_split["test"]:
        only_train = sorted(set(per_split["train"]) - set(per_split["test"]))
        only_test = sorted(set(per_split["test"]) - set(per_split["train"]))
        raise NenniError(
            f"{folder}: train and test have different classes (only in train: {only_train[:5]}; "
            f"only in test: {only_test[:5]})"
        )
    classes = tuple(per_split["train"])
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        files[split] = []
        for label, name in enumerate(classes):
            images = sorted(
                p for p in (folder / split / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                raise NenniError(f"class folder {folder / split / name} holds no .png/.jpg/.jpeg images")
            files[split] += [(p, label) for p in images]
    if len(classes) < 2:
        raise NenniError(f"{folder}: a classifier needs at least 2 classes, found {len(classes)}")
    return _Listing(classes, files)


def _cache_key(folder: Path, listing: _Listing, image_size: tuple[int, int] | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": _CACHE_VERSION, "folder": str(folder.resolve()), "size": image_size}).encode())
    for split in SPLITS:  # the channel count depends on both splits, so both are in every key
        for path, label in listing.files[split]:
            st = path.stat()
            h.update(f"{split}\0{path.relative_to(folder)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nenni-deploy") / "datasets"


def _channels_and_size(listing: _Listing) -> tuple[int, set[tuple[int, int]]]:
    """Grayscale only if every image is; the sizes seen (from the headers, without decoding)."""
    from PIL import Image, UnidentifiedImageError

    gray, sizes = True, set()
    for split in SPLITS:
        for path, _ in listing.files[split]:
            try:
                with Image.open(path) as im:
                    gray = gray and im.mode in ("1", "L", "I;16", "I")
                    sizes.add((im.height, im.width))
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise NenniError(f"cannot read image {path} (corrupt or not an image): {first_line(exc)}") from None
    return (1 if gray else 3), sizes


def _decode(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if (im.height, im.width) != size:
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise NenniError(f"cannot decode image {path} (corrupt?): {first_line(exc)}") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _decode_all(folder: Path, listing: _Listing, image_size: tuple[int, int] | None) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    channels, sizes = _channels_and_size(listing)
    if image_size is None:
        if len(sizes) > 1:
            shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4])
            raise NenniError(f"{folder}: images have different sizes ({shown}): pass --image-size H,W to resize them")
        image_size = next(iter(sizes))
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        entries = listing.files[split]
        x = np.empty((len(entries), channels, *image_size), dtype=np.uint8)
        bar = tqdm(entries, desc=f"decoding {split} images", unit="img", leave=False, disable=len(entries) < 2000)
        for i, (path, _) in enumerate(bar):
            x[i] = _decode(path, channels, image_size)
        out[f"{split}_x"] = x
        out[f"{split}_y"] = np.array([label for _, label in entries], dtype=np.int64)
    return out


def _load_image_split(folder: Path, split: str, image_size: tuple[int, int] | None) -> Dataset:
    listing = _list_images(folder)
    path = cache_dir() / f"{_cache_key(folder, listing, image_size)}.npz"
    arrays = None
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            arrays = None  # a damaged cache entry is rebuilt
    if arrays is None:
        arrays = _decode_all(folder, listing, image_size)
        try:
            with atomic_output(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **arrays)
        except (NenniError, OSError):
            pass  # a read-only cache folder costs time, not correctness
    x = torch.from_numpy(arrays[f"{split}_x"]).float().div_(255)
    y = torch.from_numpy(arrays[f"{split}_y"])
    return Dataset(x, y, str(folder), len(listing.classes), listing.classes)


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """'32,32' or '32x32' or '32' -> (H, W)."""
    if text is None or str(text).strip() == "":
        return None
    parts = str(text).replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise NenniError(f"--image-size takes H,W (e.g. 64,64), got {text!r}")
    return values[0], values[1]
