"""Shared export plumbing: optional-dependency checks, atomic writes, the JSON sidecar,
the preprocessing wrapper, and the default preprocessing of a model."""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.files import atomic_write_text, probe_writable, sha256_of

__all__ = [
    "require", "check_writable", "atomic_output", "sha256_of", "write_sidecar", "sidecar_path",
    "get_preprocessing", "Preprocess", "model_info", "installed_version", "check_parity", "ParityError",
    "PARITY_ATOL", "PARITY_RTOL",
]

# fp32 parity bound of every export check against PyTorch: |exported - PyTorch| <= ATOL + RTOL * max|PyTorch|.
# The fp32 exports observed here differ by ~1e-5 (ONNX Runtime, TorchScript, torch.export, ExecuTorch XNNPACK);
# this bound leaves ~100x margin for other CPUs' kernels, yet a wrong graph (a dropped branch, a swapped channel,
# a lost normalisation) differs by O(max|logit|) and is refused.
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-3

# ImageNet statistics, the official RepViT eval preprocessing (RepViT reference sheet
# (paper arXiv 2307.09283 / official repo): 224x224, bicubic, ImageNet mean/std, crop 0.875).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# which pip package provides each optional module (for the "install X" message)
_PIP_NAME = {
    "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript", "onnxslim": "onnxslim",
    "coremltools": "coremltools", "executorch": "executorch", "PIL": "pillow", "sklearn": "scikit-learn",
    "openvino": "openvino", "nncf": "nncf",
}
# the extra of pyproject.toml that carries each package (the error names the one that really installs it)
_EXTRA = {"onnx": "export", "onnxruntime": "export", "onnxscript": "export", "onnxslim": "export",
          "coremltools": "coreml", "executorch": "executorch", "openvino": "openvino", "nncf": "openvino"}


def installed_version(dist: str) -> str | None:
    """Version of an installed distribution from its metadata (None if absent), without importing it: importing
    executorch just for ``__version__`` would load its runtime."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency or raise a RuntimeError that names the package to install."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, but also broken native extensions
        top = module.split(".")[0]
        pkg = _PIP_NAME.get(top, top)
        extra = f"  (or pip install 'repvit[{_EXTRA[top]}]')" if top in _EXTRA else ""
        raise RuntimeError(
            f"{purpose} needs the Python package '{pkg}', which could not be imported ({type(e).__name__}: {e}). "
            f"Install it with: pip install {pkg}{extra}"
        ) from e


MAX_INPUT_SIDE = 4096   # 3x4096x4096 float example: 200 MB; larger sizes are typos that would exhaust memory


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, with a clear message, if ``path`` cannot be created."""
    p = Path(path)
    if str(path).strip() == "":
        raise ValueError("output path is empty; pass --out PATH")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise FileNotFoundError(f"output directory {str(parent)!r} does not exist; create it first (mkdir -p {parent})")
    if not parent.is_dir():
        raise ValueError(f"cannot write {str(p)!r}: {str(parent)!r} is not a directory")
    try:
        probe_writable(p)   # a temp file, not os.access: root passes that on read-only mounts and /proc
    except ValueError as e:
        raise ValueError(f"output directory {str(parent)!r} is not writable; choose another --out location") from e
    if p.exists() and p.is_dir() and p.suffix != ".mlpackage":
        raise ValueError(f"output path {str(p)!r} is a directory; give a file name such as {p / 'model.onnx'}")
    side = sidecar_path(p)
    if side.is_dir():   # found only after the export replaced the file: a good old file lost for nothing
        raise ValueError(f"the sidecar path {str(side)!r} of this output is a directory; move it, or choose "
                         "another --out")
    return p


class ParityError(RuntimeError):
    """An exported model disagrees with the PyTorch model beyond the stated tolerance (nothing is published)."""


