"""Pretrained weights, described as data, and their download (torch.hub cache, checksum-checked).

Entries describe the official THU-MIG release files (ImageNet-1K, hard distillation from
RegNetY-16GF, so every file holds two heads). Published top-1 is the official README / log
figure (copied from the project's reference sheet). ``sha256`` is filled for files whose digest
we have verified; for the others the digest of the first download is printed and the user is
told it was not verified against a pinned value.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils.files import sha256_of

__all__ = ["WeightsEntry", "WEIGHTS", "get_weights", "list_weights", "download_weights", "OfflineError"]

_RELEASE = "https://github.com/THU-MIG/RepViT/releases/download/v1.0/"


class OfflineError(RuntimeError):
    pass


@dataclass(frozen=True)
class WeightsEntry:
    variant: str
    tag: str
    url: str
    epochs: int
    distilled: bool
    top1: float
    hf_hub_id: str | None = None
    sha256: str | None = None
    num_classes: int = 1000

    @property
    def name(self) -> str:
        return f"{self.variant}.{self.tag}"

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _official(variant: str, epochs: int, top1: float) -> WeightsEntry:
    return WeightsEntry(
        variant=variant, tag=f"dist_{epochs}e_in1k", url=f"{_RELEASE}{variant}_distill_{epochs}e.pth",
        epochs=epochs, distilled=True, top1=top1, hf_hub_id=f"timm/{variant}.dist_{epochs}e_in1k",
    )


# Published top-1 (%): logged best of the official runs (reference sheet: training_recipe_official.logged_best_top1,
# variants.*.published.top1_300e/450e).
WEIGHTS: dict[str, WeightsEntry] = {e.name: e for e in [
    _official("repvit_m0_6", 300, 74.1),
    _official("repvit_m0_9", 300, 78.7), _official("repvit_m0_9", 450, 79.1),
    _official("repvit_m1_0", 300, 80.0), _official("repvit_m1_0", 450, 80.3),
    _official("repvit_m1_1", 300, 80.7), _official("repvit_m1_1", 450, 81.2),
    _official("repvit_m1_5", 300, 82.3), _official("repvit_m1_5", 450, 82.5),
    _official("repvit_m2_3", 300, 83.3), _official("repvit_m2_3", 450, 83.7),
]}
# Default tag per variant: the longest schedule released.
DEFAULT_TAG = {e.variant: e.tag for e in sorted(WEIGHTS.values(), key=lambda e: e.epochs)}


def list_weights(variant: str | None = None) -> list[WeightsEntry]:
    return [e for e in WEIGHTS.values() if variant is None or e.variant == variant]


def get_weights(variant: str, tag: str | bool | None = True) -> WeightsEntry:
    """Registry entry for ``variant`` (``tag=True``: the default release)."""
    if tag is True or tag is None:
        if variant not in DEFAULT_TAG:
            raise ValueError(
                f"no pretrained weights are published for {variant}; variants with weights: "
                f"{', '.join(sorted(DEFAULT_TAG))}. Train one (`repvit train`) or pass checkpoint=PATH."
            )
        tag = DEFAULT_TAG[variant]
    key = f"{variant}.{tag}"
    if key not in WEIGHTS:
        tags = [e.tag for e in list_weights(variant)]
        raise ValueError(f"unknown weights {key!r}; tags for {variant}: {tags or 'none'}")
    return WEIGHTS[key]


def download_weights(entry: WeightsEntry, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Return the local path of ``entry``'s file, downloading it into the torch.hub cache if needed.

    The digest is checked against ``entry.sha256`` when the registry pins one (a mismatch deletes
    the file and raises). Offline, raises ``OfflineError`` saying where to put the file by hand.
    """
    cache = Path(cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints"))
    dest = cache / entry.filename
    if not dest.exists():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(entry.url, str(dest), progress=progress)
        except Exception as e:  # URLError, socket errors, HTTP errors
            raise OfflineError(
                f"could not download {entry.name} from {entry.url} ({type(e).__name__}: {e}). If this machine is "
                f"offline, fetch the file elsewhere and place it at {dest}, or pass checkpoint=PATH."
            ) from e
    digest = sha256_of(dest)
    if entry.sha256 is not None and digest != entry.sha256:
        dest.unlink()
        raise RuntimeError(
            f"checksum mismatch for {entry.name}: expected sha256 {entry.sha256}, got {digest}; the file was "
            "deleted - download it again"
        )
    if entry.sha256 is None:
        print(f"note: {dest.name} sha256={digest} (not pinned in the registry, so not verified)", file=sys.stderr)
    return dest
