"""The paper's section-3 roadmap: MobileNetV3-L walked step by step into RepViT-M0.9.

Each step is a :class:`RoadmapConfig` obtained from the previous one by changing a few
fields (``dataclasses.replace``); one generic builder, :func:`build_roadmap_model`, turns any
config into a network. Step 0 is MobileNetV3-L exactly as laid out in timm's
``mobilenetv3_large_100`` (same parameter count) with GELU in place of ReLU/hardswish; the
last step is RepViT-M0.9 (same modules and state-dict keys as ``build_model("repvit_m0_9")``).

Choices the paper leaves open, made here and documented:
  * MobileNetV3's SE keeps its own layout (on the expanded width, hard-sigmoid gate, timm's
    channel rounding); once the RepViT block is adopted SE sits in the token mixer (RepViT's SE).
  * A RepViT-block stage whose first block changes width/stride uses the official stride-2
    RepViT block (dw kxk s2 conv-BN, SE, 1x1 conv-BN, residual FFN); the same form with stride 1
    handles MobileNetV3's 80 -> 112 width change inside the stride-16 stage.
  * "mobilenetv3" SE placement as a per-stage rule: none / all / last third / all, counted over
    the stage's blocks including its downsampling block (gives MobileNetV3-L's exact pattern).
  * The MobileNetV3 head keeps its published widths (1x1 conv to 960, pool, 1x1 conv to 1280).
  * From the RepViT-block step on, a channel mixer's hidden width is its *output* width x expansion (RepViT's
    convention: the width changes in the token mixer's 1x1, the FFN runs on the new width), where MobileNetV3
    expands its *input* width: at step 1 the width-changing blocks get more hidden channels than MobileNetV3
    (40 -> 80: 480 instead of 240; 112 -> 160: 960 instead of 672; 16 -> 24: 96 instead of 64). The reference
    gives no per-step parameter counts to settle this; steps 2-9 use expansion 2 either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import make_divisible as timm_make_divisible
from torch import nn

from .repvit import FFN, ClassifierHead, ConvBN, RepViTBlock, SqueezeExcite, Stem

__all__ = ["RoadmapConfig", "RoadmapNet", "ROADMAP_STEPS", "ROADMAP_SOURCE", "roadmap_configs",
           "build_roadmap_model"]

# MobileNetV3-L (Howard et al. 2019; timm mobilenetv3_large_100), grouped into the four
# stages at strides 4, 8, 16, 32. The stride-2 stem conv and the 16-channel depthwise-
# separable block form the "mobilenetv3" stem; the 960-wide 1x1 conv belongs to the head.
MBV3_WIDTHS: tuple[tuple[int, ...], ...] = ((24, 24), (40, 40, 40), (80, 80, 80, 80, 112, 112), (160, 160, 160))
MBV3_EXPANSIONS: tuple[tuple[float, ...], ...] = ((4, 3), (3, 3, 3), (6, 2.5, 2.3, 2.3, 6, 6), (6, 6, 6))
MBV3_KERNELS = (3, 5, 3, 5)
MBV3_DEPTHS = (2, 3, 6, 3)
MBV3_SE_FRACTION = (0.0, 1.0, 1 / 3, 1.0)  # share of each stage's blocks (from the end) with SE
MBV3_STEM_WIDTH, MBV3_HEAD_CONV, MBV3_HEAD_HIDDEN = 16, 960, 1280


@dataclass(frozen=True)
class RoadmapConfig:
    """One point of the roadmap. ``depths`` count a stage's blocks including its stride-2
    block for ``downsample="block"``, and the blocks after the downsampling layer for "deep"."""

    block: str = "inverted_residual"          # "inverted_residual" | "repvit"
    expansion: float | None = None            # None: MobileNetV3's per-block ratios
    widths: tuple[Any, ...] = MBV3_WIDTHS     # per stage: one int, or a tuple of per-block widths
    depths: tuple[int, ...] = MBV3_DEPTHS
    stem: str = "mobilenetv3"                 # "mobilenetv3" (stride 2 + DS block) | "early_conv"
    downsample: str = "block"                 # "block" (first block strided) | "deep"
    head: str = "mobilenetv3"                 # "mobilenetv3" | "simple" (pool + BN + linear)
    kernel_sizes: tuple[int, ...] = MBV3_KERNELS
    se: str = "mobilenetv3"                   # "mobilenetv3" | "cross_block" | "none"

    def validate(self) -> None:
        choices = {"block": ("inverted_residual", "repvit"), "stem": ("mobilenetv3", "early_conv"),
                   "downsample": ("block", "deep"), "head": ("mobilenetv3", "simple"),
                   "se": ("mobilenetv3", "cross_block", "none")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"RoadmapConfig.{field}={getattr(self, field)!r}; choose one of {allowed}")
        if not len(self.widths) == len(self.depths) == len(self.kernel_sizes) == 4:
            raise ValueError("widths, depths and kernel_sizes need one entry per stage (4 stages)")
        if self.downsample == "deep" and self.block != "repvit":
            raise ValueError("the deep downsampling layer is built from RepViT blocks: set block='repvit' first")
        for s, w in enumerate(self.widths):
            n = len(self._stage_widths(s))
            if n != self.depths[s]:
                raise ValueError(f"stage {s}: {n} per-block widths for depth {self.depths[s]}; "
                                 "give one int per stage to change depths")
        if self.expansion is None and self.depths != MBV3_DEPTHS:
            raise ValueError("per-block MobileNetV3 expansions need MobileNetV3 depths; set one expansion ratio")

    def _stage_widths(self, s: int) -> tuple[int, ...]:
        w = self.widths[s]
        return tuple(w) if isinstance(w, (tuple, list)) else (int(w),) * self.depths[s]

    def _expansion(self, s: int, j: int) -> float:
        return float(self.expansion) if self.expansion is not None else float(MBV3_EXPANSIONS[s][j])


# ----------------------------------------------------------------------------- blocks


class MBV3SqueezeExcite(nn.Module):
    """MobileNetV3's SE: on the expanded width, reduction 0.25 with timm's rounding, hard-sigmoid gate."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        rd = timm_make_divisible(dim * 0.25, 8)
        self.conv_reduce = nn.Conv2d(dim, rd, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block (GELU): [1x1 expand], dw kxk (stride), [SE], 1x1 project, skip if shapes match.
    Expansion 1 gives MobileNetV3's depthwise-separable block (no expand conv)."""

    def __init__(self, in_chs: int, out_chs: int, k: int, stride: int, expansion: float, use_se: bool) -> None:
        super().__init__()
        mid = timm_make_divisible(in_chs * expansion, 8) if expansion != 1 else in_chs
        self.conv_pw: nn.Module = nn.Sequential(ConvBN(in_chs, mid, 1), nn.GELU()) if mid != in_chs else nn.Identity()
        self.conv_dw = ConvBN(mid, mid, k, stride, groups=mid)
        self.act = nn.GELU()
        self.se: nn.Module = MBV3SqueezeExcite(mid) if use_se else nn.Identity()
        self.conv_pwl = ConvBN(mid, out_chs, 1)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_pwl(self.se(self.act(self.conv_dw(self.conv_pw(x)))))
        return x + y if self.has_skip else y


class RepTransition(nn.Module):
    """Official stride-2 RepViT block: dw kxk (stride) conv-BN, SE, 1x1 conv-BN to out, residual FFN."""

    def __init__(self, in_chs: int, out_chs: int, k: int, stride: int, hidden: int, use_se: bool) -> None:
        super().__init__()
        self.token_mixer = nn.Sequential(
            ConvBN(in_chs, in_chs, k, stride, groups=in_chs),
            SqueezeExcite(in_chs) if use_se else nn.Identity(),
            ConvBN(in_chs, out_chs, 1),
        )
        self.channel_mixer = FFN(out_chs, hidden=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.channel_mixer(x)


class DeepDownsample(nn.Module):
    """The paper's deeper downsampling layer (keys as repvit's Downsample), with kernel k."""

    def __init__(self, in_chs: int, out_chs: int, k: int, expansion: float) -> None:
        super().__init__()
        self.pre_block = RepViTBlock(in_chs, use_se=False, kernel_size=k, hidden=_hidden(in_chs, expansion))
        self.spatial_downsample = ConvBN(in_chs, in_chs, k, 2, groups=in_chs)
        self.channel_downsample = ConvBN(in_chs, out_chs, 1)
        self.ffn = FFN(out_chs, hidden=_hidden(out_chs, expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_downsample(self.spatial_downsample(self.pre_block(x)))
        return x + self.ffn(x)


def _hidden(dim: int, expansion: float) -> int:
    return timm_make_divisible(dim * expansion, 8)


class MBV3Stem(nn.Module):
    """MobileNetV3 stem: 3x3 s2 conv-BN to 16, GELU, then the 16-channel depthwise-separable block."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.conv = ConvBN(in_chans, MBV3_STEM_WIDTH, 3, 2)
        self.act = nn.GELU()
        self.block = InvertedResidual(MBV3_STEM_WIDTH, MBV3_STEM_WIDTH, 3, 1, 1, use_se=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.act(self.conv(x)))


class MBV3Head(nn.Module):
    """MobileNetV3 head: 1x1 conv-BN to 960, GELU, pool, 1x1 conv to 1280, GELU, linear."""

    def __init__(self, in_chs: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBN(in_chs, MBV3_HEAD_CONV, 1)
        self.act = nn.GELU()
        self.conv_head = nn.Conv2d(MBV3_HEAD_CONV, MBV3_HEAD_HIDDEN, 1)
        self.act_head = nn.GELU()
        self.classifier = nn.Linear(MBV3_HEAD_HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x)).mean((2, 3), keepdim=True)
        return self.classifier(self.act_head(self.conv_head(x)).flatten(1))


class RoadmapStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class RoadmapNet(nn.Module):
    """A roadmap step as a network: stem, four stages (``downsample`` + ``blocks``), head."""

    def __init__(self, cfg: RoadmapConfig, *, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.num_classes, self.in_chans = cfg, num_classes, in_chans
        if cfg.stem == "mobilenetv3":
            self.stem: nn.Module = MBV3Stem(in_chans)
            in_dim = MBV3_STEM_WIDTH
        else:
            in_dim = cfg._stage_widths(0)[0]
            self.stem = Stem(in_chans, in_dim)
        stages = []
        for s in range(4):
            stage, in_dim = _build_stage(cfg, s, in_dim, stem_strided_only=cfg.stem == "mobilenetv3")
            stages.append(stage)
        self.stages = nn.ModuleList(stages)
        self.num_features = in_dim
        self.head: nn.Module = (MBV3Head(in_dim, num_classes) if cfg.head == "mobilenetv3"
                                else ClassifierHead(in_dim, num_classes))

    def pool_input_module(self) -> nn.Module:
        """The module whose output the classifier's global pool averages (for MAC counting): MobileNetV3's head
        pools its 960-wide conv, the simple head the last stage."""
        return self.head.act if self.cfg.head == "mobilenetv3" else self.stages[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x) if self.cfg.head == "mobilenetv3" else self.head(x.mean((2, 3)))


def _se_flags(cfg: RoadmapConfig, s: int, n: int, offset: int) -> list[bool]:
    """SE flags of ``n`` blocks; ``offset`` = blocks before them in the stage (the deep
    downsampling layer counts as one for the MobileNetV3 rule)."""
    if cfg.se == "none":
        return [False] * n
    if cfg.se == "cross_block":
        return [i % 2 == 0 for i in range(n)]
    total = n + offset
    first_se = total - round(total * MBV3_SE_FRACTION[s])
    return [i + offset >= first_se for i in range(n)]


def _build_stage(cfg: RoadmapConfig, s: int, in_dim: int, *, stem_strided_only: bool) -> tuple[RoadmapStage, int]:
    widths, k, depth = cfg._stage_widths(s), cfg.kernel_sizes[s], cfg.depths[s]
    # the MobileNetV3 stem stops at stride 2, so stage 0 then downsamples too
    strided = s > 0 or stem_strided_only
    blocks: list[nn.Module] = []
    downsample: nn.Module = nn.Identity()
    if cfg.downsample == "deep" and strided:
        downsample = DeepDownsample(in_dim, widths[0], k, cfg._expansion(s, 0))
        se = _se_flags(cfg, s, depth, offset=1)
        in_dim = widths[0]
    else:
        se = _se_flags(cfg, s, depth, offset=0)
    for j in range(depth):
        out, e = widths[j], cfg._expansion(s, j)
        stride = 2 if (j == 0 and strided and cfg.downsample == "block") else 1
        if cfg.block == "inverted_residual":
            blk: nn.Module = InvertedResidual(in_dim, out, k, stride, e, se[j])
        elif stride == 1 and in_dim == out:
            blk = RepViTBlock(out, use_se=se[j], kernel_size=k, hidden=_hidden(out, e))
        else:
            blk = RepTransition(in_dim, out, k, stride, _hidden(out, e), se[j])
        if stride == 2:
            downsample = blk
        else:
            blocks.append(blk)
        in_dim = out
    return RoadmapStage(downsample, blocks), in_dim


# ----------------------------------------------------------------------------- the walk

# (config change, label) for each step of the paper's Figure/section 3; the published
# numbers (iPhone 12 latency, ImageNet top-1 w/o distillation) are from the RepViT
# reference sheet (paper arXiv 2307.09283 / official repo), roadmap_mobilenetv3_to_repvit.
ROADMAP_STEPS: tuple[tuple[str, dict[str, Any], float | None, float], ...] = (
    ("MobileNetV3-L (GELU)", {}, 71.5, 1.01),
    ("RepViT block", {"block": "repvit"}, 68.3, 0.81),
    ("expansion ratio 2", {"expansion": 2.0}, None, 0.65),
    ("widths 48-96-192-384", {"widths": (48, 96, 192, 384)}, 73.5, 0.89),
    ("early-conv stem", {"stem": "early_conv"}, 73.9, 0.86),
    ("deeper downsampling", {"downsample": "deep", "depths": (2, 2, 5, 2)}, 75.4, 0.96),
    ("simple classifier", {"head": "simple"}, 74.8, 0.77),
    ("stage ratio 2:2:14:2", {"depths": (2, 2, 14, 2)}, 76.9, 0.91),
    ("3x3 kernels only", {"kernel_sizes": (3, 3, 3, 3)}, 76.9, 0.89),
    ("cross-block SE (= RepViT-M0.9)", {"se": "cross_block"}, 77.4, 0.87),
)


# where the published columns come from (recorded in every roadmap JSON step)
ROADMAP_SOURCE = ("RepViT paper (arXiv 2307.09283) section 3 / official repo, via the reference sheet "
                  "roadmap_mobilenetv3_to_repvit: iPhone 12 Core ML latency; ImageNet-1K top-1 of the aligned "
                  "300-epoch recipe without distillation")


def roadmap_configs() -> list[tuple[str, RoadmapConfig]]:
    """The ten configs in order, each derived from the previous one."""
    cfg, out = RoadmapConfig(), []
    for label, change, _, _ in ROADMAP_STEPS:
        cfg = replace(cfg, **change)
        out.append((label, cfg))
    return out


def build_roadmap_model(step: int | RoadmapConfig, *, num_classes: int = 1000, in_chans: int = 3) -> RoadmapNet:
    """Build roadmap step ``step`` (0..9) or an arbitrary config (random init, train form)."""
    if isinstance(step, RoadmapConfig):
        return RoadmapNet(step, num_classes=num_classes, in_chans=in_chans)
    if not 0 <= step < len(ROADMAP_STEPS):
        raise ValueError(f"roadmap step {step} out of range; steps are 0..{len(ROADMAP_STEPS) - 1}")
    return RoadmapNet(roadmap_configs()[step][1], num_classes=num_classes, in_chans=in_chans)


def config_dict(cfg: RoadmapConfig) -> dict[str, Any]:
    return asdict(cfg)
