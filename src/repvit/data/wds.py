"""Webdataset shards read with random access (``data.format=wds``), so they train like any other dataset.

timm's webdataset reader streams: it is an iterable dataset with no ``__getitem__``, which our
global-batch sampler (repeated augmentation, DDP sharding, gradient accumulation, exact resume) cannot
drive. Uncompressed tar shards do allow random access, so :class:`WdsDataset` indexes the shards once
(member headers only, plus the tiny ``.cls`` label members) and then reads each image by offset.

Layout (the one timm reads; `timm/imagenet-1k-wds` on the Hugging Face hub is an example)::

    ROOT/_info.json            {"splits": {"train": {"name": "train", "num_samples": N,
                                 "filenames": ["x-train-0000.tar", ...], "shard_lengths": [n0, ...]},
                                 "validation": {...}}, "num_classes": C (optional)}
    ROOT/x-train-0000.tar      members KEY.jpg (or .jpeg/.png/.webp) + KEY.cls (the class index as text)
                               [+ KEY.json with a "label" field instead of .cls]

Without ``_info.json`` the shards of a split are found by name: ``*{split}-*.tar`` / ``{split}/*.tar``.
No ``webdataset`` package is needed. Like :class:`~repvit.data.folder.SafeImageFolder`, an image that
cannot be decoded gives ``None`` (dropped from its batch and counted); a label that cannot be read (a bad
``.cls``, a ``.json`` that is not JSON or has no label) is an error naming the shard and the sample key, and
so is a malformed info file (naming the file and the entry).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Callable

from PIL import Image
from torch.utils.data import Dataset

from .images import to_mode

__all__ = ["WdsDataset", "load_wds_info", "wds_split_shards"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
INFO_NAMES = ("_info.json", "info.json")
SPLITS_SHAPE = '{"splits": {"train": {"filenames": ["x-train-0000.tar", ...], "num_samples": N}, ...}}'
MAX_OPEN_SHARDS = 64                     # shard files kept open per process (least recently used closed first)


def _info_file(root: Path) -> Path | None:
    """The info file of ``root`` (``_info.json`` or ``info.json``), None when there is none."""
    return next((root / n for n in INFO_NAMES if (root / n).is_file()), None)


def load_wds_info(root: Path) -> dict:
    """``ROOT/_info.json`` (or ``info.json``) as a dict; ``{}`` when there is none; an error when it is unreadable."""
    p = _info_file(root)
    if p is None:
        return {}
    try:
        info = json.loads(p.read_text())
    except ValueError as e:                  # also a UnicodeDecodeError (not UTF-8 text)
        raise ValueError(f"{p} is not valid JSON ({e})") from e
    if not isinstance(info, dict):
        raise ValueError(f"{p} must hold a JSON object with a 'splits' entry, not {_a_json(info)}")
    return info


def _a_json(v: object) -> str:
    """The JSON type of a parsed value with its article, for messages: "a list", "an object", "a string"."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(v), f"a {type(v).__name__}")


def _count(v: object, what: str, where: str) -> int:
    """A non-negative integer from an info file (a whole number, or such a number written as text)."""
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    if isinstance(v, float) and v.is_integer() and v >= 0:
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{where}: {what} is {v!r}; it must be a non-negative whole number (or be left out)")
    return v


def _split_filenames(s: dict, where: str) -> list[str]:
    """The shard file names of one split entry: a list of names, or one name given as a string."""
    names = s.get("filenames")
    if isinstance(names, str):               # one shard: a single name is that name, not its characters
        names = [names]
    if not names:
        raise ValueError(f"{where} lists no shard 'filenames'; give the split's shard files, like {SPLITS_SHAPE}")
    if not isinstance(names, list):
        raise ValueError(f"{where}: 'filenames' is {_a_json(names)}; it must be a list of shard file names, "
                         f"like {SPLITS_SHAPE}")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"{where}: filenames[{i}] is {n!r}; each entry must be a shard file name (a string, "
                             f"relative to the dataset folder)")
    seen: set[str] = set()
    dup = next((n for n in names if n in seen or seen.add(n)), None)
    if dup is not None:
        raise ValueError(f"{where} lists the shard {dup!r} more than once; each shard must be listed once "
                         f"(its samples would be read twice)")
    return names


