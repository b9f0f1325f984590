"""Datasets for training/evaluation: built-ins (Fashion-MNIST, digits), class folders, tar, webdataset, HF datasets.

``build_data`` validates the source first (path, layout, class folders) so mistakes surface before
any model is built, and returns the datasets plus what the model needs to know (classes, channels,
normalisation).

Every dataset is map-style (random access), because the training loop's global-batch sampler drives
repeated augmentation, DDP sharding, accumulation and exact resume by index: ``tar`` goes through timm's
reader, ``wds`` and ``hfds`` through our own random-access readers (:mod:`.wds`, :mod:`.hf`).
"""

from __future__ import annotations

import os

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from .builtin import (BUILTIN_DATASETS, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, TensorImageDataset,
                      builtin_name, load_digits, load_fashion_mnist)
from .folder import SafeImageFolder, find_split_dir, skip_none_collate, validate_image_folder
from .images import to_mode
from .sampler import GlobalBatchSampler, preserved_rng, seed_sample, shard_range
from .transforms import CROP_PCT, eval_transform, preprocessing_dict, train_transform
from .wds import shards_named

__all__ = ["DataBundle", "build_data", "BUILTIN_DATASETS", "DATA_FORMATS", "FASHION_MNIST_DIR",
           "GlobalBatchSampler", "preserved_rng", "seed_sample", "shard_range", "skip_none_collate", "validate_image_folder", "SafeImageFolder",
           "SafeTarDataset", "check_channels"]

# the values of data.format (and of ``repvit eval --format``)
DATA_FORMATS = ("auto", "folder", "tar", "wds", "hfds", "hfids")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    train: Dataset | None
    val: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    name: str
    notes: list[str] = field(default_factory=list)
    # the class count was counted from the labels present (integer labels, nothing declares it): a split lacking
    # the highest class counts fewer classes than the model it belongs to
    classes_inferred: bool = False
    collate: Callable = skip_none_collate

    @property
    def preprocessing(self) -> dict:
        return preprocessing_dict(self.in_chans, self.img_size, self.mean, self.std, self.interpolation,
                                  self.crop_pct)


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if not n or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    sub = Subset(ds, sorted(idx))
    sub.targets = [ds.targets[i] for i in sub.indices] if hasattr(ds, "targets") else None  # type: ignore[attr-defined]
    return sub


# the built-ins' own pipeline: pad-crop, flip and erasing on a single-channel tensor, bilinear resize, no eval crop.
# A setting that differs from these values (and from the recipe defaults that mean the same) has no effect on them.
_BUILTIN_SCALE = (0.08, 1.0)
_BUILTIN_REMODE = "pixel"
_BUILTIN_INTERPOLATIONS = ("bicubic", "bilinear")   # the config default, and what the built-ins do
_BUILTIN_EVAL_CROP = "official"


def _ignored_by_builtin(name: str, data: Any, aug: Any, *, train: bool) -> str | None:
    """The notice listing settings that ``name`` (a built-in) does not apply, or None when every one is at its
    neutral value (e.g. an ImageNet recipe run on fashion-mnist: its RandAugment and colour jitter are dropped)."""
    ignored = []
    if train:
        if getattr(aug, "auto_augment", None) not in (None, "", "none"):
            ignored.append(f"aug.auto_augment={aug.auto_augment}")
        if getattr(aug, "color_jitter", 0.0):
            ignored.append(f"aug.color_jitter={aug.color_jitter}")
        scale = tuple(float(v) for v in getattr(aug, "scale", _BUILTIN_SCALE))
        if scale != _BUILTIN_SCALE:
            ignored.append(f"aug.scale={list(scale)}")
        if getattr(aug, "remode", _BUILTIN_REMODE) != _BUILTIN_REMODE:
            ignored.append(f"aug.remode={aug.remode}")
    if getattr(data, "interpolation", "bilinear") not in _BUILTIN_INTERPOLATIONS:
        ignored.append(f"data.interpolation={data.interpolation}")
    if getattr(data, "eval_crop", _BUILTIN_EVAL_CROP) != _BUILTIN_EVAL_CROP:
        ignored.append(f"data.eval_crop={data.eval_crop}")
    for key in ("mean", "std"):
        v = getattr(data, key, None)
        if v and len(v) > 1:
            ignored.append(f"data.{key}={list(v)} (all but the first value)")
    if not ignored:
        return None
    how = "it resizes bilinearly without an evaluation crop and normalises its one channel with a single mean/std"
    if train:
        how += (", and augments only with aug.pad_crop, aug.hflip and aug.reprob (the loop adds mixup/cutmix, "
                "label smoothing and repeated augmentation)")
    return f"NOTICE: the built-in dataset {name} does not apply {', '.join(ignored)}: {how}"


