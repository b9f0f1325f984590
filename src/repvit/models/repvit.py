"""RepViT: Revisiting Mobile CNN From ViT Perspective (Wang et al., CVPR 2024).

One file for the whole family. Every variant is a row of ``specs.SPECS``
(widths, depths, legacy flag); everything else follows from the rules below.

    stem        3x3 s2 conv-BN (C0/2), GELU, 3x3 s2 conv-BN (C0)          -> stride 4
    stage 0     depths[0] RepViT blocks
    stage i>0   downsample: RepViT block (no SE) at the old width,
                            dw 3x3 s2 conv-BN, 1x1 conv-BN to the new width,
                            residual FFN
                then depths[i] RepViT blocks
    block       token mixer  = BN(dw3x3-BN(x) + dw1x1(x) + x)  [legacy: dw3x3-BN + dw1x1-BN + x]
                               then SE on blocks 0, 2, 4, ... of each stage ("cross-block SE")
                channel mixer= x + FFN(x), FFN = 1x1 (x2) - GELU - 1x1 (BN init 0)
    head        global average pool, BN1d + Linear (+ a second head for distillation)

Train-form modules that can be folded implement ``fuse()``; ``repvit.reparameterize``
is the single entry point that calls them. ``deploy=True`` builds the folded form
directly so fused checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import contextlib
import operator
import os
from functools import lru_cache, partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..reparam import ReparameterizationError
from .specs import RepViTSpec, default_preprocessing

__all__ = ["RepViT", "RepViTFeatures", "ConvBN", "RepDWConv", "BNLinear", "ClassifierHead", "LinearHead"]


# ----------------------------------------------------------------------------- folding math


def _fold_dtype(t: torch.Tensor) -> torch.dtype:
    # Fold in float64 where the device has it (MPS has no float64: float32 there). Every fold keeps its
    # intermediates in this dtype and rounds to the model's dtype once, at the end, so the fused weights are
    # the single rounding of the true fold (float64 models stay exact; bf16/fp16 models are not rounded twice).
    return torch.float32 if t.device.type == "mps" else torch.float64


def _require_batchnorm(norm: nn.Module, where: str) -> nn.modules.batchnorm._BatchNorm:
    """``norm`` if it is a foldable BatchNorm (any ``_BatchNorm``: BatchNorm1d/2d, SyncBatchNorm, ...), else raise.

    Fusion must never skip a norm it does not understand: that would silently change the outputs.
    """
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise ReparameterizationError(
            f"cannot fold {type(norm).__name__} in {where}: only BatchNorm layers (BatchNorm1d/2d, SyncBatchNorm) "
            "fold into the preceding conv/linear. Convert it back to BatchNorm or leave the model unfused."
        )
    if norm.running_mean is None or norm.running_var is None:
        raise ReparameterizationError(
            f"cannot fold the {type(norm).__name__} in {where}: it has no running statistics "
            "(track_running_stats=False)"
        )
    return norm


@torch.no_grad()
def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm, fd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``bn(y) == scale * y + shift`` in eval mode, computed in ``fd``."""
    gamma = bn.weight.to(fd) if bn.weight is not None else torch.ones_like(bn.running_var, dtype=fd)
    beta = bn.bias.to(fd) if bn.bias is not None else torch.zeros_like(bn.running_mean, dtype=fd)
    scale = gamma / torch.sqrt(bn.running_var.to(fd) + bn.eps)
    return scale, beta - bn.running_mean.to(fd) * scale


@torch.no_grad()
def _fold_bn_exact(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module, fd: torch.dtype, where: str = "a ConvBN",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``bn(conv(x) + bias)`` into (weight, bias), both in ``fd`` (not rounded)."""
    bn = _require_batchnorm(bn, where)
    scale, shift = _bn_scale_shift(bn, fd)
    w = weight.to(fd) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias.to(fd) * scale + shift
    return w, b


@torch.no_grad()
def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``bn(conv(x) + bias)`` into a single (weight, bias) in the conv's dtype (rounded once)."""
    w, b = _fold_bn_exact(weight, bias, bn, _fold_dtype(weight))
    return w.to(weight.dtype), b.to(weight.dtype)


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    out = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, device=weight.device, dtype=weight.dtype,
    )
    out.weight.data.copy_(weight)
    out.bias.data.copy_(bias)
    return out


# ----------------------------------------------------------------------------- small-map depthwise conv

