"""Re-parameterisation: one entry point that turns a train-form model into its deploy form.

Protocol: every train-time module that can fold implements ``fuse()`` and returns the
module that replaces it (ConvBN -> Conv2d, RepDWConv -> depthwise Conv2d,
BNLinear -> Linear, ClassifierHead -> LinearHead). ``reparameterize`` walks the tree,
swaps each such module for its fused form, then *verifies* the result: if any
BatchNorm (any ``_BatchNorm``, SyncBatchNorm included) or any still-fusable module remains it
raises, naming it. It never replaces an un-fused BatchNorm with Identity (the official helper
does, silently changing outputs). A ``fuse()`` meets only BatchNorms it folds (SyncBatchNorm
after ``convert_sync_batchnorm`` folds like BatchNorm2d); any other norm type raises.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["reparameterize", "ReparameterizationError", "is_deploy_form", "leftover_train_modules"]


class ReparameterizationError(RuntimeError):
    """Raised when a model still holds BatchNorm or training-only branches after fusing."""


def _is_fusable(m: nn.Module) -> bool:
    return callable(getattr(m, "fuse", None))


def _fuse_children(parent: nn.Module, prefix: str = "") -> None:
    for name, child in list(parent.named_children()):
        if _is_fusable(child):
            try:
                fused = child.fuse()
            except ReparameterizationError as e:  # e.g. a norm that is not a BatchNorm: say which module
                raise ReparameterizationError(f"{prefix}{name} ({type(child).__name__}): {e}") from e
            setattr(parent, name, fused)
        else:
            _fuse_children(child, f"{prefix}{name}.")


def leftover_train_modules(model: nn.Module) -> list[str]:
    """Names of modules that a deploy model must not contain (BatchNorm, fusable branches)."""
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) or _is_fusable(m):
            bad.append(f"{name or '<root>'} ({type(m).__name__})")
    return bad


def is_deploy_form(model: nn.Module) -> bool:
    return not leftover_train_modules(model)


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """Return a new deploy-form copy of ``model``; the input is left unchanged.

    Works on any model built from this package's blocks (classifier or features-only),
    preserves dtype and device, and is idempotent (a deploy model comes back as an equal copy).
    The returned model is in eval mode.
    """
    dtypes = {p.dtype for p in model.parameters()}
    devices = {p.device for p in model.parameters()}
    fused = copy.deepcopy(model).eval()
    if _is_fusable(fused):
        raise ReparameterizationError("reparameterize() expects a model containing fusable blocks, not a single block")
    _fuse_children(fused)
    leftovers = leftover_train_modules(fused)
    if leftovers:
        raise ReparameterizationError(
            "fusing left training-only modules that would change the outputs if dropped: "
            + ", ".join(leftovers[:10]) + (" ..." if len(leftovers) > 10 else "")
            + ". Give each a fuse() method or remove it before deployment."
        )
    if {p.dtype for p in fused.parameters()} - dtypes or {p.device for p in fused.parameters()} - devices:
        raise ReparameterizationError("fusing changed the model's dtype or device")  # pragma: no cover
    for m in fused.modules():
        if hasattr(m, "deploy"):
            m.deploy = True
    return fused