def check_parity(got: Any, want: Any, what: str, *, atol: float = PARITY_ATOL, rtol: float = PARITY_RTOL) -> dict:
    """Compare an exported model's output ``got`` with PyTorch's ``want`` (tensors or arrays of the same shape).

    Returns ``{"max_abs_diff", "tolerance"}``; raises :class:`ParityError` naming both when
    ``max|got - want| > atol + rtol * max|want|`` (or when either is not finite). Called inside
    :class:`atomic_output` blocks, so a failing export leaves no file behind."""
    import numpy as np

    g = np.asarray(got.detach().float().numpy() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    w = np.asarray(want.detach().float().numpy() if isinstance(want, torch.Tensor) else want, dtype=np.float64)
    if g.shape != w.shape:
        raise ParityError(f"{what}: output shape {g.shape} differs from PyTorch {w.shape}; nothing was written")
    diff = float(np.abs(g - w).max()) if g.size else 0.0
    bound = float(atol + rtol * (np.abs(w).max() if w.size else 0.0))
    if not (diff <= bound):  # also catches NaN
        raise ParityError(f"{what}: max |exported - PyTorch| = {diff:.3g} exceeds the tolerance {bound:.3g} "
                          f"({atol:g} + {rtol:g} * max|PyTorch output|); the export is wrong, nothing was written")
    return {"max_abs_diff": diff, "tolerance": bound}


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder of a directory tree (an .mlpackage), before it is renamed."""
    paths = [path] if not path.is_dir() else [*sorted(path.rglob("*")), path]
    for p in paths:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems refuse fsync on a directory; the files are what matter
            if not p.is_dir():
                raise
        finally:
            os.close(fd)


class atomic_output:
    """Context manager yielding a temporary path next to ``target``; on success it is fsynced and moved
    over ``target`` with ``os.replace`` (so a crash never leaves a half-written file)."""

    def __init__(self, target: str | os.PathLike, *, directory: bool = False) -> None:
        self.target = Path(target)
        self.directory = directory

    def __enter__(self) -> Path:
        parent = self.target.parent if str(self.target.parent) else Path(".")
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=parent))
        # keep the real suffix: some writers (coremltools, onnx) look at it
        self.tmp = self._tmpdir / self.target.name
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                _fsync_tree(self.tmp)  # on disk before the rename, as utils.files.atomic_write does
                if self.tmp.is_dir() and self.target.is_dir():
                    # os.replace cannot overwrite a non-empty directory: move the old one aside first
                    old = self._tmpdir / (self.target.name + ".old")
                    os.replace(self.target, old)
                # the old sidecar describes the file being replaced: gone first, so that a failure before the
                # new one is written leaves no sidecar rather than one with another file's checksum
                sidecar_path(self.target).unlink(missing_ok=True)
                os.replace(self.tmp, self.target)
        finally:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def sidecar_path(out: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (kept next to the artefact it describes)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def write_sidecar(out: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write the JSON sidecar describing ``out`` (adds sha256, file name and creation time)."""
    from .. import __version__

    data = dict(info)
    data["file"] = Path(out).name
    data["sha256"] = sha256_of(out)
    data["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    data["repvit_version"] = __version__
    data["torch_version"] = torch.__version__
    path = sidecar_path(out)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def get_preprocessing(model: nn.Module, input_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The model's preprocessing dict (input_size [C,H,W], mean, std, ...), ImageNet defaults if unset;
    ``input_size`` (H, W) overrides the spatial size."""
    pre = dict(getattr(model, "preprocessing", None) or {})
    c = int(getattr(model, "in_chans", 3))
    pre.setdefault("input_size", [c, 224, 224])
    if c == 3:
        pre.setdefault("mean", list(IMAGENET_MEAN))
        pre.setdefault("std", list(IMAGENET_STD))
    else:  # no ImageNet statistics for other channel counts: identity normalisation unless the model says
        pre.setdefault("mean", [0.0] * c)
        pre.setdefault("std", [1.0] * c)
    pre.setdefault("interpolation", "bicubic")
    pre.setdefault("crop_pct", 0.875)
    if input_size is not None:
        h, w = (int(v) for v in input_size)
        if h < 32 or w < 32:
            raise ValueError(f"input size {h}x{w} is too small: RepViT downsamples by 32, use at least 32x32")
        if h > MAX_INPUT_SIDE or w > MAX_INPUT_SIDE:
            raise ValueError(f"input size {h}x{w} is too large: at most {MAX_INPUT_SIDE} per side (the export traces "
                             "the model on an example input of that size)")
        pre["input_size"] = [c, h, w]
    if len(pre["mean"]) != c or len(pre["std"]) != c:
        raise ValueError(f"model preprocessing has mean/std for {len(pre['mean'])} channels but the model takes {c}")
    if any(float(s) <= 0 for s in pre["std"]):
        raise ValueError(f"preprocessing std must be positive, got {pre['std']}")
    return pre


class Preprocess(nn.Module):
    """Wraps a model so the exported graph takes raw pixels.

    ``input_type='uint8'``: NCHW uint8 in 0..255. ``'float'``: NCHW float32 in 0..1.
    Either way the graph applies ``(x - mean) / std`` before the network.
    """

    def __init__(self, model: nn.Module, mean, std, input_type: str = "float") -> None:
        super().__init__()
        if input_type not in ("uint8", "float"):
            raise ValueError(f"input_type must be 'uint8' or 'float', got {input_type!r}")
        self.model = model
        self.input_type = input_type
        scale = 255.0 if input_type == "uint8" else 1.0
        # fold the 0..255 -> 0..1 scaling into the constants: one Sub and one Mul in the graph
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * scale)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x.float() - self.mean) * self.inv_std)


def model_info(model: nn.Module, pre: dict[str, Any]) -> dict[str, Any]:
    """Sidecar fields every format shares."""
    return {
        "variant": getattr(model, "variant", None),
        "form": "deploy",
        "source_form": getattr(model, "_export_source_form", None),
        "source": getattr(model, "_export_source", None),
        "weights": getattr(model, "_export_weights", None),    # ema | raw (of a training checkpoint) | random
        "num_classes": int(getattr(model, "num_classes", 0)),
        "in_chans": int(getattr(model, "in_chans", 3)),
        "input_size": list(pre["input_size"]),
        "preprocessing": pre,
    }

