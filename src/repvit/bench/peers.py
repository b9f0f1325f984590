"""Models the harness can time: our RepViT variants, timm's RepViT, and timm peers.

Published ImageNet-1k top-1 (%) is attached to every model with its source, for the
latency-vs-accuracy plot (weights are random: the harness measures speed only).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..models import FACTS, build_model, list_models
from ..reparam import reparameterize
from ..utils.complexity import count_macs

__all__ = ["ModelEntry", "CATALOG", "DEFAULT_MODELS", "resolve_models", "build_fused", "model_macs"]

_RS = "RepViT reference sheet (paper arXiv 2307.09283 / official repo)"
_T1 = "RepViT paper Table 1 (with KD), via " + _RS


@dataclass(frozen=True)
class ModelEntry:
    key: str           # what --models accepts
    display: str
    family: str
    source: str        # "repvit" (this package) | "timm"
    arch: str          # variant name (ours) or timm model name
    top1: float | None
    top1_source: str


def _ours() -> list[ModelEntry]:
    out = []
    for name in list_models(include_legacy=False):
        top1 = FACTS[name].top1_300e  # copied from the reference sheet into repvit.models.specs
        disp = "RepViT-" + name.split("_", 1)[1].replace("_", ".").upper()
        out.append(ModelEntry(name, disp, "RepViT (ours)", "repvit", name, top1, f"{_RS}, 300e with KD"))
    return out


# (timm name, display, family, top-1, source)
_PEERS: list[tuple[str, str, str, float | None, str]] = [
    ("repvit_m0_9", "RepViT-M0.9 (timm)", "RepViT (timm)", 78.7, f"{_RS}, 300e with KD"),
    ("repvit_m1_1", "RepViT-M1.1 (timm)", "RepViT (timm)", 80.7, f"{_RS}, 300e with KD"),
    ("mobilenetv3_large_100", "MobileNetV3-L", "MobileNetV3", 75.2, "MobileNetV3 paper (arXiv 1905.02244) Table 3"),
    ("mobilenetv4_conv_small", "MobileNetV4-Conv-S", "MobileNetV4", 73.8, "MobileNetV4 paper (arXiv 2404.10518) Table"),
    ("mobilenetv4_conv_medium", "MobileNetV4-Conv-M", "MobileNetV4", 79.9, "MobileNetV4 paper (arXiv 2404.10518) Table"),
    ("efficientformerv2_s0", "EfficientFormerV2-S0", "EfficientFormerV2", 75.7, _T1),
    ("efficientformerv2_s1", "EfficientFormerV2-S1", "EfficientFormerV2", 79.0, _T1),
    ("efficientformerv2_s2", "EfficientFormerV2-S2", "EfficientFormerV2", 81.6, _T1),
    ("efficientformerv2_l", "EfficientFormerV2-L", "EfficientFormerV2", 83.3, _T1),
    ("fastvit_t8", "FastViT-T8", "FastViT", 76.7, _T1),
    ("fastvit_t12", "FastViT-T12", "FastViT", 80.3, "FastViT paper (arXiv 2303.14189), distillation table"),
    ("fastvit_sa12", "FastViT-SA12", "FastViT", 81.9, _T1),
    ("mobileone_s0", "MobileOne-S0", "MobileOne", 71.4, "MobileOne paper (arXiv 2206.04040) Table"),
    ("mobileone_s1", "MobileOne-S1", "MobileOne", 75.9, "MobileOne paper (arXiv 2206.04040) Table"),
    ("mobileone_s2", "MobileOne-S2", "MobileOne", 77.4, "MobileOne paper (arXiv 2206.04040) Table"),
    ("mobileone_s3", "MobileOne-S3", "MobileOne", 78.1, "MobileOne paper (arXiv 2206.04040) Table"),
    ("mobileone_s4", "MobileOne-S4", "MobileOne", 79.4, "MobileOne paper (arXiv 2206.04040) Table"),
    ("efficientvit_m0", "EfficientViT-M0", "EfficientViT-M", 63.2, "EfficientViT (MSRA) paper (arXiv 2305.07027) Table"),
    ("efficientvit_m2", "EfficientViT-M2", "EfficientViT-M", 70.8, "EfficientViT (MSRA) paper (arXiv 2305.07027) Table"),
    ("efficientvit_m4", "EfficientViT-M4", "EfficientViT-M", 74.3, "EfficientViT (MSRA) paper (arXiv 2305.07027) Table"),
    ("efficientvit_m5", "EfficientViT-M5", "EfficientViT-M", 77.1, "EfficientViT (MSRA) paper (arXiv 2305.07027) Table"),
    ("efficientvit_b0", "EfficientViT-B0", "EfficientViT-B", 71.6, "timm model card efficientvit_b0.r224_in1k"),
    ("efficientvit_b1", "EfficientViT-B1", "EfficientViT-B", 79.4, "timm model card efficientvit_b1.r224_in1k"),
    ("efficientvit_b2", "EfficientViT-B2", "EfficientViT-B", 82.1, "timm model card efficientvit_b2.r224_in1k"),
]

CATALOG: dict[str, ModelEntry] = {e.key: e for e in _ours()}
CATALOG.update({
    (f"timm:{n}" if n.startswith("repvit") else n): ModelEntry(
        f"timm:{n}" if n.startswith("repvit") else n, d, fam, "timm", n, t, src)
    for n, d, fam, t, src in _PEERS
})

# quick default: ours vs timm's RepViT (the ONNX target) and the paper's starting point
DEFAULT_MODELS = ("repvit_m0_9", "timm:repvit_m0_9", "mobilenetv3_large_100")
GROUPS = {
    "default": DEFAULT_MODELS,
    "repvit": tuple(e.key for e in _ours()),
    "peers": tuple(k for k, e in CATALOG.items() if e.source == "timm"),
    "all": tuple(CATALOG),
}


def resolve_models(names: list[str] | None) -> list[ModelEntry]:
    """Expand group names (default, repvit, peers, all) and validate model keys."""
    keys: list[str] = []
    for n in names or ["default"]:
        n = n.strip()
        for k in GROUPS.get(n, (n,)):
            if k not in CATALOG:
                raise ValueError(f"unknown model {k!r} for repvit bench; use a group ({', '.join(GROUPS)}) "
                                 f"or one of: {', '.join(CATALOG)}")
            if k not in keys:
                keys.append(k)
    return [CATALOG[k] for k in keys]


def _fx_fuse_bn(model: nn.Module) -> nn.Module | None:
    # timm has no fuse() for e.g. MobileNetV3/V4: fold conv+BN with torch.fx where traceable,
    # so peers are not penalised for BN layers that every deployment runtime folds anyway
    try:
        from torch.fx.experimental.optimization import fuse
        return fuse(model)
    except Exception:  # not symbolically traceable: keep the timm model as is
        return None


@torch.no_grad()
def build_fused(entry: ModelEntry, *, features_only: bool = False) -> tuple[nn.Module, str]:
    """Random-init model in inference form; returns (model, how it was fused)."""
    if entry.source == "repvit":
        return reparameterize(build_model(entry.arch, features_only=features_only).eval()), "repvit.reparameterize"
    import timm
    from timm.utils.model import reparameterize_model
    kw = {"features_only": True} if features_only else {}
    model = reparameterize_model(timm.create_model(entry.arch, pretrained=False, **kw).eval())
    how = "timm.reparameterize_model"
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        fused = _fx_fuse_bn(model)
        if fused is not None and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules()):
            model, how = fused.eval(), how + " + fx conv-bn fold"
        else:
            how += " (some BatchNorm left)"
    return model, how


def model_macs(model: nn.Module, input_size: tuple[int, int], source: str) -> tuple[int, str]:
    """MACs at batch 1: our fvcore-convention counter for RepViT, fvcore for peers (it also
    counts attention matmuls); falls back to conv/linear hooks if fvcore is missing or fails."""
    if source != "repvit":
        try:
            from fvcore.nn import FlopCountAnalysis
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fca = FlopCountAnalysis(model, torch.zeros(1, 3, *input_size))
                fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
                return int(fca.total()), "fvcore"
        except Exception:
            pass
    return count_macs(model, input_size, in_chans=3), "repvit.count_macs"