def wds_split_shards(root: Path, split: str, info: dict) -> tuple[list[Path], int | None]:
    """The shard files of ``split`` and their declared sample count (None when not declared)."""
    if info:
        p = _info_file(root) or root / INFO_NAMES[0]
        splits = info.get("splits")
        if not isinstance(splits, dict):
            got = "missing" if "splits" not in info else _a_json(splits)
            raise ValueError(f"the 'splits' entry of webdataset info file {p} is {got}; it must be an object that maps "
                             f"each split name to its shards, like {SPLITS_SHAPE}")
        if split not in splits:
            raise ValueError(f"webdataset {root}: split {split!r} is not in {p} "
                             f"(splits: {', '.join(sorted(map(str, splits))) or 'none'}); set data.train_split / "
                             f"data.val_split to one of them")
        s = splits[split]
        where = f"split {split!r} of webdataset info file {p}"
        if not isinstance(s, dict):
            raise ValueError(f"{where} is {_a_json(s)}; it must be an object with the split's 'filenames' "
                             f"(and optionally 'num_samples'), like {SPLITS_SHAPE}")
        shards = [root / n for n in _split_filenames(s, where)]
        declared = s.get("num_samples")
        if declared is not None:
            declared = _count(declared, "num_samples", where)
        elif s.get("shard_lengths"):
            lengths = s["shard_lengths"]
            if not isinstance(lengths, list):
                raise ValueError(f"{where}: 'shard_lengths' is {_a_json(lengths)}; it must be a list with the "
                                 f"sample count of each shard")
            declared = sum(_count(n, f"shard_lengths[{i}]", where) for i, n in enumerate(lengths))
    else:
        shards = sorted(set(shards_named(root, split)) | set(root.glob(f"{split}/*.tar")))
        if not shards:
            tars = sorted(p.name for p in root.glob("*.tar"))[:5]
            raise FileNotFoundError(
                f"webdataset {root}: no {INFO_NAMES[0]} and no shards named *{split}-*.tar or {split}/*.tar "
                f"(found: {', '.join(tars) or 'no .tar files'}); add an {INFO_NAMES[0]} listing each split's "
                f"'filenames' (timm's layout) or name the shards <prefix>-{split}-NNNN.tar")
        declared = None
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset {root}: {len(missing)} shard(s) of split {split!r} are missing: "
                                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return shards, declared


def shards_named(root: Path, split: str) -> list[Path]:
    """``ROOT/*<split>-*.tar`` with the split name as a whole word of the file name ("val" must not pick up
    "trainval-0000.tar")."""
    return [p for p in root.glob(f"*{split}-*.tar") if re.search(rf"(^|[-_.]){re.escape(split)}-", p.name)]


