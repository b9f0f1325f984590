"""Reading and writing checkpoint files, safely, in every supported format.

Formats (auto-detected on read):
  official  THU-MIG release ``.pth``: a pickle dict with ``model`` / ``model_ema`` (+ optimizer,
            args: an ``argparse.Namespace``), keys ``features.N...``; current or legacy layout.
  timm      a timm state dict (``stem.`` / ``stages.`` / ``head.head``), ``.pth``/``.bin`` or the
            hub's ``model.safetensors``; also timm training checkpoints (``state_dict``/``state_dict_ema``).
  repvit    ours: safetensors with metadata (variant, form, num_classes, preprocessing, ...).

Pickles are read with ``torch.load(weights_only=True)``; the only non-tensor class allowed is
``argparse.Namespace`` (the official files store their training args as one).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils.files import atomic_write
from . import layouts
from .layouts import CheckpointFormatError, CorruptCheckpointError, StateInfo

__all__ = ["ReadCheckpoint", "read_checkpoint", "write_state_dict", "atomic_write", "CheckpointFormatError",
           "CorruptCheckpointError", "FORMAT_VERSION"]

FORMAT_VERSION = "1"
_EMA_KEYS = ("model_ema", "state_dict_ema", "ema")
_RAW_KEYS = ("model", "state_dict")


@dataclass
class ReadCheckpoint:
    """A checkpoint converted to our key layout, plus what it holds."""

    path: str
    source_format: str  # "official" | "timm" | "repvit"
    state_dict: dict[str, torch.Tensor]
    info: StateInfo
    used_ema: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """The variant the file holds: its metadata, else the first variant with these widths/depths."""
        name = self.metadata.get("variant") or next(iter(layouts.matching_variants(self.info)), None)
        if not name:
            raise CheckpointFormatError(f"{self.path} holds no known RepViT variant ({self.describe()})")
        return name

    def describe(self) -> str:
        ema = " (EMA weights)" if self.used_ema else ""
        return f"{self.source_format}-format checkpoint{ema} holding {self.info.describe()}"


def _torch_load(path: str) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip archives, ...
        text = str(e)
        blocked = [ln.strip() for ln in text.splitlines() if "unsupported global" in ln.lower()]
        if blocked:
            raise CheckpointFormatError(
                f"refusing to unpickle {path}: it contains objects outside the safe allowlist ({blocked[0]}). "
                "Only tensors, plain containers and argparse.Namespace are loaded; re-save the weights as a plain "
                "state dict (or with `repvit convert` on a trusted machine)."
            ) from e
        reason = next((ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln
                       and "PyTorch 2.6" not in ln), type(e).__name__)
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError:
            head = b""
        if head and not head.startswith((b"PK", b"\x80")):   # neither torch's zip archive nor a legacy pickle
            raise CheckpointFormatError(
                f"{path} is not a PyTorch or safetensors checkpoint (it starts with {head!r}, not a zip archive or "
                "a pickle); give a .pth/.pt file written by torch.save, or a .safetensors file") from e
        raise CorruptCheckpointError(
            f"could not read checkpoint {path}: the file is truncated or corrupt ({reason[:200]}). "
            "Download or export it again."
        ) from e


def _load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:
        raise CorruptCheckpointError(
            f"could not read safetensors file {path}: the file is truncated or corrupt ({e}). "
            "Download or export it again."
        ) from e


def _is_safetensors(path: str) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _pick(container: dict[str, Any], use_ema: bool | None, path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Choose raw or EMA weights from a training-checkpoint dict. Default: raw (``model``), as the
    official evaluation does; ``use_ema=True`` picks the EMA copy."""
    ema_key = next((k for k in _EMA_KEYS if isinstance(container.get(k), dict) and container[k]), None)
    raw_key = next((k for k in _RAW_KEYS if isinstance(container.get(k), dict)), None)
    if use_ema:
        if ema_key is None:
            raise CheckpointFormatError(f"use_ema=True but {path} holds no EMA weights (keys: {sorted(container)[:8]})")
        sd = container[ema_key]
        if "module" in sd and isinstance(sd["module"], dict):  # timm ModelEmaV2 wraps the model
            sd = sd["module"]
        # torch.optim.swa_utils.AveragedModel (torchvision's model_ema): 'module.*' keys plus its step counter
        sd = {k: v for k, v in sd.items() if k != "n_averaged"}
        return sd, True
    if raw_key is not None:
        return container[raw_key], False
    if ema_key is not None and use_ema is None:
        return container[ema_key], True
    if all(isinstance(v, torch.Tensor) for v in container.values()):
        return container, False  # a bare state dict
    if ema_key is not None:  # use_ema=False on an EMA-only file
        raise CheckpointFormatError(
            f"{path} holds only EMA weights ({ema_key!r}, no 'model'/'state_dict'), but use_ema=False asked for the "
            "raw weights; pass use_ema=True (or leave use_ema unset) to load the EMA weights"
        )
    raise CheckpointFormatError(
        f"{path} is a dict without model weights (keys: {sorted(container)[:8]}); expected a state dict or a "
        "training checkpoint with 'model'/'model_ema' or 'state_dict'/'state_dict_ema'"
    )


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP / torch.compile wrappers prefix every key, in any nesting order (torch.compile(DDP(model)) saves
    # '_orig_mod.module.', DDP(torch.compile(model)) 'module._orig_mod.'): strip until none is left
    while sd:
        p = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if p is None:
            break
        sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def read_checkpoint(path: str | os.PathLike, *, use_ema: bool | None = None) -> ReadCheckpoint:
    """Read any supported file and convert it to our key layout (format auto-detected)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CorruptCheckpointError(f"checkpoint {path} is empty (0 bytes); download or export it again")
    meta: dict[str, str] = {}
    used_ema = False
    if _is_safetensors(path):
        sd, meta = _load_safetensors(path)
        if use_ema:
            raise CheckpointFormatError(f"use_ema=True but {path} is a single-weights safetensors file")
    else:
        obj = _torch_load(path)
        if not isinstance(obj, dict):
            raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
        sd, used_ema = _pick(obj, use_ema, path)
        # our training checkpoints (last.pt, checkpoint-epoch*.pt) record the data's preprocessing: keep it, so an
        # export or INT8 calibration from them normalises as the run did (not with the ImageNet defaults)
        info = obj.get("data_info")
        if isinstance(info, dict) and isinstance(info.get("preprocessing"), dict):
            meta["preprocessing"] = json.dumps(info["preprocessing"])
        if isinstance(info, dict) and isinstance(obj.get("config"), dict):
            meta["format"] = "repvit"  # our own training checkpoint (last.pt): report it as such, not as timm's
    sd = _strip_prefix({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    if any(k.startswith("features.") for k in sd):
        fmt, ours = "official", layouts.official_to_ours(sd)
    elif meta.get("format") == "repvit":
        fmt, ours = "repvit", dict(sd)
    elif any(k.startswith("stem.") for k in sd):
        fmt, ours = "timm", layouts.timm_to_ours(sd)
    else:
        raise CheckpointFormatError(
            f"{path} does not look like a RepViT checkpoint: no 'features.*' (official) or 'stem.*' "
            f"(timm/repvit) keys; first keys: {list(sd)[:5]}"
        )
    parsed_meta: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            parsed_meta[k] = json.loads(v)
        except (TypeError, ValueError):
            parsed_meta[k] = v
    # the entries models are built from must have their type, or a bad file fails later somewhere unrelated
    for k, kind, what in (("preprocessing", dict, "an object"), ("variant", str, "a string")):
        if k in parsed_meta and parsed_meta[k] is not None and not isinstance(parsed_meta[k], kind):
            raise CheckpointFormatError(f"{path}: metadata entry {k!r} is {parsed_meta[k]!r}, not {what}; the file "
                                        "was not written by repvit.save_checkpoint (or was edited)")
    try:
        state_info = layouts.analyse_ours(ours)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{path}: {e}") from e
    return ReadCheckpoint(path, fmt, ours, state_info, used_ema, parsed_meta)


PICKLE_SUFFIXES = (".pth", ".pt", ".bin")  # written with torch.save (no metadata); anything else: safetensors


def write_state_dict(
    sd: dict[str, torch.Tensor], path: str | os.PathLike, *, metadata: dict[str, Any] | None = None,
    torch_container: str | None = None,
) -> None:
    """Write a state dict atomically: safetensors unless ``torch_container`` names a pickle dict key
    (e.g. ``"model"`` for the official layout) or the path ends in ``.pth``/``.pt``/``.bin``."""
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    suffix = Path(path).suffix.lower()
    if torch_container is not None or suffix in PICKLE_SUFFIXES:
        obj: Any = {torch_container: sd} if torch_container else sd
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
        return
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
