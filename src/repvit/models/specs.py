"""Variant spec table and the reference numbers each variant must reproduce.

Widths and depths are the only per-variant facts; SE placement, strides and the
downsampling layers follow from rules in :mod:`repvit.models.repvit`.

Numbers below are copied from the project's reference sheet, which gathered them
from the paper (arXiv 2307.09283, CVPR 2024 Table 1/3), the official THU-MIG/RepViT
repository (README, logs) and by running the official model definitions and
timm 1.0.31 on CPU (fvcore MAC count, 224x224, fused single-head model).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RepViTSpec:
    """Architecture of one variant: stage widths, blocks per stage, token-mixer layout."""

    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    legacy: bool = False  # paper-v1 token mixer: 1x1 branch with its own BN, no outer BN


@dataclass(frozen=True)
class VariantFacts:
    """Exact counts (must be reproduced) and published results (for tables)."""

    fused_params: int
    train_params_single_head: int
    train_params_dist_head: int
    fused_macs: int | None = None
    top1_300e: float | None = None
    top1_450e: float | None = None
    latency_ms_iphone12: float | None = None
    gpu_throughput: int | None = None


SPECS: dict[str, RepViTSpec] = {
    "repvit_m0_6": RepViTSpec((40, 80, 160, 320), (1, 1, 8, 1)),
    "repvit_m0_9": RepViTSpec((48, 96, 192, 384), (2, 2, 14, 2)),
    "repvit_m1_0": RepViTSpec((56, 112, 224, 448), (2, 2, 14, 2)),
    "repvit_m1_1": RepViTSpec((64, 128, 256, 512), (2, 2, 12, 2)),
    "repvit_m1_5": RepViTSpec((64, 128, 256, 512), (4, 4, 24, 4)),
    "repvit_m2_3": RepViTSpec((80, 160, 320, 640), (6, 6, 34, 2)),
    # legacy (paper v1) variants, named as in timm
    "repvit_m1": RepViTSpec((48, 96, 192, 384), (2, 2, 14, 2), legacy=True),
    "repvit_m2": RepViTSpec((64, 128, 256, 512), (2, 2, 12, 2), legacy=True),
    "repvit_m3": RepViTSpec((64, 128, 256, 512), (4, 4, 18, 2), legacy=True),
}

# Legacy variants have no separate MAC figure in the reference: their fused form
# is the same network as the current variant of equal widths/depths.
FACTS: dict[str, VariantFacts] = {
    "repvit_m0_6": VariantFacts(2468072, 2487292, 2808932, 385080800, 74.1, None, 0.6),
    "repvit_m0_9": VariantFacts(5067056, 5103560, 5489328, 815636160, 78.7, 79.1, 0.9, 4817),
    "repvit_m1_0": VariantFacts(6810312, 6852900, 7302796, 1106158816, 80.0, 80.3, 1.0, 3910),
    "repvit_m1_1": VariantFacts(8244312, 8288888, 8802912, 1337149696, 80.7, 81.2, 1.1, 3604),
    "repvit_m1_5": VariantFacts(14049992, 14130408, 14644432, 2273621248, 82.3, 82.5, 1.5, 2151),
    "repvit_m2_3": VariantFacts(22926792, 23046512, 23688792, 4515990080, 83.3, 83.7, 2.3, 1184),
    "repvit_m1": VariantFacts(5067056, 5099480, 5485248, 815636160, 78.5),
    "repvit_m2": VariantFacts(8244312, 8283960, 8797984, 1337149696, 80.6),
    "repvit_m3": VariantFacts(10115720, 10168808, 10682832, None, 81.4, None, 1.3)  # MACs not in the reference,
}

# Paper Table 1 rounding (params in M, GMACs) for the headline variants.
PAPER_TABLE: dict[str, tuple[float, float]] = {
    "repvit_m0_9": (5.1, 0.8),
    "repvit_m1_0": (6.8, 1.1),
    "repvit_m1_1": (8.2, 1.3),
    "repvit_m1_5": (14.0, 2.3),
    "repvit_m2_3": (22.9, 4.5),
}


# Evaluation preprocessing of the official ImageNet models (reference sheet: eval_preprocessing):
# bicubic resize to 256 then centre crop 224 (crop_pct 0.875), ImageNet mean/std.
IMAGENET_PREPROCESSING: dict = {
    "input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875,
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
}


def default_preprocessing(in_chans: int) -> dict:
    if in_chans == 3:
        return dict(IMAGENET_PREPROCESSING)
    return dict(IMAGENET_PREPROCESSING, input_size=[in_chans, 224, 224], mean=[0.5] * in_chans, std=[0.5] * in_chans)