# Depthwise kxk convs whose input has at most this many pixels are computed, when a backward pass can
# follow, as one (out_pixels x in_pixels) matrix per channel. Why: oneDNN's depthwise *backward* on 2x2 and
# 1x1 maps (stages 3-4 of a 32x32 input, e.g. Fashion-MNIST) took 19-62 ms per call at batch 256 on 2 threads,
# against 1-7 ms as a matrix product (forward alone is fast either way, so inference keeps the plain conv);
# that backward was half of a training step. See docs/training.md, "Training on small inputs".
# Measured per instruction set (benchmarks/small_map_dwconv.py, 2 threads, batch 256): with oneDNN's AVX2
# kernels the matrix path wins on 2x2 (2.35x) and 1x1 (58x) maps; with its AVX-512 kernels 2x2 is fast already
# (the matrix path 0.37x there; 1x1 still 6x), so the threshold follows the kernels PyTorch dispatches to.
# REPVIT_SMALL_MAP_PIXELS=N overrides it (0 turns the path off); tests and benchmarks may set the variable below.
def _default_small_map_pixels() -> int:
    env = os.environ.get("REPVIT_SMALL_MAP_PIXELS", "").strip()
    if env:
        if not env.isdigit():
            raise ValueError(f"REPVIT_SMALL_MAP_PIXELS must be a non-negative integer (pixels), got {env!r}")
        return int(env)
    return 1 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 4


SMALL_MAP_PIXELS = _default_small_map_pixels()


@lru_cache(maxsize=64)
def _tap_index(h: int, w: int, k: int, stride: int, pad: int) -> torch.Tensor:
    """idx[p, q] = flat kernel tap linking output pixel p to input pixel q, or k*k (a zero tap) if none."""
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    oi, oj = torch.meshgrid(torch.arange(ho), torch.arange(wo), indexing="ij")
    ii, ij = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    a = ii.reshape(1, -1) - stride * oi.reshape(-1, 1) + pad      # kernel row for (p, q)
    b = ij.reshape(1, -1) - stride * oj.reshape(-1, 1) + pad      # kernel column for (p, q)
    inside = (a >= 0) & (a < k) & (b >= 0) & (b < k)
    return torch.where(inside, a * k + b, torch.full_like(a, k * k))


def small_map_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, pad: int
) -> torch.Tensor:
    """Depthwise conv (groups == channels, dilation 1, square kernel) as a per-channel matrix product.

    The same function as ``F.conv2d(x, weight, bias, stride, pad, groups=C)`` (up to float rounding); its cost grows with
    (H*W)^2, so it only pays off on tiny maps (see ``SMALL_MAP_PIXELS``).
    """
    n, c, h, w = x.shape
    k = weight.shape[-1]
    idx = _tap_index(h, w, k, stride, pad).to(x.device)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    taps = torch.cat([weight.reshape(c, k * k), weight.new_zeros(c, 1)], dim=1)
    mat = taps[:, idx]                                             # (C, P_out, Q_in)
    out = torch.einsum("ncq,cpq->ncp", x.reshape(n, c, h * w), mat).reshape(n, c, ho, wo)
    return out if bias is None else out + bias.reshape(1, c, 1, 1)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and keys) that routes CPU training on tiny maps through
    :func:`small_map_depthwise_conv`; everything else (inference, GPUs, tracing, export, compile) is the plain conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._small_map(x):
                return small_map_depthwise_conv(x, self.weight, self.bias, self.stride[0], int(self.padding[0]))
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.unused
    def _small_map(self, x: torch.Tensor) -> bool:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():   # exports and compile see the plain conv
            return False
        # CPU only: measured there; GPU depthwise kernels were not shown to have the problem
        return (x.device.type == "cpu" and x.dim() == 4 and x.shape[-2] * x.shape[-1] <= SMALL_MAP_PIXELS
                and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
                and self.groups == self.in_channels == self.out_channels and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and self.stride[0] == self.stride[1] and self.padding[0] == self.padding[1])


# ----------------------------------------------------------------------------- layers


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d. Keys ``c`` / ``bn`` (official and timm layout)."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1,
        groups: int = 1, bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        depthwise = groups == in_chs == out_chs and kernel_size > 1
        self.c = (DepthwiseConv2d if depthwise else nn.Conv2d)(
            in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        w, b = fold_bn(self.c.weight, None, _require_batchnorm(self.bn, "ConvBN.bn"))
        return _conv_like(self.c, w, b)


def conv_bn(
    in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
    bn_weight_init: float = 1.0, *, deploy: bool = False,
) -> nn.Module:
    """ConvBN in train form, a biased Conv2d (what ConvBN folds to) in deploy form."""
    if deploy:
        return nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=True)
    return ConvBN(in_chs, out_chs, kernel_size, stride, groups, bn_weight_init)


