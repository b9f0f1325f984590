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

__all__ = ["list_recipes", "recipe_path", "recipe_dict", "load_recipe", "official_recipe", "write_official_recipes",
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


def _merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``, section by section (a child section replaces only the keys it names)."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def recipe_dict(name_or_path: str | None = None, _seen: tuple[str, ...] = ()) -> dict:
    """A recipe as a plain dict with its ``base:`` chain resolved (no validation yet).

    ``base: NAME_OR_YAML`` starts from another recipe - a shipped name, or a path relative to the file that
    names it - so a variation states only what it changes (e.g. ``base: repvit_m0_9_300e`` plus a ``data:``
    section to fine-tune the official recipe on your own folder).
    """
    path = recipe_path(name_or_path or DEFAULT_RECIPE)
    key = str(path.resolve())
    if key in _seen:
        chain = " -> ".join(Path(s).name for s in (*_seen, key))
        raise ValueError(f"recipe {path.name}: 'base:' forms a cycle ({chain}); make one of them stand alone")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path.name}: a recipe must be a YAML mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"recipe {path.name}: 'base:' must name a recipe or a YAML path, got {base!r}")
    relative = path.parent / base
    if Path(base).suffix in (".yaml", ".yml") and not Path(base).is_absolute() and relative.is_file():
        base = str(relative)
    try:
        parent = recipe_dict(base, (*_seen, key))
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"recipe {path.name}, base {base!r}: {e}") from e
    parent.pop("description", None)  # a variation's description is its own (or none)
    return _merge(parent, data)


def load_recipe(name_or_path: str | None = None) -> TrainConfig:
    """Parse and validate a recipe (default: the built-in Fashion-MNIST one), following ``base:``."""
    path = recipe_path(name_or_path or DEFAULT_RECIPE)
    data = recipe_dict(name_or_path)
    try:
        return config_from_dict(data)
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
    # as the official main.py: the lr steps once per epoch (lr_scheduler.step(epoch)), and the best checkpoint is
    # the raw model's best epoch (the EMA is kept and logged, never selected)
    cfg.schedule.step_per = "epoch"
    cfg.run.save_best_from = "raw"
    return config_to_dict(cfg.validate())


def _provenance(variant: str, epochs: int, distill: bool) -> str:
    """Whether the official repo trained this variant/schedule (a released checkpoint with a published top-1,
    models.specs.FACTS) or only shares its hyper-parameters."""
    from repvit.models.specs import FACTS
    if not distill:
        return "Official RepViT hyper-parameters without the teacher (every released checkpoint is distilled)"
    top1 = getattr(FACTS[variant], f"top1_{epochs}e", None)       # FACTS has top1_300e and top1_450e
    if top1 is None:
        return (f"Official RepViT hyper-parameters; the official repo released no {epochs}-epoch run of this "
                "variant")
    return f"Official RepViT recipe (published top-1 {top1}%)"


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
                        if distill else "no distillation") + f". {_provenance(v, epochs, distill)}; pass "
                        "--data /path/to/imagenet.")
                text = f"description: {desc}\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)
                written.append(atomic_write_text(out / f"{name}.yaml", text))
    return written