def _builtin(name: str, data: Any, aug: Any, *, train: bool, fallback: bool = True) -> DataBundle:
    notes = []
    if name == "fashion-mnist":
        try:
            splits = load_fashion_mnist(data.download_dir)
            classes: tuple[str, ...] = FASHION_MNIST_CLASSES
        except FileNotFoundError as e:
            if not fallback:     # evaluation: another dataset's accuracy would be reported as Fashion-MNIST's
                raise
            # the embedded default must always run: fall back to digits, loudly
            notes.append(f"NOTICE: {e}. Falling back to the scikit-learn digits dataset.")
            name, splits, classes = "digits", load_digits(), tuple(str(i) for i in range(10))
    else:
        splits, classes = load_digits(), tuple(str(i) for i in range(10))
    ignored = _ignored_by_builtin(name, data, aug, train=train)
    if ignored:
        notes.append(ignored)
    x_tr = splits["train"][0].astype(np.float32) / 255.0
    # normalisation statistics of the training images (stored with the checkpoint's preprocessing)
    mean = tuple(float(m) for m in data.mean) if data.mean else (round(float(x_tr.mean()), 4),)
    std = tuple(float(s) for s in data.std) if data.std else (round(float(x_tr.std()), 4),)
    kw = dict(img_size=data.img_size, mean=mean[0], std=std[0], classes=classes)
    tr = TensorImageDataset(*splits["train"], train=True, pad_crop=aug.pad_crop, hflip=aug.hflip,
                            reprob=aug.reprob, **kw) if train else None
    va = TensorImageDataset(*splits["val"], train=False, **kw)
    # one channel, one value each (a recipe's 3-value mean would make the saved preprocessing unusable)
    return DataBundle(tr, va, len(classes), 1, data.img_size, mean[:1], std[:1], "bilinear", 1.0, name, notes,
                      collate=skip_none_collate)


def _num_classes_of(ds: Any) -> int | None:
    for obj in (ds, getattr(ds, "reader", None)):
        if obj is None:
            continue
        for attr in ("class_to_idx", "class_name_to_idx", "classes"):
            v = getattr(obj, attr, None)
            if v:
                return len(v)
    return None


def _drop_tar_handles(state: Any) -> None:
    """Forget the open archives cached in a timm tar reader's state (a TarState, or a dict of them)."""
    for st in (state.values() if isinstance(state, dict) else [state]):
        st.tf = None
        _drop_tar_handles(getattr(st, "children", {}))


class SafeTarDataset(Dataset):
    """The images of a timm tar reader (``data.format=tar``); ``None`` for an image PIL cannot decode.

    timm's ``ImageDataset`` answers a corrupt image with the *next* index's sample (a lost sample, a duplicated one,
    nothing counted); here it is dropped by :func:`skip_none_collate` and counted, as for class folders.

    ``class_map`` (class name -> index) renumbers the reader's classes: timm sorts names "naturally" (class2 before
    class10), class folders sort them as plain strings; the same data must get the same indices in both formats.
    The reader caches open archive handles; a forked loader worker must not share the parent's (one file position
    for two readers: good images would read as corrupt), so each process opens its own."""

    def __init__(self, reader: Any, transform: Callable | None = None, class_map: dict[str, int] | None = None) -> None:
        self.reader, self.transform = reader, transform
        own = dict(getattr(reader, "class_name_to_idx", None) or {})
        self.class_name_to_idx = dict(class_map) if class_map is not None else own
        remap = {i: self.class_name_to_idx[name] for name, i in own.items() if name in self.class_name_to_idx}
        self._remap = remap if any(k != v for k, v in remap.items()) else None
        self.targets = [self._target(t) for t in getattr(reader, "targets", [])]
        self._pid = os.getpid()

    def _target(self, t: Any) -> int:
        if t is None:
            return -1
        return self._remap[int(t)] if self._remap is not None else int(t)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        if os.getpid() != self._pid:
            _drop_tar_handles(getattr(self.reader, "tar_state", {}))
            self._pid = os.getpid()
        # errors of the archive itself (gone, unreadable) propagate: they are not "an unreadable image"
        f, target = self.reader[i][:2]
        try:
            with Image.open(f) as im:
                img = to_mode(im, "RGB")
        except Exception:  # noqa: BLE001 - any decoder failure means "unreadable", the sample is skipped
            return None
        return (self.transform(img) if self.transform else img), self._target(target)