class RepDWConv(nn.Module):
    """RepVGG-style depthwise kxk token mixer (k=3 in RepViT); folds into one depthwise kxk conv.

    current: ``bn(convkxk_bn(x) + conv1x1(x) + x)``; legacy: ``convkxk_bn(x) + conv1x1_bn(x) + x``.
    """

    def __init__(self, dim: int, legacy: bool = False, kernel_size: int = 3) -> None:
        super().__init__()
        self.legacy = legacy
        self.kernel_size = kernel_size
        self.conv = ConvBN(dim, dim, kernel_size, groups=dim)
        if legacy:
            self.conv1 = ConvBN(dim, dim, 1, groups=dim)
            self.bn = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(dim, dim, 1, groups=dim, bias=True)
            self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # conv1(x) + x stays a 1x1 depthwise conv plus an add: as one affine map (addcmul) it is the same function,
        # faster in NCHW float32 CPU training but slower in channels_last / bf16 (benchmarks/dw1x1_affine.py)
        return self.bn(self.conv(x) + self.conv1(x) + x)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        # the whole fold (inner ConvBNs, branch sum, outer norm) stays in float64 and is rounded once
        kw = self.conv.c.weight
        fd, c = _fold_dtype(kw), self.kernel_size // 2
        wk, bk = _fold_bn_exact(kw, None, self.conv.bn, fd, "RepDWConv.conv.bn")
        if self.legacy:
            w1, b1 = _fold_bn_exact(self.conv1.c.weight, None, self.conv1.bn, fd, "RepDWConv.conv1.bn")
        else:
            w1, b1 = self.conv1.weight.to(fd), self.conv1.bias.to(fd)
        # 1x1 branch padded to the centre of the kxk kernel; identity = a centred 1
        w = wk + F.pad(w1, [c, c, c, c])
        w[:, 0, c, c] += 1.0
        b = bk + b1
        if not isinstance(self.bn, nn.Identity):  # legacy layout has no outer norm; anything else must fold
            w, b = _fold_bn_exact(w, b, self.bn, fd, "RepDWConv.bn")
        return _conv_like(self.conv.c, w.to(kw.dtype), b.to(kw.dtype))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor`` (at least ``divisor``); SE widths use this."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """SE with reduction 0.25 rounded to a multiple of 8, ReLU inside, sigmoid gate."""

    def __init__(self, dim: int, rd_ratio: float = 0.25) -> None:
        super().__init__()
        rd = make_divisible(dim * rd_ratio)
        self.fc1 = nn.Conv2d(dim, rd, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class FFN(nn.Module):
    """Channel mixer: 1x1 expand (x2), GELU, 1x1 project. The projection BN starts at 0
    so every residual block is the identity at initialisation."""

    def __init__(self, dim: int, ratio: int = 2, *, hidden: int | None = None, deploy: bool = False) -> None:
        super().__init__()
        hidden = hidden or dim * ratio  # an explicit width serves the roadmap's MobileNetV3 expansions
        self.conv1 = conv_bn(dim, hidden, 1, deploy=deploy)
        self.act = nn.GELU()
        self.conv2 = conv_bn(hidden, dim, 1, bn_weight_init=0.0, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (per sample). Off (identity) at rate 0 and in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RepViTBlock(nn.Module):
    """Token mixer (re-parameterisable dw 3x3, optional SE) then residual channel mixer."""

    def __init__(
        self, dim: int, *, use_se: bool, legacy: bool = False, drop_path: float = 0.0, deploy: bool = False,
        kernel_size: int = 3, hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.token_mixer = (conv_bn(dim, dim, kernel_size, groups=dim, deploy=True) if deploy
                            else RepDWConv(dim, legacy, kernel_size))
        self.se = SqueezeExcite(dim) if use_se else nn.Identity()
        self.channel_mixer = FFN(dim, hidden=hidden, deploy=deploy)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.token_mixer(x))
        return x + self.drop_path(self.channel_mixer(x))


class Downsample(nn.Module):
    """The paper's deeper downsampling layer: block, dw 3x3 s2, 1x1 to the new width, residual FFN."""

    def __init__(
        self, in_dim: int, out_dim: int, *, legacy: bool = False, stride: int = 2,
        drop_path: float = 0.0, deploy: bool = False,
    ) -> None:
        super().__init__()
        self.pre_block = RepViTBlock(in_dim, use_se=False, legacy=legacy, drop_path=drop_path, deploy=deploy)
        self.spatial_downsample = conv_bn(in_dim, in_dim, 3, stride, groups=in_dim, deploy=deploy)
        self.channel_downsample = conv_bn(in_dim, out_dim, 1, deploy=deploy)
        self.ffn = FFN(out_dim, deploy=deploy)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_downsample(self.spatial_downsample(self.pre_block(x)))
        return x + self.drop_path(self.ffn(x))


