"""Build the student model a config describes (fresh, fine-tuned from a checkpoint, or ablated)."""

from __future__ import annotations

from torch import nn

from repvit.models import build_model
from repvit.models.repvit import ConvBN, RepDWConv

from .config import TrainConfig

__all__ = ["build_student", "strip_reparam_branches", "model_from_file"]


def strip_reparam_branches(model: nn.Module) -> nn.Module:
    """Ablation: replace every RepVGG token mixer (dwkxk+BN, dw1x1, identity, BN) by one dwkxk+BN.

    The result has the same deploy-form architecture, so it isolates what the training-time
    branches contribute (paper ablation: re-parameterisation on vs off).
    """
    for name, child in list(model.named_children()):
        if isinstance(child, RepDWConv):
            dim, k = child.conv.c.in_channels, child.conv.c.kernel_size[0]
            setattr(model, name, ConvBN(dim, dim, k, groups=dim))
        else:
            strip_reparam_branches(child)
    return model


def build_student(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """Random init, or ``model.pretrained`` loaded with a new head when the class count differs."""
    distill = cfg.model.distillation or cfg.distill.kind != "none"
    kw = dict(drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate)
    if cfg.model.pretrained:
        import repvit
        # create_model keeps the trained classifier whenever the class count matches (a distillation head is
        # started from it, or dropped); only a new class count gets a fresh head
        model = repvit.create_model(cfg.model.name, checkpoint=cfg.model.pretrained, deploy=False,
                                    num_classes=num_classes, distillation=distill, in_chans=in_chans, **kw)
    else:
        model = build_model(cfg.model.name, distillation=distill, num_classes=num_classes, in_chans=in_chans, **kw)
    if not cfg.model.reparam_branches:
        if cfg.model.pretrained:
            # stripping would throw away the trained 1x1/identity branches and change what the weights compute
            raise ValueError("model.reparam_branches=false is the from-scratch ablation; with model.pretrained it "
                             "would discard trained branch weights. Drop one of the two settings")
        strip_reparam_branches(model)
    if cfg.run.grad_checkpointing:
        # larger micro-batches on one device; BatchNorm statistics still move once per step (see the model)
        model.set_grad_checkpointing(True)
    return model


def model_from_file(path: str, **kwargs) -> nn.Module:
    """``repvit.create_model`` for a file whose variant is read from the file itself."""
    from repvit.weights.api import model_from_checkpoint

    return model_from_checkpoint(path, **kwargs)