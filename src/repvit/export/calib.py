"""Calibration / evaluation images for INT8: a folder of images or a built-in dataset.

Everything is returned as *raw* pixels, float32 NCHW in 0..1 at the model's input size, with the
model's channel count; normalisation is applied by the caller (or baked into the graph), so the
same images feed a plain, a float-baked or a uint8-baked model.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.folder import IMG_EXTENSIONS
from ..data.images import to_mode
from .common import require

__all__ = ["load_images", "normalise", "BUILTIN", "IMAGE_SUFFIXES"]

BUILTIN = ("fashion-mnist", "digits")
_BUILTIN_CLASSES = {"fashion-mnist": 10, "digits": 10}
IMAGE_SUFFIXES = IMG_EXTENSIONS   # what training's folder reader takes
_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _builtin_key(name: str) -> str | None:
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}.get(key, key)
    return key if key in BUILTIN else None


def _read_idx(path: Path) -> np.ndarray:
    """Minimal IDX reader (only used when the data package is unavailable)."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _builtin_arrays(key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W images and int labels of a built-in split ('train' or 'val').

    Prefers the training package's loaders so train/val splits are the very same images.
    """
    try:
        from ..data.builtin import load_digits, load_fashion_mnist
    except Exception:  # data package not importable: tiny local fallbacks with the same splits
        load_digits = load_fashion_mnist = None  # type: ignore[assignment]
    if key == "fashion-mnist":
        if load_fashion_mnist is not None:
            return load_fashion_mnist()[split]
        prefix = "train" if split == "train" else "t10k"
        root = Path(_FMNIST_DIR)
        try:
            x = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
            y = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {root} ({e}); install the Debian package "
                                    "dataset-fashion-mnist or calibrate with a folder of images") from e
        return x, y.astype(np.int64)
    if load_digits is not None:
        return load_digits()[split]
    sk = require("sklearn.datasets", "the digits dataset")
    d = sk.load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    perm = np.random.RandomState(0).permutation(len(x))  # same split as repvit.data (seed 0, 20% val)
    n_val = int(round(len(x) * 0.2))
    idx = perm[:n_val] if split == "val" else perm[n_val:]
    return x[idx], d.target[idx].astype(np.int64)


def _to_model_input(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """N x C0 x H0 x W0 float 0..1 -> N x c x h x w (bilinear; grey replicated to RGB or RGB averaged to grey)."""
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > w or x.shape[-2] > h)
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise ValueError(f"cannot feed {x.shape[1]}-channel images to a {c}-channel model")
    return x.clamp(0, 1).contiguous()  # not in place: expand() above returns a broadcast view


def _check_class_count(source: Any, found: int, num_classes: int | None, what: str) -> None:
    """Refuse labels that cannot be the model's: another number of classes makes top-1 meaningless."""
    if num_classes and found != num_classes:
        raise ValueError(f"{source} has {found} classes ({what}) but the model has {num_classes}: labels are "
                         f"class indices, so its top-1 would be meaningless; evaluate on a set with the model's "
                         f"{num_classes} classes (class folders sorted by name, as in training)")


