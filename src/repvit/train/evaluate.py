"""Top-1/top-5 evaluation: a loop usable during training (DDP-aware) and checkpoint evaluation for ``repvit eval``."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from repvit.data import CROP_PCT, build_data, builtin_name, check_channels, shard_range, skip_none_collate

from .dist import all_reduce_sum

__all__ = ["evaluate", "evaluate_checkpoint", "autocast_ctx", "resolve_amp", "model_in_chans", "TTA_MODES"]

# test-time augmentation: none, or the horizontal mirror (the training flip) averaged in
TTA_MODES = ("none", "flip")


def resolve_amp(amp: str, device: torch.device, log: Callable[[str], None] | None = None,
                native_bf16: bool | None = None) -> str:
    """The autocast mode actually used for ``amp`` in {"none", "bf16", "fp16"} on ``device``.

    On CPU fp16 means bf16 - where the CPU computes bf16 natively; without AVX512-BF16/AMX bf16 is emulated (0.04x
    the float32 speed measured on an AVX2 EPYC, docs/training.md), so fp16 falls back to float32 there and an explicit
    bf16 is kept but warned about. GPUs keep what was asked."""
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be one of none, bf16, fp16; got {amp!r}")
    if device.type != "cpu" or amp == "none":
        return amp
    log = log or (lambda msg: None)
    if native_bf16 is None:
        from repvit.bench.machine import native_bf16 as probe
        native_bf16 = probe()
    if amp == "fp16":
        if native_bf16:
            log("note: fp16 autocast is not useful on CPU; using bf16 instead (set run.amp=none for float32)")
            return "bf16"
        log("note: fp16 autocast is not useful on CPU and this CPU has no native bf16 (AVX512-BF16/AMX), where "
            "bf16 is emulated and many times slower; using float32 (set run.amp=none to silence this)")
        return "none"
    if not native_bf16:
        log("warning: run.amp=bf16 on a CPU without native bf16 (AVX512-BF16/AMX): bf16 is emulated and many "
            "times slower than float32 here; set run.amp=none")
    return amp


def autocast_ctx(device: torch.device, amp: str):
    """Autocast for an already-resolved ``amp`` (see :func:`resolve_amp`): exactly the dtype named, no remapping."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp must be one of none, bf16, fp16; got {amp!r}")
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, device: torch.device, batch_size: int = 256, amp: str = "none",
             channels_last: bool = False, num_workers: int = 0, world_size: int = 1, rank: int = 0,
             collate=skip_none_collate, tta: str = "none") -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean CE loss over ``dataset``; each rank takes a shard, counts are summed.

    ``amp`` is resolved with :func:`resolve_amp` (on a CPU without native bf16, fp16 evaluates in float32).
    ``tta="flip"`` averages the class probabilities of each image and its horizontal mirror (2x the compute);
    the loss is then the NLL of the averaged probabilities."""
    _check_tta(tta)
    amp = resolve_amp(amp, device)
    was_training = model.training
    model.eval()
    shard = Subset(dataset, list(shard_range(len(dataset), world_size, rank)))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    sums = torch.zeros(5, dtype=torch.float64)   # correct1, correct5, loss_sum, n, skipped
    for batch in loader:
        x, y, skipped = batch[0], batch[1], batch[-1]
        sums[4] += skipped
        if len(y) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        views = (x, x.flip(-1)) if tta == "flip" else (x,)
        logp = torch.stack([_logits(model, v, device, amp).log_softmax(1) for v in views])
        # mean of probabilities, kept in log space: log(mean_v p_v) = logsumexp_v(log p_v) - log(V)
        out = logp.logsumexp(0) - math.log(len(views))
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        sums[0] += hit[:, :1].sum().item()
        sums[1] += hit.any(dim=1).sum().item()
        sums[2] += nn.functional.nll_loss(out, y, reduction="sum").item()
        sums[3] += len(y)
    sums = all_reduce_sum(sums.to(device)).cpu() if world_size > 1 else sums
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"top1": 100.0 * sums[0].item() / n, "top5": 100.0 * sums[1].item() / n,
            "loss": sums[2].item() / n, "n": int(sums[3].item()), "skipped": int(sums[4].item())}


def _check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")


def _logits(model: nn.Module, x: torch.Tensor, device: torch.device, amp: str) -> torch.Tensor:
    with autocast_ctx(device, amp):
        out = model(x)
    # a distilled model in eval mode may return (cls, dist) from a custom forward: average the heads as DeiT does
    out = (out[0] + out[1]) / 2 if isinstance(out, (tuple, list)) else out
    return out.float()


def _models_from_train_state(path: Path) -> tuple[list[tuple[str, nn.Module]], dict]:
    from .builder import build_student
    from .checkpoint import load_train_state
    from .config import config_from_dict

    state = load_train_state(path)
    cfg = config_from_dict(state["config"])
    meta = state.get("data_info") or {}
    if "num_classes" not in meta or "in_chans" not in meta:
        raise ValueError(f"{path} is a training state without its data_info (class count, input channels); "
                         "evaluate the run's best.safetensors / deploy.safetensors instead")
    num_classes, in_chans = int(meta["num_classes"]), int(meta["in_chans"])
    cfg.model.pretrained = None
    out = []
    for key in ("model", "ema"):
        if state.get(key) is not None:
            m = build_student(cfg, num_classes, in_chans)
            m.load_state_dict(state[key])
            m.preprocessing = meta.get("preprocessing")
            out.append(("raw" if key == "model" else "ema", m))
    return out, {"config": cfg}


def _load_for_eval(p: Path) -> tuple[list[tuple[str, nn.Module]], Any]:
    """The models a checkpoint holds: ("raw", "ema") for a run's last.pt / run dir, ("weights",) otherwise; and
    the run's config (a TrainConfig) for a run's checkpoint, else None."""
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} not found")
    if p.is_dir() and not (p / "last.pt").is_file():
        raise FileNotFoundError(f"{p} is a directory without a last.pt; pass a checkpoint file (e.g. "
                                f"{p}/best.safetensors) or a run directory")
    if p.is_dir() or p.suffix == ".pt" and _is_train_state(p):
        models, extra = _models_from_train_state(p)
        return models, extra["config"]
    from .builder import model_from_file
    return [("weights", model_from_file(str(p)))], None


def load_eval_model(p: Path) -> tuple[str, nn.Module, Any]:
    """The one model a checkpoint stands for: a run's EMA weights when it holds them (last.pt, a run directory),
    else its raw ones, else the file's weights; with the weights' name and the run config (or None). The same
    choice for ``repvit eval A,B`` members and ``distill.teacher=A,B`` teachers."""
    loaded, cfg = _load_for_eval(p)
    models = dict(loaded)
    key = "ema" if "ema" in models else next(iter(models))
    return key, models[key], cfg


def _ensemble_members(paths: list[Path]) -> tuple[list[tuple[str, nn.Module]], list[Any]]:
    """One model per checkpoint (its EMA weights when it holds them), all with the same input preprocessing:
    an ensemble averages predictions on one input tensor, so members trained on different inputs cannot share it.
    Also the members' run configs (None for plain weights files)."""
    members, configs = [], []
    for p in paths:
        key, model, cfg = load_eval_model(p)
        members.append((f"{p}" + (f" ({key})" if key != "weights" else ""), model))
        configs.append(cfg)
    ref_name, ref = members[0]
    ref_pre = getattr(ref, "preprocessing", None) or {}
    for name, m in members[1:]:
        pre = getattr(m, "preprocessing", None) or {}
        # the input tensor is built once, with member 0's preprocessing: resize/crop too, not only size and scaling
        for k in ("input_size", "mean", "std", "interpolation", "crop_pct"):
            a, b = pre.get(k), ref_pre.get(k)
            if a is not None and b is not None and _as_list(a) != _as_list(b):
                raise ValueError(f"ensemble member {name} was trained with {k} {a} but {ref_name} with {b}: "
                                 "members must share the input preprocessing (input size, mean, std, "
                                 "interpolation, crop): one input tensor, built with the first member's, feeds "
                                 "them all")
    return members, configs


