"""Hugging Face ``datasets`` image classification data (``data.format=hfds``), read with random access.

``--data`` is one of:

* a folder written by ``DatasetDict.save_to_disk`` (holds ``dataset_dict.json``; the splits are its keys), or a
  folder whose ``<split>/`` subfolders were each written by ``Dataset.save_to_disk``;
* anything ``datasets.load_dataset`` opens: a hub id (cached under ``data.download_dir``) or a local folder of
  data files (parquet, arrow, an ``imagefolder`` tree, ...).

The split needs an image column (``image``, or ``img``) and an integer label column (``label``, or
``labels``/``fine_label``); the class names come from a ``ClassLabel`` feature when there is one. Like
:class:`~repvit.data.folder.SafeImageFolder`, an image that cannot be decoded gives ``None`` (dropped
from its batch and counted). ``hfids`` (streaming) is not supported: the training loop's sampler
needs random access.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from torch.utils.data import Dataset

from .images import to_mode

__all__ = ["HFImageDataset", "open_hf_split"]

IMAGE_KEYS = ("image", "img")
LABEL_KEYS = ("label", "labels", "fine_label")


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("data.format=hfds needs the Hugging Face datasets package: pip install datasets") from e
    return datasets


def _saved_splits(path: Path) -> list[str]:
    """The split names a ``DatasetDict.save_to_disk`` folder's ``dataset_dict.json`` lists."""
    redo = "save the DatasetDict again with save_to_disk"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:                  # JSONDecodeError, or bytes that are not UTF-8 text
        raise ValueError(f"{path} is not valid JSON ({e}); it should hold {{\"splits\": [\"train\", ...]}}, "
                         f"so {redo}") from e
    splits = meta.get("splits") if isinstance(meta, dict) else None
    if not isinstance(splits, list) or not all(isinstance(k, str) and k for k in splits):
        raise ValueError(f"{path} must hold {{\"splits\": [\"train\", ...]}} (a list of split names), not "
                         f"{json.dumps(meta)[:80]}; {redo}")
    return splits


def _load_saved(datasets, path: Path, what: str, redo: str = "save it again with save_to_disk"):
    """``Dataset.load_from_disk(path)``, with errors that name the folder and say ``redo``: FileNotFoundError for a
    missing file, ValueError for a damaged one (the original error is the cause)."""
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as e:           # the folder, its state.json / dataset_info.json, or an .arrow file
        need = [n for n in ("state.json", "dataset_info.json") if not (path / n).is_file()]
        if not path.is_dir():
            lacks = "does not exist"
        elif need:
            lacks = f"lacks {' and '.join(need)}, which Dataset.save_to_disk writes"
        else:
            lacks = f"is incomplete ({e})"
        raise FileNotFoundError(f"Hugging Face dataset folder {path} ({what}) {lacks}; {redo}") from e
    except OSError:                          # permissions, I/O errors: they name their file already
        raise
    except Exception as e:  # noqa: BLE001 - bad JSON, a state.json without its entries, a damaged .arrow file
        raise ValueError(f"Hugging Face dataset folder {path} ({what}) is damaged "
                         f"({type(e).__name__}: {e}); {redo}") from e


def open_hf_split(src: str, split: str, cache_dir: str | None = None):
    """The ``datasets.Dataset`` of ``split``; clear errors for a missing path or split."""
    datasets = _import_datasets()
    root = Path(src)
    if root.is_dir() and (root / "dataset_dict.json").is_file():      # DatasetDict.save_to_disk
        splits = _saved_splits(root / "dataset_dict.json")
        if split not in splits:
            raise ValueError(f"Hugging Face dataset {root} has no split {split!r} (splits: {', '.join(splits)}); "
                             f"set data.train_split / data.val_split to one of them")
        # the split's own folder (what DatasetDict.load_from_disk reads for each split): the others are not opened
        return _load_saved(datasets, root / split, f"split {split!r} listed in {root / 'dataset_dict.json'}",
                           "save the DatasetDict again with save_to_disk")
    if root.is_dir() and (root / "state.json").is_file():             # a single Dataset.save_to_disk
        raise ValueError(f"{root} holds one saved Hugging Face Dataset without splits; save a DatasetDict "
                         f"(train/validation ...) or put each split's save_to_disk folder in {root}/<split>/")
    if root.is_dir() and (root / split / "state.json").is_file():     # <split>/ folders of Dataset.save_to_disk
        return _load_saved(datasets, root / split, f"split {split!r} of {root}")
    if root.is_dir() and any((p / "state.json").is_file() for p in root.iterdir() if p.is_dir()):
        have = sorted(p.name for p in root.iterdir() if (p / "state.json").is_file())
        raise ValueError(f"Hugging Face dataset {root} has no split {split!r} (splits: {', '.join(have)}); "
                         f"set data.train_split / data.val_split to one of them")
    if not root.exists() and (src.startswith((".", "/", "~")) or os.sep in src and src.count("/") > 1):
        raise FileNotFoundError(f"Hugging Face dataset path {src} does not exist")
    try:
        return datasets.load_dataset(src, split=split, cache_dir=cache_dir)
    except ValueError as e:   # an unknown split is a ValueError naming the splits that exist
        raise ValueError(f"Hugging Face dataset {src!r}: cannot load split {split!r}: {e}") from e
    except Exception as e:    # noqa: BLE001 - offline, unknown id, unreadable files: report them uniformly
        raise ValueError(f"could not open {src!r} as a Hugging Face dataset (data.format=hfds): {e}") from e