def _folder_images(root: Path, pre: dict[str, Any], limit: int | None, seed: int,
                   num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images under ``root`` (recursively). With class sub-folders, labels are the sorted folder index
    (checked against ``num_classes`` when given)."""
    require("PIL", "reading calibration images")
    from PIL import Image
    from timm.data import create_transform

    # os.walk following links, as training's folder reader does (Path.rglob skips symlinked class folders)
    files = sorted(Path(d) / f for d, _, names in os.walk(root, followlinks=True) for f in names
                   if f.lower().endswith(IMAGE_SUFFIXES) and (Path(d) / f).is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}; "
                         "pass a folder of images or a built-in dataset name (fashion-mnist, digits)")
    # same rule as training's folder reader (data/folder.py): hidden folders such as .ipynb_checkpoints are
    # not classes, or every label after them would shift by one
    files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(root).parts)]
    if not files:
        raise ValueError(f"no images found under {root} outside hidden folders")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    labelled = bool(classes) and all(f.parent != root for f in files)
    if labelled:
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        _check_class_count(root, len(classes), num_classes, f"sub-folders {shown}")
    if limit and len(files) > limit:  # a seeded random subset, not the first folders only
        pick = np.random.RandomState(seed).permutation(len(files))[:limit]
        files = [files[i] for i in sorted(pick)]
    c, h, w = pre["input_size"]
    # resize + centre crop as at evaluation, no normalisation (raw 0..1); timm does the PIL work
    k = 1 if c == 1 else 3  # Normalize's mean/std must have one value per channel of the image it gets
    tf = create_transform((k, h, w), is_training=False, interpolation=pre.get("interpolation", "bicubic"),
                          crop_pct=float(pre.get("crop_pct", 0.875)), mean=(0.0,) * k, std=(1.0,) * k)
    xs, ys = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                img = to_mode(im, "L" if c == 1 else "RGB")
        except Exception as e:
            raise ValueError(f"cannot read image {f}: {e}") from e
        t = tf(img)
        xs.append(t[:c] if t.shape[0] >= c else t)
        if labelled:
            ys.append(classes.index(f.relative_to(root).parts[0]))
    x = _to_model_input(torch.stack(xs), c, h, w)
    return x, (torch.tensor(ys) if labelled else None)


def load_images(
    source: str | os.PathLike, pre: dict[str, Any], *, split: str = "train", limit: int | None = None, seed: int = 0,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images N x C x H x W float 0..1, labels or None) for ``pre['input_size']``.

    ``source``: ``fashion-mnist`` / ``digits`` (``split`` 'train' for calibration, 'val' for the
    held-out check) or a folder of images (class sub-folders give labels). ``limit``: at most this
    many images (>= 1), a seeded random subset. ``num_classes``: if given, labelled images must come from
    exactly that many classes (class folders, or the built-in dataset's 10), else a ValueError.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"the number of images to read must be at least 1, got {limit}")
    c, h, w = (int(v) for v in pre["input_size"])
    key = _builtin_key(str(source))
    path = Path(source)
    if path.is_dir():
        return _folder_images(path, pre, limit, seed, num_classes)
    if key is None:
        # split names the role: 'train' images calibrate (--calib), 'val' images are the held-out check (--eval)
        role = "calibration source (--calib)" if split == "train" else "held-out set (--eval)"
        if path.exists():
            raise ValueError(f"{source} is a file; the {role} must be a folder of images or a built-in dataset "
                             f"name ({', '.join(BUILTIN)})")
        raise FileNotFoundError(f"{role} {str(source)!r} is neither an existing folder nor a built-in "
                                f"dataset ({', '.join(BUILTIN)})")
    _check_class_count(key, _BUILTIN_CLASSES[key], num_classes, "a built-in dataset")
    x, y = _builtin_arrays(key, split)
    if limit and len(x) > limit:
        idx = np.sort(np.random.RandomState(seed).permutation(len(x))[:limit])
        x, y = x[idx], y[idx]
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)[:, None]
    return _to_model_input(t, c, h, w), torch.from_numpy(np.asarray(y, dtype=np.int64))


def source_facts(source: str | os.PathLike, split: str, calib: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a sidecar says about an image source: its split (built-in datasets only; a folder is read whole) and,
    for a held-out set, whether it overlaps the calibration folder - the same folder, or one inside the other
    (then its INT8 accuracy is optimistic)."""
    facts: dict[str, Any] = {"source": str(source)}
    if Path(source).is_dir():
        facts["split"] = None
        if calib is not None and Path(calib).is_dir():
            a, b = Path(calib).resolve(), Path(source).resolve()
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                facts["overlaps_calibration"] = True
    else:
        facts["split"] = split
    return facts


def normalise(x: torch.Tensor, pre: dict[str, Any]) -> torch.Tensor:
    """Raw 0..1 pixels -> the model's normalised input."""
    mean = torch.tensor(pre["mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std
