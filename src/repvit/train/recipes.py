"""Shipped recipes (``repvit/recipes/*.yaml``): lookup by name or path, and the generator for the ImageNet ones."""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path

import yaml

from ..utils.files import atomic_write_text
from .config import (
    DEIT_REGNETY160_URL,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_yaml,
)

__all__ = ["list_recipes", "recipe_path", "load_recipe", "official_recipe", "write_official_recipes",
           "IMAGENET_VARIANTS", "DEFAULT_RECIPE"]

IMAGENET_VARIANTS = ("repvit_m0_6", "repvit_m0_9", "repvit_m1_0", "repvit_m1_1", "repvit_m1_5", "repvit_m2_3",
                     "repvit_m1", "repvit_m2", "repvit_m3")
DEFAULT_RECIPE = "fashion_mnist"   # what `repvit train` runs with no --recipe


def _recipe_dir() -> Path:
    return Path(str(resources.files("repvit") / "recipes"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in _recipe_dir().glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe name (``repvit_m0_9_300e``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} does not exist")
        return p
    shipped = _recipe_dir() / f"{name_or_path}.yaml"
    if not shipped.is_file():
        close = difflib.get_close_matches(name_or_path, list_recipes(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown recipe {name_or_path!r}.{hint} Run `repvit train --list-recipes` to see all, "
                         "or pass a YAML file path")
    return shipped


def load_recipe(name_or_path: str | None = None) -> TrainConfig:
    """Parse and validate a recipe (default: the built-in Fashion-MNIST one)."""
    path = recipe_path(name_or_path or DEFAULT_RECIPE)
    try:
        return config_from_dict(load_yaml(path))
    except ValueError as e:
        raise ValueError(f"recipe {path.name}: {e}") from e


def official_recipe(variant: str, epochs: int, distill: bool) -> dict:
    """The official ImageNet-1k recipe for one variant/schedule as a plain dict.

    Values: RepViT reference sheet (paper arXiv 2307.09283 / official repo), training_recipe_official:
    8 GPUs x 256 = 2048 batch, lr 1e-3 x batch / 512, AdamW wd 0.025, 5 warmup epochs from 1e-6, cosine to 1e-5,
    AGC 0.02, EMA 0.99996, rand-m9-mstd0.5-inc1, erasing 0.25, mixup 0.8 / cutmix 1.0, smoothing 0.1,
    repeated augmentation x3, bicubic 224; distillation: hard, RegNetY-16GF DeiT teacher.
    """
    cfg = TrainConfig()  # defaults are the official recipe
    cfg.model.name = variant
    cfg.model.distillation = distill
    cfg.schedule.epochs = epochs
    cfg.distill.kind = "hard" if distill else "none"
    cfg.distill.teacher = "regnety_160"
    cfg.distill.teacher_checkpoint = DEIT_REGNETY160_URL
    cfg.data.dataset = "imagenet"   # replace with --data /path/to/imagenet
    return config_to_dict(cfg.validate())


def write_official_recipes(out_dir: str | os.PathLike | None = None) -> list[Path]:
    """(Re)generate the shipped ImageNet recipe files (a maintainer tool)."""
    out = Path(out_dir) if out_dir else _recipe_dir()
    written = []
    for v in IMAGENET_VARIANTS:
        for epochs in (300, 450):
            for distill in (False, True):
                name = f"{v}_{epochs}e" + ("_distill" if distill else "")
                body = official_recipe(v, epochs, distill)
                desc = (f"{v}, ImageNet-1k, {epochs} epochs, " + ("hard distillation from RegNetY-16GF (DeiT)"
                        if distill else "no distillation") + ". Official RepViT recipe; pass --data /path/to/imagenet.")
                text = f"description: {desc}\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)
                written.append(atomic_write_text(out / f"{name}.yaml", text))
    return written