def _tar_has_no_images(path: str) -> bool:
    """True when the archive at ``path`` opens but holds no image file (timm's reader fails on it obscurely)."""
    import tarfile

    from timm.data.readers.img_extensions import get_img_extensions
    exts = get_img_extensions(as_set=True)
    try:
        with tarfile.open(path) as tf:
            return not any(m.isfile() and os.path.splitext(m.name)[1].lower() in exts for m in tf)
    except (OSError, tarfile.TarError):
        return False


def _hf_align_classes(src: str, tr: Any, va: Any, val_split: str) -> None:
    """Give the validation split the training split's class indices when both name their classes (ClassLabel).

    ``class_encode_column`` (or an ``imagefolder`` load) numbers each split's classes on its own: a validation split
    lacking a class would shift every later label. Its names must be a subset of the training split's."""
    if not (tr.named_classes and va.named_classes) or list(va.classes) == list(tr.classes):
        return
    t_idx = {c: i for i, c in enumerate(tr.classes)}
    only_val = [c for c in va.classes if c not in t_idx]
    if only_val:
        raise ValueError(f"split {val_split!r} of Hugging Face dataset {src!r} has classes the training split lacks "
                         f"(only in {val_split}: {', '.join(map(str, only_val[:5]))}"
                         f"{' ...' if len(only_val) > 5 else ''}); both splits need the same class names")
    va.remap_classes(list(tr.classes))


def check_channels(model_chans: int | None, data_chans: int, *, who: str, data_name: str, fix: str) -> None:
    """Raise ValueError when a model's input channel count differs from the data's (an unknown count passes).
    ``fix`` says what to do."""
    if model_chans is None or int(model_chans) == int(data_chans):
        return
    kind = {1: " (grayscale)", 3: " (RGB)"}
    raise ValueError(f"{who} expects {model_chans}-channel{kind.get(int(model_chans), '')} images but {data_name} "
                     f"gives {data_chans}-channel{kind.get(int(data_chans), '')} ones: {fix}")


def _check_split_classes(src: str, n_val: int, n_train: int | None, given: int | None) -> None:
    """Labels are class indices: the splits must agree on the class count unless model.num_classes fixes it."""
    if n_train is not None and not given and n_val > n_train:
        raise ValueError(f"the validation split of {src!r} has labels up to {n_val - 1} but the training split only "
                         f"up to {n_train - 1}; set model.num_classes (or num_classes in the info file)")