def hub_class_names(src: str, cache_dir: str | None = None) -> list[str] | None:
    """The class names a Hugging Face hub dataset declares (its ClassLabel), read from the dataset's metadata
    without downloading any split; None when ``src`` is a local path, the names cannot be read, or the label is
    not a ClassLabel. Evaluation needs the training split's class order, not its images."""
    if Path(src).expanduser().exists():
        return None
    datasets = _import_datasets()
    try:
        features = datasets.load_dataset_builder(src, cache_dir=cache_dir).info.features or {}
    except Exception:  # noqa: BLE001 - offline, unknown id: the caller falls back to what it has
        return None
    feat = next((features[k] for k in LABEL_KEYS if k in features), None)
    return list(feat.names) if isinstance(feat, datasets.ClassLabel) else None


def _column(ds: Any, keys: tuple[str, ...], what: str, src: str) -> str:
    for k in keys:
        if k in ds.column_names:
            return k
    raise ValueError(f"Hugging Face dataset {src!r} has no {what} column (looked for {', '.join(keys)}; "
                     f"columns: {', '.join(ds.column_names)})")


def _int_labels(values: list, key: str, split: str, src: str) -> list[int]:
    """One integer class index per image, or a ValueError that says what the column holds instead."""
    out = []
    for i, t in enumerate(values):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or (isinstance(t, float) and not t.is_integer()):
            kind = ("a list (multi-label?)" if isinstance(t, (list, tuple)) else f"{type(t).__name__} {t!r}")
            raise ValueError(f"label column {key!r} of split {split!r} of Hugging Face dataset {src!r} must hold one "
                             f"integer class index per image; row {i} holds {kind}. Map it to class indices first "
                             "(e.g. datasets' class_encode_column / cast to ClassLabel) and save_to_disk")
        out.append(int(t))
    return out


class HFImageDataset(Dataset):
    """``(image, label)`` items of one split; ``None`` for an image PIL cannot decode."""

    def __init__(self, src: str, split: str, transform: Callable | None = None, *, cache_dir: str | None = None,
                 num_classes: int | None = None, num_classes_from: str = "model.num_classes") -> None:
        datasets = _import_datasets()
        ds = open_hf_split(src, split, cache_dir)
        self.image_key = _column(ds, IMAGE_KEYS, "image", src)
        self.label_key = _column(ds, LABEL_KEYS, "label", src)
        feat = ds.features[self.label_key]
        # decode ourselves (skip unreadable images instead of raising inside datasets)
        try:
            self.ds = ds.cast_column(self.image_key, datasets.Image(decode=False))
        except Exception as e:  # noqa: BLE001 - arrow's cast errors (ArrowNotImplementedError, ...) vary by type
            raise ValueError(f"image column {self.image_key!r} of split {split!r} of Hugging Face dataset {src!r} "
                             f"holds {ds.features[self.image_key]}, not images ({type(e).__name__}: {e}); it must be "
                             "an Image feature, or image file paths / encoded image bytes") from e
        self.targets = _int_labels(self.ds[self.label_key], self.label_key, split, src)
        if len(self.targets) == 0:
            raise ValueError(f"split {split!r} of Hugging Face dataset {src!r} is empty")
        # named classes (a ClassLabel feature): build_data maps the validation split onto the training split's
        self.named_classes = isinstance(feat, datasets.ClassLabel)
        if self.named_classes:
            self.classes = list(feat.names)
        else:
            self.classes = [str(i) for i in range(num_classes or max(self.targets) + 1)]
        self.classes_inferred = not self.named_classes and not num_classes   # counted from the labels present
        bad = [t for t in self.targets if not 0 <= t < len(self.classes)]
        if bad:
            if -1 in bad:
                cause = ("-1 marks unlabelled images (a test split usually has no labels): evaluate on a labelled "
                         "split")
            elif min(bad) < 0:
                cause = "class indices cannot be negative"
            elif self.named_classes:
                cause = (f"its ClassLabel feature names only {len(self.classes)} classes: fix the label column or "
                         "the feature's names")
            else:
                cause = (f"the class count is {len(self.classes)}, from {num_classes_from}: raise model.num_classes "
                         "to cover every label")
            raise ValueError(f"split {split!r} of Hugging Face dataset {src!r} has labels outside "
                             f"0..{len(self.classes) - 1} (e.g. {bad[0]}; {cause})")
        self.src, self.split, self.transform = src, split, transform

    def remap_classes(self, classes: list[str]) -> None:
        """Renumber the labels by ``classes`` (a superset of this split's class names), e.g. the training split's."""
        idx = {c: i for i, c in enumerate(classes)}
        missing = [c for c in self.classes if c not in idx]
        if missing:
            raise ValueError(f"split {self.split!r} of Hugging Face dataset {self.src!r}: classes "
                             f"{', '.join(map(str, missing[:5]))} are not among {len(classes)} given classes")
        new = [idx[c] for c in self.classes]
        self.targets = [new[t] for t in self.targets]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        item = self.ds[i][self.image_key]
        try:
            if item.get("bytes"):
                im = Image.open(io.BytesIO(item["bytes"]))
            else:
                im = Image.open(item["path"])
            with im:
                img = to_mode(im, "RGB")
        except Exception:  # noqa: BLE001 - any decoder failure means "unreadable", the sample is skipped
            return None
        return (self.transform(img) if self.transform else img), self.targets[i]
