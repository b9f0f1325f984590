"""Built-in datasets held fully in memory: Fashion-MNIST (IDX files) and scikit-learn's digits.

Samples are produced as normalised float tensors (1 x S x S) with cheap tensor augmentation, so
no PIL round trip or worker processes are needed on a small CPU machine.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "BUILTIN_DATASETS", "read_idx", "load_fashion_mnist",
           "load_digits", "TensorImageDataset", "builtin_name"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"   # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
BUILTIN_DATASETS = ("fashion-mnist", "digits")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def builtin_name(name: str) -> str | None:
    """Normalise ``fashion_mnist`` / ``FashionMNIST`` / ``digits`` to a built-in name, else None."""
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}.get(key, key)
    return key if key in BUILTIN_DATASETS else None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the MNIST / Fashion-MNIST container format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def load_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images uint8 Nx28x28, labels), 'val': ...} from the four IDX files."""
    root = Path(root or FASHION_MNIST_DIR)
    out = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        def find(kind: str) -> Path:
            for suffix in (".gz", ""):
                p = root / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte{suffix}"
                if p.is_file():
                    return p
            raise FileNotFoundError(
                f"Fashion-MNIST file {prefix}-{kind}-idx*-ubyte(.gz) not found in {root}; install the Debian "
                f"package dataset-fashion-mnist or set data.download_dir to a folder holding the IDX files")
        x, y = read_idx(find("images")), read_idx(find("labels"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"Fashion-MNIST {split} files in {root} have inconsistent shapes {x.shape} / {y.shape}")
        out[split] = (x, y.astype(np.int64))
    return out


def load_digits(val_fraction: float = 0.2, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits (1797 images), split deterministically into train/val, scaled to uint8."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover - sklearn is in the test extra
        raise RuntimeError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    d = _sk_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    y = d.target.astype(np.int64)
    perm = np.random.RandomState(seed).permutation(len(x))
    n_val = int(round(len(x) * val_fraction))
    val, tr = perm[:n_val], perm[n_val:]
    return {"train": (x[tr], y[tr]), "val": (x[val], y[val])}


class TensorImageDataset(Dataset):
    """In-memory uint8 grayscale images -> normalised float tensors at ``img_size``.

    Training augmentation (all optional): random crop after zero padding, horizontal flip,
    random erasing. Random numbers come from the global torch RNG so runs are reproducible
    from the seed (and resumable, since that RNG state is checkpointed).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, img_size: int, train: bool,
                 mean: float, std: float, pad_crop: int = 0, hflip: float = 0.0, reprob: float = 0.0,
                 classes: tuple[str, ...] | None = None) -> None:
        self.images = torch.from_numpy(np.array(images, copy=True))  # writable, owned copy
        self.labels = torch.from_numpy(np.ascontiguousarray(labels))
        self.img_size, self.train = img_size, train
        self.mean, self.std = mean, std
        self.pad_crop, self.hflip, self.reprob = pad_crop, hflip, reprob
        self.classes = classes or tuple(str(i) for i in range(int(self.labels.max()) + 1))
        self.targets = self.labels.tolist()
        # timm's random erasing ('pixel' mode: normal noise) on the normalised tensor, as in create_transform
        self.eraser = RandomErasing(reprob, mode="pixel", device="cpu") if train and reprob > 0 else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255.0)[None]          # 1 x H x W in [0, 1]
        if x.shape[-1] != self.img_size:
            # bilinear upsampling keeps more spatial extent for the stride-4 stem than 28x28 would
            x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.img_size)[0]
        if self.train:
            if self.pad_crop:
                p = self.pad_crop
                x = F.pad(x, (p, p, p, p))
                dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
                x = x[:, dy:dy + self.img_size, dx:dx + self.img_size]
            if self.hflip and torch.rand(()) < self.hflip:
                x = x.flip(-1)
        x = (x - self.mean) / self.std
        if self.eraser is not None:
            x = self.eraser(x)
        return x.contiguous(), int(self.labels[i])

