"""Strict model registry and the keyword-only builder behind ``repvit.create_model``."""

from __future__ import annotations

import difflib
from typing import Sequence

from .repvit import RepViT, RepViTFeatures
from .specs import SPECS, RepViTSpec

__all__ = ["list_models", "get_spec", "build_model", "UnknownModelError"]


class UnknownModelError(ValueError):
    pass


def list_models(*, include_legacy: bool = True) -> list[str]:
    """All variant names (current family first, then the paper-v1 legacy ones)."""
    return [n for n, s in SPECS.items() if include_legacy or not s.legacy]


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(".", "_")


def get_spec(name: str) -> RepViTSpec:
    key = _normalise(name)
    if key in SPECS:
        return SPECS[key]
    close = difflib.get_close_matches(key, list(SPECS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"unknown RepViT variant {name!r}.{hint} Available: {', '.join(SPECS)}")


def canonical_name(name: str) -> str:
    """The registry name for ``name`` (case, '-' and '.' normalised); unknown names raise."""
    get_spec(name)
    return _normalise(name)


def build_model(
    name: str, *, deploy: bool = False, distillation: bool = False, num_classes: int = 1000,
    in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
    features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3),
) -> RepViT | RepViTFeatures:
    """Construct a variant with random weights (no checkpoint handling here).

    ``distillation=True`` with ``deploy=True`` is an error (the deploy form has one fused head);
    with ``num_classes=0`` the setting is kept, so ``reset_classifier(n)`` later builds two heads.
    """
    spec = get_spec(name)
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if not 0.0 <= drop_path_rate < 1.0 or not 0.0 <= drop_rate < 1.0:
        raise ValueError("drop_rate and drop_path_rate must lie in [0, 1)")
    model = RepViT(
        spec, num_classes=num_classes, in_chans=in_chans, distillation=distillation,
        drop_rate=drop_rate, drop_path_rate=drop_path_rate, deploy=deploy, variant=canonical_name(name),
    )
    if features_only:
        return RepViTFeatures(model, out_indices)
    return model

