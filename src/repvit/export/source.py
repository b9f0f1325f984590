"""Turn what the user names (a checkpoint file or a variant name) into a fused deploy model."""

from __future__ import annotations

import os
from pathlib import Path

from ..models.registry import canonical_name, get_spec
from ..models.repvit import RepViT
from ..reparam import reparameterize

__all__ = ["load_source", "to_deploy"]


def to_deploy(model: RepViT) -> RepViT:
    """Fused, eval-mode copy of ``model`` that keeps its preprocessing and variant name.

    Every exporter calls this, so a train-form model (BatchNorm, branches, two heads) is never exported.
    """
    if not isinstance(model, RepViT):
        raise ValueError(f"expected a RepViT classifier model, got {type(model).__name__}; "
                         "features-only backbones are not exported by this module")
    fused = reparameterize(model).float().cpu()  # exporters trace with CPU example inputs
    for attr in ("preprocessing", "variant", "_export_source", "_export_source_form", "_export_weights"):
        if hasattr(model, attr):
            setattr(fused, attr, getattr(model, attr))
    if getattr(fused, "_export_source_form", None) is None:
        fused._export_source_form = "deploy" if getattr(model, "deploy", False) else "train"
    return fused


def is_checkpoint_path(source: str | os.PathLike) -> bool:
    """Whether SOURCE names an existing checkpoint file (rather than a variant name)."""
    return Path(str(source)).expanduser().is_file()


def _looks_like_path(source: str) -> bool:
    return os.sep in source or "/" in source or Path(source).suffix in (
        ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


def load_source(
    source: str | os.PathLike, *, model: str | None = None, use_ema: bool | None = None,
    num_classes: int | None = None, in_chans: int | None = None,
) -> RepViT:
    """Load ``source`` and return the fused deploy model (eval mode).

    ``source``: a checkpoint file in any supported format (train or deploy form), or a variant
    name (random weights; for latency work). ``model`` names the variant when the file cannot
    say (official/timm files of variants sharing widths and depths); if given and the file holds
    another variant, a clear ``ValueError`` is raised. ``num_classes``/``in_chans`` apply to
    variant names only (a checkpoint brings its own; giving them with a checkpoint is a ``ValueError``).
    """
    from ..weights.api import create_model
    from ..weights.io import read_checkpoint

    src = str(source)
    path = Path(src).expanduser()
    if path.is_file():
        if num_classes is not None or in_chans is not None:
            raise ValueError(f"num_classes/in_chans (--num-classes/--in-chans) apply to a variant name only; the "
                             f"checkpoint {src} brings its own classifier size and input channels")
        ck = read_checkpoint(path, use_ema=use_ema)
        named = ck.metadata.get("variant")
        if model and named and canonical_name(model) != canonical_name(named):
            # same widths and depths (e.g. M0.9 and legacy M1) load either way; the label would be wrong
            raise ValueError(f"{src} holds {named} (its metadata says so) but --model says {model}; drop --model")
        variant = model or ck.variant
        m = create_model(canonical_name(variant), checkpoint=path, use_ema=use_ema)
        m._export_source = path.name
        m._export_source_form = ck.info.form
        # a training checkpoint's EMA copy; else what the file records (a run's best file: the raw or EMA weights of
        # its best epoch); else its only (raw) weights
        best = ck.metadata.get("train_best")
        m._export_weights = "ema" if ck.used_ema else (best.get("source") if isinstance(best, dict) else None) or "raw"
    elif path.is_dir():
        raise ValueError(f"{src} is a directory; pass a checkpoint file inside it (e.g. {src}/best.safetensors) "
                         "or a variant name")
    elif _looks_like_path(src):
        raise FileNotFoundError(f"checkpoint not found: {src} (SOURCE is a checkpoint file or a variant name "
                                "such as repvit_m0_9)")
    else:
        if model and canonical_name(model) != canonical_name(src):
            raise ValueError(f"SOURCE names variant {src} but --model says {model}; give only one")
        if use_ema:
            raise ValueError(f"--ema selects the EMA weights of a training checkpoint; {src} is a variant name "
                             "(random weights): drop --ema or pass a checkpoint")
        get_spec(src)  # unknown name -> ValueError listing the variants
        m = create_model(canonical_name(src), num_classes=1000 if num_classes is None else num_classes,
                         in_chans=3 if in_chans is None else in_chans)
        m._export_source = f"{canonical_name(src)} (random init)"
        m._export_weights = "random"
        m._export_source_form = "train"
    return to_deploy(m)