@contextlib.contextmanager
def _frozen_norm_statistics(module: nn.Module):
    """Leave BatchNorm running statistics as they were on entry (restored on exit).

    Gradient checkpointing runs a block's forward a second time in the backward pass, still in train mode;
    without this, every BatchNorm would fold the same batch into its running statistics twice per step."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in zip(norms, saved):
                for b, v in zip(m.buffers(), bufs):
                    b.copy_(v)


def _checkpoint_context(module: nn.Module):
    # (forward context, recompute context) for torch.utils.checkpoint's non-reentrant mode
    return contextlib.nullcontext(), _frozen_norm_statistics(module)


class RepViTStage(nn.Module):
    def __init__(
        self, in_dim: int, out_dim: int, depth: int, *, downsample: bool, legacy: bool,
        drop_paths: Sequence[float], deploy: bool, downsample_stride: int = 2,
    ) -> None:
        super().__init__()
        self.downsample: nn.Module = (
            Downsample(in_dim, out_dim, legacy=legacy, stride=downsample_stride,
                       drop_path=drop_paths[0], deploy=deploy)
            if downsample else nn.Identity()
        )
        # cross-block SE: blocks 0, 2, 4, ... of every stage carry SE
        self.blocks = nn.Sequential(*[
            RepViTBlock(out_dim, use_se=(i % 2 == 0), legacy=legacy, drop_path=drop_paths[i], deploy=deploy)
            for i in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            for blk in self.blocks:
                if torch.compiler.is_compiling():
                    # traced once by AOTAutograd, whose recompute replays no buffer writes (and which accepts only
                    # dispatch-mode contexts here)
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = checkpoint(blk, x, use_reentrant=False, context_fn=partial(_checkpoint_context, blk))
            return x
        return self.blocks(x)


class Stem(nn.Module):
    """Early convolutions: two 3x3 stride-2 conv-BN with GELU between (output stride 4)."""

    def __init__(self, in_chs: int, out_chs: int, *, deploy: bool = False) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_chs, out_chs // 2, 3, 2, deploy=deploy)
        self.act1 = nn.GELU()
        self.conv2 = conv_bn(out_chs // 2, out_chs, 3, 2, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.conv1(x)))


class BNLinear(nn.Sequential):
    """BatchNorm1d then Linear (keys ``bn`` / ``l``); folds into one Linear."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.l = nn.Linear(in_features, out_features)
        nn.init.trunc_normal_(self.l.weight, std=0.02)
        nn.init.zeros_(self.l.bias)

    @torch.no_grad()
    def _fold(self, fd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # y = W (k x + shift) + b  =  (W * k) x + (W shift + b),  k = gamma / s, in ``fd`` (not rounded)
        scale, shift = _bn_scale_shift(_require_batchnorm(self.bn, "BNLinear.bn"), fd)
        w = self.l.weight.to(fd)
        return w * scale[None, :], w @ shift + self.l.bias.to(fd)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        w, b = self._fold(_fold_dtype(self.l.weight))
        return _linear_like(self.l, w, b)


def _linear_like(ref: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(ref.in_features, ref.out_features, device=ref.weight.device, dtype=ref.weight.dtype)
    lin.weight.data.copy_(weight.to(ref.weight.dtype))  # the one rounding to the model's dtype
    lin.bias.data.copy_(bias.to(ref.weight.dtype))
    return lin


class ClassifierHead(nn.Module):
    """Train-form classifier: one BN+Linear head, or two (class + distillation).

    Output contract: one logits tensor (the two heads averaged) unless the training code
    has called ``set_distilled_training(True)``; then, in train mode only, ``(cls, dist)``.
    """

    def __init__(self, dim: int, num_classes: int, *, distillation: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = BNLinear(dim, num_classes)
        self.head_dist: nn.Module | None = BNLinear(dim, num_classes) if distillation else None
        self.distilled_training = False

    def forward(self, x: torch.Tensor):
        x = self.drop(x)
        if self.head_dist is None:
            return self.head(x)
        cls, dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return cls, dist
        return (cls + dist) / 2

    @torch.no_grad()
    def fuse(self) -> "LinearHead":
        fd = _fold_dtype(self.head.l.weight)
        w, b = self.head._fold(fd)
        if self.head_dist is not None:
            # the two heads are averaged at inference, so their folded Linears average too (in ``fd``, rounded once)
            w2, b2 = self.head_dist._fold(fd)
            w, b = (w + w2) / 2, (b + b2) / 2
        lin = _linear_like(self.head.l, w, b)
        out = LinearHead(lin.in_features, self.num_classes, drop_rate=self.drop_rate)
        out.head = lin
        return out


class LinearHead(nn.Module):
    """Deploy-form classifier (one Linear), or no classifier at all when ``num_classes == 0``."""

    def __init__(self, dim: int, num_classes: int, *, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head: nn.Module = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(x))


def make_head(dim: int, num_classes: int, *, distillation: bool, drop_rate: float, deploy: bool) -> nn.Module:
    if deploy or num_classes <= 0:
        return LinearHead(dim, num_classes, drop_rate=drop_rate)
    return ClassifierHead(dim, num_classes, distillation=distillation, drop_rate=drop_rate)


# ----------------------------------------------------------------------------- model


def _check_input(x: torch.Tensor, in_chans: int) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"RepViT expects a 4-D NCHW tensor, got {x.dim()}-D input of shape {list(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if x.shape[1] != in_chans:
        hint = (" It looks like NHWC: use x.permute(0, 3, 1, 2)." if x.shape[-1] == in_chans
                else f" Build the model with in_chans={x.shape[1]} to accept it.")
        raise ValueError(
            f"RepViT expects NCHW input with {in_chans} channels, got shape {list(x.shape)}.{hint}"
        )


class RepViT(nn.Module):
    """The RepViT backbone + classifier. Build through ``repvit.create_model``."""

    def __init__(
        self, spec: RepViTSpec, *, num_classes: int = 1000, in_chans: int = 3, distillation: bool = False,
        drop_rate: float = 0.0, drop_path_rate: float = 0.0, deploy: bool = False,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        if deploy and distillation:
            raise ValueError(_DEPLOY_DISTILLATION)
        self.spec = spec
        self.variant = variant
        self.in_chans = in_chans
        self.num_classes = num_classes
        # the requested distillation setting (train form), kept even while there is no classifier
        # (num_classes=0), so that a later reset_classifier(n) restores the two heads
        self._distillation = bool(distillation)
        self.drop_rate = drop_rate
        self.deploy = deploy
        # evaluation preprocessing travels with the weights (saved in checkpoint metadata)
        self.preprocessing: dict = default_preprocessing(in_chans)
        widths, depths = spec.widths, spec.depths
        self.num_features = widths[-1]

        self.stem = Stem(in_chans, widths[0], deploy=deploy)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist() if sum(depths) else []
        stages, start, in_dim = [], 0, widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            stages.append(RepViTStage(
                in_dim, w, d, downsample=i > 0, legacy=spec.legacy,
                drop_paths=dpr[start:start + d] or [0.0], deploy=deploy,
            ))
            start += d
            in_dim = w
        self.stages = nn.ModuleList(stages)
        self.feature_info = [
            dict(num_chs=w, reduction=4 * 2 ** i, module=f"stages.{i}") for i, w in enumerate(widths)
        ]
        self.head = make_head(widths[-1], num_classes, distillation=distillation,
                              drop_rate=drop_rate, deploy=deploy)

    # -- configuration --------------------------------------------------------------------
    @property
    def distillation(self) -> bool:
        return self.head.head_dist is not None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations (less memory, about
        one more forward of compute). Unlike a plain ``torch.utils.checkpoint`` (timm's), the recompute leaves
        BatchNorm running statistics alone, so they move once per step, exactly as without checkpointing."""
        for s in self.stages:
            s.grad_checkpointing = enable

    def set_distilled_training(self, enable: bool = True) -> None:
        """Ask the two-head model for the ``(cls, dist)`` pair in train mode (distillation training)."""
        if enable and not self.distillation:
            raise ValueError("set_distilled_training(True) needs a train-form model built with distillation=True")
        if isinstance(self.head, ClassifierHead):
            self.head.distilled_training = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, distillation: bool | None = None) -> None:
        """Replace the classifier (e.g. for fine-tuning on a new number of classes).

        ``num_classes=0`` removes the classifier (``forward`` returns pooled features). ``distillation``:
        ``None`` keeps the model's setting (remembered across ``num_classes=0``, so ``reset_classifier(0)``
        then ``reset_classifier(10)`` gives two heads again on a model built with ``distillation=True``);
        ``True``/``False`` changes it. A deploy-form model has one fused Linear: ``distillation=True`` there
        is an error (reset the train-form model, then ``reparameterize``).
        """
        _check_num_classes(num_classes)
        if self.deploy:
            if distillation:
                raise ValueError(_DEPLOY_DISTILLATION)
            distillation = False
        else:
            # getattr: a whole model pickled before the setting was remembered has no _distillation
            distillation = getattr(self, "_distillation", self.distillation) if distillation is None else bool(distillation)
            self._distillation = distillation
        ref = next(self.parameters())
        was_distilling = bool(getattr(self.head, "distilled_training", False))
        self.num_classes = num_classes
        self.head = make_head(self.num_features, num_classes, distillation=distillation,
                              drop_rate=self.drop_rate, deploy=self.deploy).to(ref.device, ref.dtype)
        self.head.train(self.training)  # a model in eval mode stays in eval mode (BatchNorm1d on running stats)
        if was_distilling and distillation and num_classes > 0:
            # a student set up for distillation keeps returning (cls, dist) in train mode with its new head
            self.set_distilled_training(True)

    # -- forward --------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_chans)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
        stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ):
        """Stage outputs (strides 4, 8, 16, 32) selected by ``indices``; timm's signature and semantics.

        ``indices``: stage indices (negative count from the end), or an int n meaning the last n stages;
        default all. ``norm``: accepted for timm compatibility, a no-op (RepViT has no final norm layer).
        ``stop_early``: stop after the last selected stage (the returned final features are then that
        stage's output). ``output_fmt``: ``"NCHW"`` or ``"NHWC"`` (intermediates permuted; the final
        features stay NCHW, ready for ``forward_head``). Returns ``intermediates`` if
        ``intermediates_only`` else ``(final_features, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take = _resolve_indices(indices, len(self.stages))
        _check_input(x, self.in_chans)
        feats = []
        x = self.stem(x)
        # with intermediates_only the final features are not returned, so the later stages are skipped
        last = max(take) if (stop_early or intermediates_only) else len(self.stages) - 1
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take:
                feats.append(x.permute(0, 2, 3, 1) if output_fmt == "NHWC" else x)
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last one ``indices`` selects (as timm); returns the selected indices.

        The classifier is removed (``reset_classifier(0)``) when ``prune_head`` or when stages were dropped
        (the head no longer fits the features); ``num_features`` then follows the last kept stage.
        ``prune_norm`` is a no-op (no final norm layer).
        """
        take = _resolve_indices(indices, len(self.stages))
        last = max(take)
        prune_end = last < len(self.stages) - 1
        self.stages = self.stages[: last + 1]
        if prune_end:
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take


_DEPLOY_DISTILLATION = (
    "distillation=True needs the train form: a deploy-form model has one fused Linear head (the two heads "
    "averaged). Build or reset the train-form model with distillation=True, then call repvit.reparameterize"
)


def _check_num_classes(num_classes: int) -> None:
    try:
        valid = not isinstance(num_classes, bool) and operator.index(num_classes) >= 0
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"num_classes must be an integer >= 0 (0 = no classifier), got {num_classes!r}")


def _resolve_indices(indices: int | Sequence[int] | None, n: int) -> list[int]:
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices} must be between 1 and {n} (the last n stages)")
        return list(range(n - indices, n))
    out = [i % n if -n <= i < n else -1 for i in indices]
    if -1 in out or not out:
        raise ValueError(f"stage indices {list(indices)} out of range; RepViT has stages 0..{n - 1}")
    return sorted(set(out))


class RepViTFeatures(nn.Module):
    """Features-only backbone: returns the list of selected stage outputs (for FPN-style necks)."""

    def __init__(self, model: RepViT, out_indices: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        self.out_indices = _resolve_indices(out_indices, len(model.stages))
        self.in_chans = model.in_chans
        self.variant = model.variant
        self.spec = model.spec
        self.deploy = model.deploy
        # evaluation preprocessing (e.g. normalisation read from a checkpoint) stays with the backbone
        self.preprocessing: dict = model.preprocessing
        self.stem = model.stem
        self.stages = model.stages[: max(self.out_indices) + 1]
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_input(x, self.in_chans)
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                out.append(x)
        return out
