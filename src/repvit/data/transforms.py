"""Image transforms for class-folder / timm datasets, built with timm's ``create_transform``."""

from __future__ import annotations

from typing import Any

from timm.data import create_transform

__all__ = ["CROP_PCT", "train_transform", "eval_transform", "preprocessing_dict"]

# eval crops: RepViT reference sheet (paper arXiv 2307.09283 / official repo), eval_preprocessing:
# official eval resizes 256 then centre-crops 224 (crop 0.875); timm uses crop_pct 0.95.
CROP_PCT = {"official": 0.875, "timm": 0.95}


def train_transform(img_size: int, aug: Any, *, interpolation: str, mean, std):
    """RandomResizedCrop + flip + RandAugment + colour jitter + random erasing (timm)."""
    return create_transform(
        img_size, is_training=True, scale=tuple(aug.scale), hflip=aug.hflip,
        color_jitter=aug.color_jitter,                 # timm drops jitter under RandAugment
        auto_augment=None if str(aug.auto_augment or "").lower() in ("", "none") else aug.auto_augment,
        interpolation=interpolation, mean=tuple(mean), std=tuple(std),
        re_prob=aug.reprob, re_mode=aug.remode, re_count=1,
    )


def eval_transform(img_size: int, *, eval_crop: str = "official", interpolation: str, mean, std):
    """Resize to ``img_size / crop_pct`` then centre-crop ``img_size``."""
    return create_transform(img_size, is_training=False, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), crop_pct=CROP_PCT[eval_crop])


def preprocessing_dict(in_chans: int, img_size: int, mean, std, interpolation: str, crop_pct: float) -> dict:
    """The ``model.preprocessing`` dict stored in saved checkpoints."""
    return {"input_size": [in_chans, img_size, img_size], "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "interpolation": interpolation, "crop_pct": float(crop_pct)}
