"""Class-folder datasets: up-front layout validation and a loader that skips unreadable images.

Validation runs before any training starts so a wrong path or layout fails in seconds with a
message saying what to fix. At load time a corrupt image never crashes a run: the sample is
dropped from its batch by :func:`skip_none_collate` and counted, and the count is logged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from .images import to_mode

__all__ = ["IMG_EXTENSIONS", "validate_image_folder", "find_split_dir", "SafeImageFolder", "skip_none_collate"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_split_dir(root: str | os.PathLike, split: str) -> Path:
    """``root/split`` (ImageNet layout); a clear error when the path or the split is missing."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset path {root} does not exist; pass --data with a folder holding "
                                f"train/ and val/ class folders, or a built-in name (fashion-mnist, digits)")
    if not root.is_dir():
        raise ValueError(f"dataset path {root} is a file; for .tar / webdataset / HF data set data.format "
                         f"(tar, wds, hfds) - class-folder data must be a directory with train/ and val/")
    d = root / split
    if not d.is_dir():
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())[:8]
        raise ValueError(f"dataset {root} has no '{split}/' folder (found: {', '.join(subdirs) or 'no folders'}); "
                         f"expected the ImageNet layout {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
    return d


def validate_image_folder(split_dir: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Return (classes, samples) of a class-folder split, raising if the layout is wrong.

    Errors: no class folders, images lying directly in the split folder, class folders with
    no images (named, so they can be removed or filled).
    """
    split_dir = Path(split_dir)
    entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if not classes:
        extra = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise ValueError(f"{split_dir} has no class folders{extra}; put each class's images in its own "
                         f"subfolder: {split_dir}/<class_name>/<image>.jpg")
    samples, empty = [], []
    for idx, cls in enumerate(classes):
        files = []
        for dirpath, _, names in os.walk(split_dir / cls, followlinks=True):
            files.extend(os.path.join(dirpath, n) for n in names if _is_image(n))
        if not files:
            empty.append(cls)
        samples.extend((f, idx) for f in sorted(files))
    if empty:
        raise ValueError(f"{len(empty)} class folder(s) in {split_dir} contain no images "
                         f"({', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}); remove them or add images "
                         f"(extensions: {', '.join(IMG_EXTENSIONS)})")
    return classes, samples


class SafeImageFolder(Dataset):
    """ImageFolder that returns ``None`` for an image PIL cannot decode instead of raising."""

    def __init__(self, split_dir: str | os.PathLike, transform: Callable | None = None,
                 classes: list[str] | None = None) -> None:
        found, samples = validate_image_folder(split_dir)
        if classes is not None and found != list(classes):
            # ``classes`` are the reference split's (build_data passes val's when building train)
            only_here = sorted(set(found) - set(classes))[:5]
            only_ref = sorted(set(classes) - set(found))[:5]
            parts = [f"only in {split_dir}: {', '.join(only_here)}" if only_here else "",
                     f"missing from {split_dir}: {', '.join(only_ref)}" if only_ref else ""]
            raise ValueError(f"the class folders of the training and validation splits differ "
                             f"({'; '.join(p for p in parts if p)}); train/ and val/ need the same class folders")
        self.root, self.classes, self.samples = Path(split_dir), found, samples
        self.targets = [t for _, t in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        try:
            with Image.open(path) as im:
                img = to_mode(im, "RGB")
        except Exception:  # noqa: BLE001 - any decoder failure means "unreadable", the sample is skipped
            return None
        return (self.transform(img) if self.transform else img), target


def skip_none_collate(batch: list) -> tuple:
    """Collate, dropping unreadable samples (``None``); returns (*collated fields, n_skipped)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:  # every sample unreadable: empty images, targets (and indices)
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    return (*default_collate(good), skipped)