def _is_wds_info(path: Path) -> bool:
    """``info.json`` is a common name: it marks a webdataset only when it describes splits (a class-folder dataset
    may carry an info.json of its own)."""
    import json
    try:
        return isinstance(json.loads(path.read_text()).get("splits"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _detect_format(root: Path, splits: tuple[str, ...]) -> str:
    """``data.format=auto``: the format of ``root`` from the files of the splits asked for (an evaluation-only
    folder holding just ``val.tar`` is a tar folder, not a class folder lacking ``val/``)."""
    if root.suffix == ".tar" or any((root / f"{s}.tar").exists() for s in splits):
        return "tar"
    if ((root / "_info.json").is_file() or _is_wds_info(root / "info.json")
            or any(any(shards_named(root, s)) or any(root.glob(f"{s}/*.tar")) for s in splits)):
        return "wds"                 # with an info file, or shards named by split (as wds.py finds them)
    if ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()
            or any((root / s / "state.json").is_file() for s in splits)):
        return "hfds"                # DatasetDict.save_to_disk, Dataset.save_to_disk, or <split>/ of those
    return "folder"


def _check_labels_fit(bundle: DataBundle, num_classes: int, src: str) -> None:
    """Every label must be a valid output index of a ``num_classes``-way model: a larger one would fail deep in the
    loss (or as a CUDA device assert) at the first batch that holds it."""
    for split, ds in (("training", bundle.train), ("validation", bundle.val)):
        targets = getattr(ds, "targets", None) if ds is not None else None
        top = max(targets) if targets is not None and len(targets) else -1
        if top >= num_classes:
            raise ValueError(f"the {split} split of {src!r} has labels up to {top} ({top + 1} classes) but "
                             f"model.num_classes is {num_classes}; set it to at least {top + 1}, or leave it unset "
                             "to take the data's class count")


def build_data(data: Any, aug: Any, *, train: bool = True, seed: int = 0, num_classes: int | None = None,
               fallback: bool = True) -> DataBundle:
    """Validate and build the datasets described by ``data`` (a DataConfig) and ``aug`` (an AugConfig).

    ``num_classes``: the model's class count, when fixed; every label must fit it. ``fallback=False`` (evaluation): a missing Fashion-MNIST is an error instead of the digits stand-in."""
    src = os.path.expanduser(str(data.dataset))    # "~/data/imagenet" from a YAML recipe or --data
    b = builtin_name(src)
    if b is not None and not Path(src).exists():
        bundle = _builtin(b, data, aug, train=train, fallback=fallback)
    else:
        mean = tuple(data.mean) if data.mean else IMAGENET_MEAN
        std = tuple(data.std) if data.std else IMAGENET_STD
        crop_pct = CROP_PCT[data.eval_crop]
        tf_tr = train_transform(data.img_size, aug, interpolation=data.interpolation, mean=mean, std=std)
        tf_ev = eval_transform(data.img_size, eval_crop=data.eval_crop, interpolation=data.interpolation,
                               mean=mean, std=std)
        fmt = data.format
        root = Path(src)
        if fmt == "auto":
            fmt = _detect_format(root, (data.train_split, data.val_split) if train else (data.val_split,))
        if fmt == "folder":
            if src == "imagenet" and not root.exists():
                raise FileNotFoundError("this recipe trains on ImageNet: pass --data /path/to/imagenet "
                                        "(a folder with train/ and val/ class folders)")
            va = SafeImageFolder(find_split_dir(root, data.val_split), tf_ev)
            tr = SafeImageFolder(find_split_dir(root, data.train_split), tf_tr, classes=va.classes) if train else None
            n_cls = len(va.classes)
        elif fmt == "wds":
            from .wds import WdsDataset
            tr = WdsDataset(root, data.train_split, tf_tr, num_classes=num_classes) if train else None
            va = WdsDataset(root, data.val_split, tf_ev,
                            num_classes=num_classes or (tr.num_classes if tr is not None else None))
            n_cls = num_classes or max(va.num_classes, tr.num_classes if tr is not None else 0)
            _check_split_classes(src, va.num_classes, tr.num_classes if tr is not None else None, num_classes)
        elif fmt == "hfds":
            from .hf import HFImageDataset
            hf_notes: list[str] = []
            tr = (HFImageDataset(src, data.train_split, tf_tr, cache_dir=data.download_dir, num_classes=num_classes)
                  if train else None)
            va = HFImageDataset(src, data.val_split, tf_ev, cache_dir=data.download_dir,
                                num_classes=num_classes or (len(tr.classes) if tr is not None else None),
                                num_classes_from="model.num_classes" if num_classes else "the training split")
            if tr is not None:
                _hf_align_classes(src, tr, va, data.val_split)
            elif va.named_classes:
                # evaluation: the model's class indices are the training split's, so read that split's names too
                # (its rows are not decoded); without it, say that the order could not be checked
                from types import SimpleNamespace

                from .hf import hub_class_names
                names = hub_class_names(src, data.download_dir)   # a hub dataset: its metadata, no download
                try:
                    ref = (SimpleNamespace(named_classes=True, classes=names) if names is not None else
                           HFImageDataset(src, data.train_split, None, cache_dir=data.download_dir))
                except Exception as e:  # noqa: BLE001 - no training split here (an eval-only dataset)
                    hf_notes.append(f"note: could not read the {data.train_split!r} split of {src!r} ({e}); the "
                                    f"{data.val_split!r} split's own class order is used - it matches the model "
                                    "only if every class is present in it")
                else:
                    if ref.named_classes:
                        _hf_align_classes(src, ref, va, data.val_split)
            n_cls = num_classes or max(len(va.classes), len(tr.classes) if tr is not None else 0)
            _check_split_classes(src, len(va.classes), len(tr.classes) if tr is not None else None, num_classes)
        elif fmt == "hfids":
            raise ValueError("data.format=hfids (streaming Hugging Face datasets) is not supported: the training "
                             "loop samples by index (repeated augmentation, DDP sharding, exact resume). Use "
                             "data.format=hfds, which reads the same datasets with random access")
        else:                        # tar: timm's reader
            from timm.data import create_dataset
            if not root.exists():
                raise FileNotFoundError(f"dataset path {root} does not exist")

            def split_root(split: str) -> str:
                # a folder holding train.tar / val.tar: open the split's own archive (timm would read them all)
                if root.is_dir():
                    f = root / f"{split}.tar"
                    if not f.is_file():
                        raise FileNotFoundError(f"{root} has no {split}.tar; expected {split}.tar holding "
                                                f"<class>/<image> entries")
                    return str(f)
                return str(root)
            if train and root.is_file():
                # one archive would be both the training and the validation data: accuracy would be measured
                # on training images without a word
                raise ValueError(f"{root} is a single archive, but training needs separate splits: put "
                                 f"{data.train_split}.tar and {data.val_split}.tar in one folder and pass the folder "
                                 "(evaluating a single archive with repvit eval is fine)")
            val_root = split_root(data.val_split)
            train_root = split_root(data.train_split) if train else None

            def open_split(split_root_: str, split: str, training: bool, tf, class_map=None):
                try:
                    ds = create_dataset("", root=split_root_, split=split, is_training=training)
                except Exception as e:  # noqa: BLE001 - timm readers raise many types; report them uniformly
                    if _tar_has_no_images(split_root_):
                        raise ValueError(f"{split_root_} holds no images (.jpg, .png, ...); expected "
                                         "<class>/<image> entries") from e
                    raise ValueError(f"could not open {src!r} as {fmt} data: {e}") from e
                names = ds.reader.class_name_to_idx
                if "" in names:
                    raise ValueError(f"{split_root_} has images at its top level, outside any class folder; put each "
                                     "class's images in <class>/ inside the archive (the folder name is the label)")
                if class_map is None:        # plain string order, as for class folders (timm sorts "naturally")
                    class_map = {c: i for i, c in enumerate(sorted(names))}
                elif set(names) - set(class_map):
                    # the training archive's indices: a class of the val archive's own has none
                    only = sorted(set(names) - set(class_map))
                    raise ValueError(f"{split_root_} has classes the training archive lacks (only in {split}: "
                                     f"{', '.join(only[:5])}); both archives need the same <class>/ folders")
                # read through timm's reader, decode ourselves: skip and count a corrupt image (timm's
                # ImageDataset would return the next index's sample instead)
                return SafeTarDataset(ds.reader, tf, class_map)
            tr = open_split(train_root, data.train_split, True, tf_tr) if train else None
            if tr is not None:
                # a val archive lacking a class keeps the training indices (timm would renumber its own)
                va = open_split(val_root, data.val_split, False, tf_ev, class_map=tr.class_name_to_idx)
            else:
                va = open_split(val_root, data.val_split, False, tf_ev)
            # the archives' own class count (named classes): a model head of another size is the caller's check
            n_cls = _num_classes_of(tr if tr is not None else va) or num_classes
            if not n_cls:
                raise ValueError(f"cannot tell the number of classes of {src!r}; set model.num_classes")
        bundle = DataBundle(tr, va, n_cls, 3, data.img_size, mean, std, data.interpolation, crop_pct, src)
        bundle.classes_inferred = not num_classes and all(
            getattr(d, "classes_inferred", False) for d in (tr, va) if d is not None)
        if fmt == "hfds":
            bundle.notes.extend(hf_notes)
    if num_classes:
        _check_labels_fit(bundle, num_classes, src)
    if train and bundle.train is not None:
        bundle.train = _subset(bundle.train, data.max_train_samples, seed)
    bundle.val = _subset(bundle.val, data.max_val_samples, seed + 1)
    if train and bundle.train is not None and len(bundle.train) == 0:
        raise ValueError(f"the training split of {src!r} is empty")
    return bundle
