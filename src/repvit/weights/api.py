"""``create_model`` / ``load_checkpoint`` / ``save_checkpoint``: the weights-aware public API."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..models.registry import build_model, canonical_name
from ..models.repvit import ClassifierHead, RepViT, RepViTFeatures, _check_num_classes
from ..reparam import reparameterize
from . import layouts
from .hub import download_weights, get_weights, sidecar_path
from .io import (FORMAT_VERSION, PICKLE_SUFFIXES, CheckpointFormatError, CorruptCheckpointError, ReadCheckpoint,
                 read_checkpoint, write_state_dict)

__all__ = ["create_model", "model_from_checkpoint", "load_checkpoint", "save_checkpoint", "CheckpointMismatchError"]


class CheckpointMismatchError(ValueError):
    """The checkpoint holds another variant, form or head than the model it is loaded into."""




def _model_form(model: nn.Module) -> str:
    return "deploy" if getattr(model, "deploy", False) else "train"


def _check_variant(ck: ReadCheckpoint, model: RepViT | RepViTFeatures) -> None:
    spec = model.spec
    info = ck.info
    same_arch = spec.widths == info.widths and spec.depths == info.depths
    if not same_arch or (info.legacy is not None and info.legacy != spec.legacy and _model_form(model) == "train"):
        names = layouts.matching_variants(info)
        raise CheckpointMismatchError(
            f"{ck.path} is a {ck.describe()}, but the model is {model.variant} "
            f"(widths {list(spec.widths)}, depths {list(spec.depths)}{', legacy token mixer' if spec.legacy else ''}). "
            f"Create the matching variant, e.g. repvit.create_model({names[0]!r}, checkpoint=...) (on the command "
            f"line: --variant {names[0]}, or no --variant to read it from the file)"
            if names else f"{ck.path} holds an architecture that is no RepViT variant ({ck.describe()})"
        )
    if ck.info.in_chans != model.in_chans:
        raise CheckpointMismatchError(
            f"{ck.path} was trained with in_chans={ck.info.in_chans}, the model has in_chans={model.in_chans}; "
            f"build it with in_chans={ck.info.in_chans}"
        )


def _check_form(ck: ReadCheckpoint, model: nn.Module) -> None:
    mf, cf = _model_form(model), ck.info.form
    if mf == cf:
        return
    if cf == "deploy":
        raise CheckpointMismatchError(
            f"{ck.path} holds fused (deploy-form) weights, which cannot be un-fused into a train-form model. "
            f"Build the model with deploy=True (or repvit.create_model(name, checkpoint=path)), or use the "
            "train-form checkpoint to keep training."
        )
    raise CheckpointMismatchError(
        f"{ck.path} holds train-form (un-fused) weights but the model is in deploy form. Load it into a train-form "
        "model and call repvit.reparameterize(model), or use repvit.create_model(name, checkpoint=path, deploy=True) "
        "which does both."
    )


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], ck: ReadCheckpoint, *, strict: bool) -> None:
    if isinstance(model, RepViTFeatures):
        # a backbone has no classifier and may stop early: keep what it owns
        own = set(model.state_dict())
        sd = {k: v for k, v in sd.items() if k in own}
    own_sd = model.state_dict()
    # BatchNorm's step counter is not a weight (torch fills a missing one itself): files cleaned of it load
    sd = {**{k: v for k, v in own_sd.items() if k.endswith("num_batches_tracked") and k not in sd}, **sd}
    shape_bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own_sd[k].shape)}"
                 for k, v in sd.items() if k in own_sd and own_sd[k].shape != v.shape]
    missing = [k for k in own_sd if k not in sd]
    unexpected = [k for k in sd if k not in own_sd]
    if shape_bad or (strict and (missing or unexpected)):
        hint = ""
        if any(k.startswith("head.") for k in missing + unexpected) or any(s.startswith("head.") for s in shape_bad):
            hint = (f" The classifier differs (file: {ck.info.num_classes} classes, distillation="
                    f"{ck.info.distillation}); to fine-tune with a new head use "
                    "repvit.create_model(name, checkpoint=path, num_classes=N).")
        raise CheckpointMismatchError(
            f"cannot load {ck.describe()} from {ck.path} into {model.variant}: "
            f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}, "
            f"shape mismatches {shape_bad[:4]}.{hint}"
        )
    ref = next(model.parameters())
    sd = {k: v.to(device=ref.device, dtype=own_sd[k].dtype) if k in own_sd else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=strict)


def load_checkpoint(
    model: RepViT | RepViTFeatures, path: str | os.PathLike, *, use_ema: bool | None = None, strict: bool = True,
) -> RepViT | RepViTFeatures:
    """Load any supported checkpoint (official / timm / repvit; train or deploy form) into ``model``.

    ``use_ema``: for files holding both raw and EMA weights. Default ``None`` takes the raw weights
    (``model``), as the official evaluation does; ``True`` takes the EMA copy. Returns ``model``.
    """
    ck = read_checkpoint(path, use_ema=use_ema)
    _check_variant(ck, model)
    _check_form(ck, model)
    _load_into(model, ck.state_dict, ck, strict=strict)
    if "preprocessing" in ck.metadata and isinstance(model, (RepViT, RepViTFeatures)):
        model.preprocessing = ck.metadata["preprocessing"]
    return model


def _retarget_head(model: RepViT, num_classes: int, distillation: bool) -> None:
    """Give a freshly loaded model the requested classifier (fine-tuning)."""
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes, distillation=distillation)
    elif distillation != model.distillation:
        if isinstance(model.head, ClassifierHead):
            if distillation:  # start the distillation head from the class head
                import copy
                model.head.head_dist = copy.deepcopy(model.head.head)
            else:
                model.head.head_dist = None
        model._distillation = distillation  # remembered for a later reset_classifier (also with num_classes=0)


def create_model(
    name: str, *, pretrained: bool | str = False, deploy: bool | None = None, distillation: bool | None = None,
    num_classes: int | None = None, checkpoint: str | os.PathLike | None = None, use_ema: bool | None = None,
    in_chans: int | None = None, features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3),
    **kwargs: Any,
) -> RepViT | RepViTFeatures:
    """Build a RepViT variant, optionally with weights.

    Without weights: ``deploy``/``distillation`` default to False, ``num_classes`` to 1000.
    With ``checkpoint=PATH`` (any format) or ``pretrained=True`` (official release; or a tag such as
    ``"dist_300e_in1k"``), the model takes the form the file holds (train/deploy, one or two heads,
    number of classes); then
      - ``num_classes=N`` different from the file: a fresh head, everything else loaded (fine-tuning);
      - ``deploy=True`` with a train-form file: loaded, then fused with ``reparameterize``;
      - ``deploy=False`` with a deploy-form file: an error (fused weights cannot be un-fused).
    ``kwargs``: ``drop_rate``, ``drop_path_rate``.
    """
    name = canonical_name(name)  # unknown names raise here, listing the variants
    if num_classes is not None:
        _check_num_classes(num_classes)  # before any download or read: a negative count never builds a head
    source = checkpoint
    downloaded = False
    if pretrained and checkpoint is None:
        source, downloaded = download_weights(get_weights(name, pretrained)), True
    if source is None:
        return build_model(
            name, deploy=bool(deploy), distillation=bool(distillation),
            num_classes=1000 if num_classes is None else num_classes,
            in_chans=3 if in_chans is None else in_chans,
            features_only=features_only, out_indices=out_indices, **kwargs,
        )

    try:
        ck = read_checkpoint(source, use_ema=use_ema)
    except CorruptCheckpointError as e:
        if not downloaded:
            raise
        # the cached download is unreadable (a truncated first download, ...): it is not deleted automatically,
        # because its digest was recorded as trusted at first use; say which file to remove
        raise CorruptCheckpointError(
            f"the cached pretrained weights at {source} cannot be read: {e} Delete {source} and "
            f"{sidecar_path(source)}, then call create_model(..., pretrained=True) again to download them afresh."
        ) from e
    info = ck.info
    if deploy is False and info.form == "deploy":
        raise CheckpointMismatchError(
            f"{source} holds fused (deploy-form) weights; they cannot be un-fused, so deploy=False is impossible. "
            "Drop deploy=False, or use a train-form checkpoint."
        )
    if distillation and info.form == "deploy":
        raise CheckpointMismatchError(
            f"{source} holds fused (deploy-form) weights with one Linear head; distillation=True needs the train "
            "form. Drop distillation=True, or use a train-form checkpoint."
        )
    model = build_model(
        name, deploy=info.form == "deploy", distillation=info.distillation, num_classes=info.num_classes,
        in_chans=info.in_chans if in_chans is None else in_chans, **kwargs,
    )
    _check_variant(ck, model)
    _load_into(model, ck.state_dict, ck, strict=True)
    if "preprocessing" in ck.metadata:
        model.preprocessing = ck.metadata["preprocessing"]
    want_classes = info.num_classes if num_classes is None else num_classes
    want_dist = info.distillation if distillation is None else distillation
    if info.form == "deploy" and (want_classes != info.num_classes):
        model.reset_classifier(want_classes)
    elif info.form == "train":
        _retarget_head(model, want_classes, want_dist)
    if deploy and info.form == "train":
        preprocessing = model.preprocessing
        model = reparameterize(model)
        model.preprocessing = preprocessing
    if features_only:
        return RepViTFeatures(model, out_indices)
    return model


def model_from_checkpoint(path: str | os.PathLike, **kwargs: Any) -> RepViT | RepViTFeatures:
    """``create_model`` for a file whose variant is read from the file itself (metadata or shapes)."""
    return create_model(read_checkpoint(path, use_ema=kwargs.get("use_ema")).variant, checkpoint=path, **kwargs)


def save_checkpoint(
    model: RepViT, path: str | os.PathLike, *, format: str = "repvit",
    preprocessing: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s weights atomically.

    ``format="repvit"`` (default): safetensors + metadata (variant, form, num_classes, in_chans,
    distillation, preprocessing). ``"timm"``: a timm state dict (safetensors with the variant and preprocessing
    in its metadata, or a pickle without them if the path ends in .pth/.pt/.bin). ``"official"``: the THU-MIG layout in a ``{"model": state_dict}`` pickle.
    """
    if not isinstance(model, RepViT):
        raise TypeError(f"save_checkpoint expects a RepViT model, got {type(model).__name__}")
    sd = model.state_dict()
    if format == "repvit":
        if Path(path).suffix.lower() in PICKLE_SUFFIXES:
            # a pickle carries no metadata: the variant, form and preprocessing would be lost silently
            raise ValueError(f"format 'repvit' is written as safetensors (it carries the variant, form and "
                             f"preprocessing); name the output *.safetensors instead of {Path(path).name}, "
                             "or choose format 'timm' or 'official' for a .pth file")
        meta = {
            "format": "repvit", "format_version": FORMAT_VERSION, "variant": model.variant,
            "form": _model_form(model), "num_classes": model.num_classes, "in_chans": model.in_chans,
            "distillation": model.distillation,
            "preprocessing": preprocessing or model.preprocessing,
            **(metadata or {}),
        }
        write_state_dict(sd, path, metadata=meta)
    elif format == "timm":
        # timm reads only the tensors; a safetensors file also keeps the variant and preprocessing in its metadata
        # (next to the "format": "pt" of the hub's files), so a round trip through timm's layout loses neither
        write_state_dict(layouts.ours_to_timm(sd), path, metadata={
            "format": "pt", "variant": model.variant, "preprocessing": preprocessing or model.preprocessing})
    elif format == "official":
        if Path(path).suffix.lower() == ".safetensors":
            # the official layout is a {"model": ...} pickle, which a .safetensors name would misdescribe
            raise ValueError(f"format 'official' is a PyTorch pickle ({{'model': state_dict}}, as the THU-MIG "
                             f"releases); name the output *.pth instead of {Path(path).name}, or choose format "
                             "'timm' or 'repvit' for safetensors")
        write_state_dict(layouts.ours_to_official(sd), path, torch_container="model")
    else:
        raise ValueError(f"unknown checkpoint format {format!r}; choose repvit, timm or official")


__all__ += ["CheckpointFormatError"]