def _key_ext(name: str) -> tuple[str, str]:
    """webdataset's member grouping: key = path up to the first '.' of the basename, ext = the rest (lower case)."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower() if dot else ""


def _label_of(tf: tarfile.TarFile, members: dict[str, tarfile.TarInfo], where: str) -> int:
    """The class index of one sample: its ``.cls`` member, else the label field of its ``.json`` member.

    An unreadable label is a data error (ValueError naming the shard and the key), unlike an unreadable
    image, which is skipped at read time: a wrong or missing label cannot be dropped silently."""
    if "cls" in members:
        raw = tf.extractfile(members["cls"]).read()   # type: ignore[union-attr]
        try:
            return int(raw.decode().strip())
        except ValueError as e:
            raise ValueError(f"{where}: its .cls member holds {raw[:20]!r}, not a class index; fix the shard "
                             f"(a .cls member holds the class index as text, e.g. b'3')") from e
    meta = None
    if "json" in members:
        raw = tf.extractfile(members["json"]).read()   # type: ignore[union-attr]
        try:
            meta = json.loads(raw)
        except ValueError as e:              # JSONDecodeError, or bytes that are not UTF-8 text
            raise ValueError(f"{where}: its .json member is not valid JSON ({e}; starts {raw[:20]!r}); fix the "
                             f"shard, or give the sample a .cls member with its class index") from e
        for k in ("label", "cls", "target"):
            v = meta.get(k) if isinstance(meta, dict) else None
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, str) and v.strip().isdigit():   # writers that store every field as text
                return int(v)
    has = ""
    if isinstance(meta, dict):
        has = f"; its .json has the fields {', '.join(sorted(map(str, meta)))[:80] or '(none)'}"
    elif meta is not None:
        has = f"; its .json holds {_a_json(meta)}"
    raise ValueError(f"{where}: no label (a .cls member, or a .json member with an integer 'label'){has}")


def _info_classes(root: Path, info: dict) -> tuple[int | None, list[str] | None]:
    """The optional ``num_classes`` and ``classes`` (class names by index) of an info file, checked."""
    where = f"webdataset info file {_info_file(root) or root / INFO_NAMES[0]}"
    n = info.get("num_classes")
    if n is not None:
        n = _count(n, "num_classes", where) or None      # 0: not given (as before)
    classes = info.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or any(isinstance(c, (dict, list)) or c is None for c in classes):
            raise ValueError(f"{where}: 'classes' must be a list of class names in class-index order "
                             f"(e.g. [\"cat\", \"dog\"]), not {str(classes)[:60]!r}")
        classes = [str(c) for c in classes] or None
        if n is not None and classes is not None and len(classes) != n:
            raise ValueError(f"{where}: num_classes is {n} but 'classes' names {len(classes)}; make them agree "
                             f"(or drop one of them)")
    return n, classes


class WdsDataset(Dataset):
    """Map-style view of the webdataset shards of one split: ``(image, class index)`` or ``None`` if undecodable."""

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 num_classes: int | None = None) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"webdataset folder {self.root} does not exist (data.format=wds expects a "
                                    f"folder of .tar shards with timm's {INFO_NAMES[0]})")
        info = load_wds_info(self.root)
        self.shards, declared = wds_split_shards(self.root, split, info)
        info_n, info_classes = _info_classes(self.root, info)     # checked before the (long) indexing
        self.samples: list[tuple[int, int, int]] = []    # (shard, data offset, size)
        self.targets: list[int] = []
        for si, shard in enumerate(self.shards):
            self._index(si, shard)
        if not self.samples:
            raise ValueError(f"webdataset {self.root}: split {split!r} has no samples with an image "
                             f"({'/'.join(IMAGE_EXTS)}) in {len(self.shards)} shard(s)")
        if declared is not None and declared != len(self.samples):
            raise ValueError(f"webdataset {self.root}: split {split!r} declares {declared} samples in its info file "
                             f"but its shards hold {len(self.samples)}; fix num_samples/shard_lengths or the shards")
        n_cls = num_classes or info_n or (len(info_classes) if info_classes else None)
        self.num_classes = int(n_cls) if n_cls else max(self.targets) + 1
        self.classes_inferred = not n_cls       # counted from the labels present (no declared class count)
        bad = [t for t in self.targets if not 0 <= t < self.num_classes]
        if bad:
            raise ValueError(f"webdataset {self.root}: split {split!r} has labels outside 0..{self.num_classes - 1} "
                             f"(e.g. {bad[0]}); check num_classes in the info file or model.num_classes")
        self.classes = info_classes or [str(i) for i in range(self.num_classes)]
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def _index(self, si: int, shard: Path) -> None:
        try:
            tf = tarfile.open(shard, mode="r:")     # uncompressed only: random access needs plain offsets
        except tarfile.ReadError as e:
            raise ValueError(f"webdataset shard {shard} is not an uncompressed tar file ({e})") from e
        with tf:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            order: list[str] = []
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _key_ext(m.name)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext] = m
                for key in order:
                    members = groups[key]
                    img = next((members[e] for e in IMAGE_EXTS if e in members), None)
                    if img is None:
                        continue
                    self.targets.append(_label_of(tf, members, f"webdataset shard {shard}, sample {key!r}"))
                    self.samples.append((si, img.offset_data, img.size))
            except tarfile.TarError as e:          # cut short (an interrupted copy or download), or damaged
                raise ValueError(f"webdataset shard {shard} is truncated or damaged ({e}); copy or build it "
                                 f"again") from e

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, si: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():          # a DataLoader worker: do not share the parent's file handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.pop(si, None)         # re-inserted below: the dict keeps least recently used first
        if f is None:
            while len(self._files) >= MAX_OPEN_SHARDS:   # bounded: ImageNet has ~1000 shards per split, and
                self._files.pop(next(iter(self._files))).close()   # every worker would hold them all open
            f = open(self.shards[si], "rb")
        self._files[si] = f
        f.seek(offset)                        # type: ignore[attr-defined]
        data = f.read(size)                   # type: ignore[attr-defined]
        if len(data) != size:
            raise OSError(f"webdataset shard {self.shards[si]} is shorter than when it was indexed "
                          f"(read {len(data)} of {size} bytes at offset {offset}); was it rewritten?")
        return data

    def close(self) -> None:
        """Close the shard files this process has open (reopened on demand)."""
        files, self._files = self._files, {}
        if self._pid == os.getpid():
            for f in files.values():
                f.close()                     # type: ignore[attr-defined]

    def __getitem__(self, i: int):
        si, offset, size = self.samples[i]
        # I/O errors (a shard gone, too many open files) are not "an unreadable image": they propagate
        data = self._read(si, offset, size)
        try:
            with Image.open(io.BytesIO(data)) as im:
                img = to_mode(im, "RGB")
        except Exception:  # noqa: BLE001 - any decoder failure means "unreadable", the sample is skipped
            return None
        return (self.transform(img) if self.transform else img), self.targets[i]

    def __getstate__(self) -> dict:           # picklable for spawn-started workers: no open files
        state = dict(self.__dict__)
        state["_files"] = {}
        return state