def _as_list(v: Any) -> list:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else [v]


def model_in_chans(model: nn.Module) -> int | None:
    """The input channel count a model expects (RepViT's ``in_chans``, else its preprocessing), None if unknown."""
    chans = getattr(model, "in_chans", None)
    if chans is None:
        size = (getattr(model, "preprocessing", None) or {}).get("input_size")
        chans = size[0] if size else None
    return int(chans) if chans is not None else None


def _recorded_crop(pre: dict) -> str | None:
    """The eval_crop name ("official"/"timm") of a checkpoint's recorded crop_pct, None when it records another."""
    crop = pre.get("crop_pct")
    return next((k for k, v in CROP_PCT.items() if crop is not None and abs(float(crop) - v) < 1e-6), None)


def evaluate_checkpoint(checkpoint: str, data: str, *, form: str = "train", eval_crop: str | None = None,
                        batch_size: int = 128, device: str = "auto", img_size: int | None = None,
                        num_workers: int = 4, max_samples: int | None = None, data_format: str = "auto",
                        split: str = "val", tta: str = "none", download_dir: str | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (our .safetensors, any format repvit reads, or a run's last.pt / run dir).

    Returns ``{"top1", "top5", "results": [{"weights", "form", "top1", "top5", ...}], ...}``; the
    top-level numbers are those of the EMA weights when the checkpoint holds them, else the raw ones.

    A comma-separated list ``a.pt,b.safetensors`` evaluates an ensemble: each member (its EMA weights when it has
    them) and the mean of the members' probabilities (what ``distill.teacher=a,b`` teaches); the top-level numbers
    are the ensemble's.

    ``download_dir``: the folder of the Fashion-MNIST IDX files (or the Hugging Face datasets cache); default: the
    run config's ``data.download_dir`` for a run's checkpoint, else the Debian path. A missing Fashion-MNIST is an
    error here (training's digits stand-in would report another dataset's accuracy). The result's ``data`` and
    ``notes`` say what was evaluated.
    """
    from repvit.reparam import reparameterize

    from .config import AugConfig, DataConfig
    from .distill import TeacherEnsemble, split_comma_list

    if form not in ("train", "deploy"):
        raise ValueError(f"--form must be train or deploy, got {form!r}")
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"--max-samples must be >= 0 (0 or unset: all images), got {max_samples}")
    _check_tta(tta)     # before any data is read
    paths = [Path(s) for s in split_comma_list(checkpoint, "checkpoint list")]
    if len(paths) == 1:
        models, cfg = _load_for_eval(paths[0])
        configs = [cfg]
    else:
        models, configs = _ensemble_members(paths)
    if download_dir is None:     # a run's checkpoint: where that run read its data from
        download_dir = next((c.data.download_dir for c in configs if c is not None and c.data.download_dir), None)
    try:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device name ({e}); use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no CUDA device is available here; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    if img_size is not None and img_size < 1:
        raise ValueError(f"--img-size must be a positive number of pixels, got {img_size}")
    pre = getattr(models[0][1], "preprocessing", None) or {}
    size = img_size or (pre.get("input_size") or [3, 224, 224])[-1]
    recorded = _recorded_crop(pre)
    notes_crop = []
    if eval_crop is None:       # the crop the model was validated with during training, like size and mean/std
        eval_crop = recorded or "official"
    elif recorded is not None and recorded != eval_crop:
        notes_crop.append(f"note: --preprocessing {eval_crop} overrides the checkpoint's recorded crop ({recorded}, "
                          f"crop_pct {pre.get('crop_pct')})")
    dcfg = DataConfig(dataset=data, format=data_format, img_size=size, eval_crop=eval_crop, val_split=split,
                      num_workers=num_workers, max_val_samples=max_samples,
                      mean=tuple(pre["mean"]) if pre.get("mean") else None,
                      std=tuple(pre["std"]) if pre.get("std") else None,
                      interpolation=pre.get("interpolation", "bicubic"), download_dir=download_dir)
    try:
        bundle = build_data(dcfg, AugConfig(), train=False, fallback=False)
    except FileNotFoundError as e:
        if builtin_name(data) == "fashion-mnist" and not Path(data).exists():
            raise FileNotFoundError(f"cannot evaluate on Fashion-MNIST: {e} (repvit eval --download-dir DIR; "
                                    "evaluation never substitutes another dataset)") from e
        raise
    workers = 0 if bundle.train is None and bundle.name in ("fashion-mnist", "digits") else num_workers
    results, fused = [], []
    for name, model in models:
        who = f"ensemble member {name}" if len(paths) > 1 else "the checkpoint"
        chans = model_in_chans(model)
        check_channels(chans, bundle.in_chans, who=who, data_name=bundle.name, fix=(
            "the built-in datasets are grayscale; evaluate a checkpoint trained on them, or pass a dataset path "
            "with RGB images" if bundle.in_chans == 1 else
            f"evaluate it on data like it was trained on{' (a built-in such as fashion-mnist)' if chans == 1 else ''}"
            f", or train or fine-tune a {bundle.in_chans}-channel model on this data (repvit train --data ...)"))
        n_model = getattr(model, "num_classes", bundle.num_classes)
        # integer labels without a declared class count (wds, hfds) count only the classes present: a split
        # lacking the highest class fits a model with more outputs; any declared count must match
        if n_model != bundle.num_classes and not (bundle.classes_inferred and n_model > bundle.num_classes):
            raise ValueError(f"{who} predicts {model.num_classes} classes but {data} has "
                             f"{bundle.num_classes}")
        m = reparameterize(model) if form == "deploy" and not getattr(model, "deploy", False) else model
        fused.append(m.to(dev))
        r = evaluate(m, bundle.val, device=dev, batch_size=batch_size, tta=tta, num_workers=workers)
        results.append({"weights": name, "form": "deploy" if getattr(m, "deploy", False) or form == "deploy" else "train",
                        **r})
    if len(paths) > 1:
        r = evaluate(TeacherEnsemble(fused), bundle.val, device=dev, batch_size=batch_size, tta=tta,
                     num_workers=workers)
        results.append({"weights": "ensemble", "form": results[0]["form"], "members": len(fused), **r})
    main = next((r for r in results if r["weights"] == "ensemble"), None) or \
        next((r for r in results if r["weights"] == "ema"), results[0])
    return {"checkpoint": checkpoint if len(paths) > 1 else str(paths[0]), "data": bundle.name,
            "notes": list(bundle.notes) + notes_crop,
            "eval_crop": eval_crop, "img_size": size, "tta": tta,
            "top1": main["top1"], "top5": main["top5"], "n": main["n"], "results": results}


def _is_train_state(p: Path) -> bool:
    # our resumable checkpoints are zip-format torch files with a 'config' entry; others go to create_model
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001
        return False
    return isinstance(state, dict) and "config" in state and "micro" in state
