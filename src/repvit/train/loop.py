"""The training loop: one process or DDP (torchrun), accumulation, AMP, EMA, AGC, exact resume.

Order inside one optimizer update (``accum_steps`` micro-batches):
forward/backward each micro-batch (DDP gradient sync only on the last), stop on a non-finite
loss before anything is stepped, unscale (fp16), clip (AGC by default), optimizer step, EMA
update, scheduler update.

Unreadable images (dropped by the collate function, counted as ``skipped_images``) can leave a micro-batch short
or empty (a single left-over sample is dropped too: BatchNorm cannot train on one; counted as ``dropped_images``). The
gradient of an update is the mean over the samples that were actually read, on all ranks and
micro-batches together (the same value as before when nothing is dropped). In DDP every rank takes
part in every collective: the real-sample counts of each micro-step are all-reduced before its
forward, and when some rank has nothing, the ranks that have data run the plain module (no DDP hooks)
and every rank averages the gradients by hand at the update. An update without a single readable
sample on any rank skips the optimizer step on all ranks together (the schedule, EMA and update
counter still advance, so ranks and resume positions stay in lockstep). Checkpoints are written atomically at epoch ends (and every
``run.checkpoint_every_steps`` updates), so a run killed at any moment resumes from the last
one and ends with the same weights as an uninterrupted run (CPU, same seed, any number of loader workers:
augmentations are seeded per sample position, see :mod:`repvit.data.sampler`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import repvit
from repvit.data import (DataBundle, GlobalBatchSampler, build_data, builtin_name, check_channels, preserved_rng,
                         seed_sample)
from repvit.reparam import reparameterize

from ..utils.files import atomic_write_json, atomic_write_text
from .builder import build_student
from .checkpoint import (
    atomic_torch_save,
    capture_rng,
    load_train_state,
    restore_rng,
    rotate,
)
from .config import TrainConfig, check_resume_overrides, config_from_dict, config_to_dict, dump_yaml
from .dist import (DistInfo, all_reduce_sum, any_rank, average_gradients, broadcast_tensors, cleanup,
                   init_distributed, main_rank_first)
from .distill import (
    CachedTeacherTargets,
    DistillationLoss,
    build_teacher,
    precompute_teacher_logits,
    split_comma_list,
    teacher_input_mismatch,
)
from .evaluate import autocast_ctx, evaluate, model_in_chans, resolve_amp

__all__ = ["train", "NonFiniteLossError", "TrainResult", "build_optimization"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped without touching the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    best_top1: float
    best_source: str
    best_epoch: int
    deploy_top1: float | None
    epochs: int
    wall_s: float
    summary: dict


class _Indexed(torch.utils.data.Dataset):
    """Adds the sample index to each item (for cached teacher logits); keeps ``None`` for skipped images.

    Keys are ``(index, seed)`` from the sampler (``sample_seeds=True``): each sample's augmentation is drawn
    from its own seed, so a resume, the worker count or the world size cannot change what a sample sees.
    The DataLoader fetches whole batches through ``__getitems__``: the global streams are saved once per batch."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def _get(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            i, seed = key
            seed_sample(seed)
        else:
            i = key
        item = self.ds[i]
        return None if item is None else (*item, i)

    def __getitem__(self, key: int | tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        # without seeds, draw from the streams as they are (restoring them would repeat the same draws)
        seeded = any(isinstance(k, tuple) for k in keys)
        with preserved_rng() if seeded else contextlib.nullcontext():
            return [self._get(k) for k in keys]


def _teacher_cache_key(cfg: TrainConfig, train_set: Any) -> str:
    """What the cached teacher logits depend on: the teacher, and which images in which order and preprocessing
    (a subset drawn with another seed has the same size but other images)."""
    indices = getattr(train_set, "indices", None)

    def stamp(name: str | None) -> Any:        # a teacher file rewritten in place (a run that kept training)
        p = Path(name) / "last.pt" if name and Path(name).is_dir() else Path(name) if name else None
        return [p.stat().st_size, p.stat().st_mtime_ns] if p is not None and p.is_file() else None
    teachers = split_comma_list(cfg.distill.teacher, "distill.teacher")
    what = {"teacher": cfg.distill.teacher, "teacher_checkpoint": cfg.distill.teacher_checkpoint,
            "teacher_files": [stamp(t) for t in teachers] + [stamp(cfg.distill.teacher_checkpoint)],
            "dataset": str(cfg.data.dataset), "format": cfg.data.format, "split": cfg.data.train_split,
            "img_size": cfg.data.img_size, "eval_crop": cfg.data.eval_crop, "interpolation": cfg.data.interpolation,
            "mean": list(cfg.data.mean or []), "std": list(cfg.data.std or []), "n": len(train_set),
            "indices": hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()
            if indices is not None else None}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _cached_teacher_logits(path: Path, n: int, num_classes: int, key: str,
                           log: Callable[[str], None]) -> torch.Tensor | None:
    """The teacher logits cached at ``path`` when they were computed for ``key`` (:func:`_teacher_cache_key`) and
    fit the training set (``n`` x ``num_classes``), else None.

    They are indexed by sample: a cache of another teacher or training set (a run directory reused after a run
    that died before its first checkpoint, another data.max_train_samples or seed) would hand each image other
    targets, so it is recomputed."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable cache is recomputed, like a stale one
        log(f"note: cannot read {path} ({e}); recomputing the teacher logits")
        return None
    cached = saved.get("logits") if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or saved.get("key") != key:
        log(f"note: {path} was computed for another teacher or training set (or by an older version); "
            "recomputing the teacher logits")
        return None
    if not isinstance(cached, torch.Tensor) or tuple(cached.shape) != (n, num_classes):
        what = f"shape {tuple(cached.shape)}" if isinstance(cached, torch.Tensor) else type(cached).__name__
        log(f"note: {path} holds teacher logits of {what}, but the training set has {n} images of {num_classes} "
            "classes; recomputing them")
        return None
    return cached


def _check_pretrained_channels(source: str, bundle: DataBundle) -> None:
    """Raise a clear error when the fine-tuning checkpoint was trained on images with another channel count."""
    from repvit.weights import read_checkpoint
    try:
        chans = read_checkpoint(source).info.in_chans
    except Exception:  # noqa: BLE001 - unreadable: the original error says why
        return
    check_channels(chans, bundle.in_chans, who=f"model.pretrained {source}", data_name=bundle.name,
                   fix=f"its input layer cannot take these images; fine-tune from weights trained on "
                       f"{bundle.in_chans}-channel images, or train from scratch (model.pretrained=null)")


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _eval_view(ds, bundle: DataBundle, cfg: TrainConfig):
    """The training set with the evaluation transform (for teacher logit caching)."""
    from torch.utils.data import Subset

    from repvit.data.transforms import eval_transform
    base, indices = (ds.dataset, ds.indices) if isinstance(ds, Subset) else (ds, None)
    view = copy.copy(base)
    if hasattr(view, "eraser"):                          # built-in tensor dataset
        view.train, view.eraser = False, None
    else:
        view.transform = eval_transform(cfg.data.img_size, eval_crop=cfg.data.eval_crop,
                                        interpolation=cfg.data.interpolation, mean=bundle.mean, std=bundle.std)
    return Subset(view, indices) if indices is not None else view


def _make_logger(run_dir: Path | None, main: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if not main:
            return
        print(msg, flush=True)
        if run_dir is not None:
            with open(run_dir / "train.log", "a") as f:
                f.write(msg + "\n")
    return log


def _truncate_metrics(path: Path, before_epoch: int) -> None:
    """On resume, drop metric lines of epochs the checkpoint does not include (they are redone)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["epoch"] < before_epoch:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            continue  # blank, or torn by a kill mid-append: never a reason to refuse the resume
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _mix(mixup, x: torch.Tensor, y: torch.Tensor, num_classes: int, smoothing: float,
         extra: torch.Tensor | None = None):
    """timm Mixup/CutMix on a batch; also mixes per-sample teacher targets with the same lambda."""
    from timm.data.mixup import mixup_target
    lam = mixup._mix_batch(x)   # batch mode (official recipe): one lambda, partner = reversed batch
    y = mixup_target(y, num_classes, lam, smoothing)
    if extra is not None:
        extra = extra * lam + extra.flip(0) * (1.0 - lam)
    return x, y, extra


def _build_loss(cfg: TrainConfig, mixup_on: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_on:
        base: nn.Module = SoftTargetCrossEntropy()          # targets already smoothed by mixup_target
    elif cfg.aug.smoothing > 0:
        base = LabelSmoothingCrossEntropy(cfg.aug.smoothing)
    else:
        base = nn.CrossEntropyLoss()
    return DistillationLoss(base, cfg.distill.kind, cfg.distill.alpha, cfg.distill.tau)


def build_optimization(cfg: TrainConfig, model: nn.Module, *, world_size: int, updates_per_epoch: int):
    """AdamW (no decay on norms/biases) + cosine schedule with linear warmup (timm), per update or per epoch."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    # timm's weight-decay filter skips 1-D parameters: every norm weight and bias (official recipe)
    optimizer = create_optimizer_v2(model, opt=cfg.optim.opt, lr=cfg.lr(world_size),
                                    weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps,
                                    betas=tuple(cfg.optim.betas))
    # step_per=update: stepped every update (t_in_epochs=False), so short runs warm up smoothly. step_per=epoch:
    # the official loop's staircase, set at each epoch's start in train() (step_update is then a no-op)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.schedule.sched, num_epochs=cfg.schedule.epochs,
                                       warmup_epochs=cfg.schedule.warmup_epochs, warmup_lr=cfg.schedule.warmup_lr,
                                       min_lr=cfg.schedule.min_lr, step_on_epochs=cfg.schedule.step_per == "epoch",
                                       updates_per_epoch=updates_per_epoch)
    return optimizer, scheduler


def train(cfg: TrainConfig, out_dir: str | os.PathLike | None = None, *, resume: str | os.PathLike | None = None,
          log_fn: Callable[[str], None] | None = None, overrides: list[str] | None = None) -> TrainResult:
    """Train as ``cfg`` says, writing the run to ``out_dir`` (or continuing ``resume``).

    ``overrides`` (``key=value``, only with ``resume``) change keys of RESUME_OVERRIDABLE in the saved config;
    the change is logged, and recorded in config.yaml and in the following checkpoints."""
    t_start = time.perf_counter()
    state = None
    changes: list[str] = []
    resumed_from = None
    if overrides and resume is None:
        raise ValueError("train(overrides=...) is for resume; apply --set values to cfg for a new run")
    if resume is not None:
        overrides = check_resume_overrides(overrides)       # before loading: a wrong key fails fast
        resumed_from = Path(resume) / "last.pt" if Path(resume).is_dir() else Path(resume)
        state = load_train_state(resume)
        cfg = config_from_dict(state["config"])
        if overrides:
            from .config import apply_overrides
            old = config_to_dict(cfg)
            cfg = apply_overrides(cfg, overrides)
            new = config_to_dict(cfg)
            for item in overrides:
                sec, key = item.split("=", 1)[0].strip().split(".")
                changes.append(f"{sec}.{key}={new[sec][key]!r} (was {old[sec][key]!r})")
        out_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
    if out_dir is None:
        raise ValueError("train() needs out_dir (or resume)")
    run_dir = Path(out_dir)
    di = init_distributed(cfg.run.device)
    try:
        # the batch layout first of all: a launch whose process count does not divide the global batch (e.g. 2x8
        # processes for a recipe made for 8) fails now, not after the dataset is read and the teacher downloaded
        _check_batch_layout(cfg, state, di.world_size)
        return _train(cfg, run_dir, state, di, log_fn, t_start, resumed_from=resumed_from, changes=changes)
    finally:
        cleanup()


def _check_batch_layout(cfg: TrainConfig, state: dict | None, world: int) -> None:
    """Raise the ValueError of ``cfg.accum_steps`` if ``world`` processes cannot fill the global batch (on resume of
    a run without run.global_batch: the saved run's batch_size x world, as the loop uses below)."""
    if state is not None and cfg.run.global_batch is None:
        saved = dataclasses.replace(cfg.run, global_batch=cfg.run.batch_size * int(state.get("world_size", world)))
        dataclasses.replace(cfg, run=saved).accum_steps(world)
    else:
        cfg.accum_steps(world)


def _train(cfg: TrainConfig, run_dir: Path, state: dict | None, di: DistInfo, log_fn, t_start: float, *,
           resumed_from: Path | None = None, changes: list[str] | None = None) -> TrainResult:
    if di.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # a run killed mid-save leaves its checkpoint-sized temp file behind (atomic_write's .NAME.*.tmp); one
        # writer per run directory, so any such file now is a leftover
        for tmp in run_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    log = log_fn or _make_logger(run_dir, di.is_main)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = di.device
    if device.type == "cuda":
        # fixed input shapes: let cuDNN pick the fastest kernels once (as DeiT and timm do); the choice is not
        # bit-reproducible across runs, which the fixed seed never promised on a GPU
        torch.backends.cudnn.benchmark = True
    _seed_all(cfg.run.seed + di.rank)

    if state is None and builtin_name(cfg.data.dataset) is None and Path(cfg.data.dataset).exists():
        # saved absolute, so --resume works from any working directory (it takes no --data)
        cfg.data.dataset = str(Path(cfg.data.dataset).resolve())
    if state is None and cfg.data.download_dir and Path(cfg.data.download_dir).exists():
        # likewise the built-ins' data folder: `repvit eval RUN/last.pt` reads it from the saved config
        cfg.data.download_dir = str(Path(cfg.data.download_dir).resolve())
    # ---- data first: a wrong path or layout fails before anything expensive happens
    bundle = build_data(cfg.data, cfg.aug, train=True, seed=cfg.run.seed, num_classes=cfg.model.num_classes)
    for note in bundle.notes:
        log(note)
    num_classes = cfg.model.num_classes or bundle.num_classes
    in_chans = cfg.model.in_chans or bundle.in_chans
    check_channels(in_chans, bundle.in_chans, who=f"the model (model.in_chans={in_chans})", data_name=bundle.name,
                   fix="drop model.in_chans (it defaults to the data's channel count)")
    if di.is_main and (state is None or changes):
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    if changes:
        log(f"resume overrides: {'; '.join(changes)}")

    # ---- model, teacher, EMA
    # on resume the weights come from last.pt: the fine-tune source need not exist any more
    try:
        with main_rank_first(di):        # model.pretrained may be a download: once, into the shared cache
            model = build_student(_no_pretrained(cfg) if state is not None else cfg, num_classes, in_chans)
    except ValueError:
        if state is None and cfg.model.pretrained:
            _check_pretrained_channels(cfg.model.pretrained, bundle)     # a clearer message when that is the cause
        raise
    if state is None and cfg.model.pretrained:
        # fine-tuning: the pretrained weights expect their own normalisation; the data's replaces it here
        note = teacher_input_mismatch(model, bundle.preprocessing)
        if note:
            log(f"warning: model.pretrained {cfg.model.pretrained}: {note}; set data.mean/data.std to its values to "
                "keep them")
    model.preprocessing = bundle.preprocessing
    distill = cfg.distill.kind != "none"
    if distill:
        model.set_distilled_training(True)
    model.to(device)
    if cfg.run.sync_bn and di.distributed:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log("note: run.sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel); using per-process BN")
    # SyncBatchNorm runs collectives in its forward (all_gather) and backward (all_reduce): every rank must run
    # the model on every micro-step, or skip it together (see the micro-step loop)
    collective_bn = _has_sync_bn(model)
    if cfg.run.channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model
    ema = None
    if cfg.ema.enabled:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(raw_model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
    teacher = None
    if distill:
        with main_rank_first(di):        # a pretrained teacher is downloaded once, not by every rank at once
            teacher = build_teacher(cfg.distill.teacher, cfg.distill.teacher_checkpoint, num_classes=num_classes,
                                    in_chans=in_chans).to(device)
        if cfg.run.channels_last:
            teacher.to(memory_format=torch.channels_last)
        members = list(getattr(teacher.model, "members", [teacher.model]))   # an ensemble: each member
        for i, m in enumerate(members):
            who = f"the teacher {cfg.distill.teacher!r}" + (f" (member {i})" if len(members) > 1 else "")
            check_channels(model_in_chans(m), bundle.in_chans, who=who, data_name=bundle.name,
                           fix=f"distil from a teacher trained on {bundle.in_chans}-channel images (e.g. a checkpoint "
                               "of a run on this data)")
        note = teacher_input_mismatch(teacher.model, bundle.preprocessing)
        if note:
            log(f"warning: the teacher sees the student's inputs, but {note}; its labels may be poor")

    world = di.world_size
    if state is not None and cfg.run.global_batch is None:
        # "batch_size x world" was the global batch of the saved run: keep it (and so the updates per epoch, the
        # lr and the scheduler's horizon) when resuming with another number of processes
        cfg.run.global_batch = cfg.run.batch_size * int(state.get("world_size", world))
    accum = cfg.accum_steps(world)
    global_batch = cfg.global_batch(world)
    lr = cfg.lr(world)
    sampler = GlobalBatchSampler(len(bundle.train), global_batch, world_size=world, rank=di.rank, accum_steps=accum,
                                 repeats=cfg.aug.repeated_aug, seed=cfg.run.seed, max_steps=cfg.run.max_steps_per_epoch,
                                 sample_seeds=True)
    updates_per_epoch = sampler.steps
    if sampler.micro_batch < 2:
        # BatchNorm cannot normalise one sample in training (the head's BatchNorm1d raises, and the 1x1 maps of
        # the last stage at small inputs too)
        raise ValueError(f"each micro-batch would hold {sampler.micro_batch} image (global batch {global_batch} "
                         f"over {world} process(es) x {accum} accumulation step(s)); BatchNorm needs at least 2 per "
                         "micro-batch: raise run.global_batch or run.batch_size, or use fewer processes")

    optimizer, scheduler = build_optimization(cfg, raw_model, world_size=world, updates_per_epoch=updates_per_epoch)
    amp = resolve_amp(cfg.run.amp, device, log)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" and device.type == "cuda" else None

    # ---- resume
    start_epoch, start_micro, step = 0, 0, 0
    best = {"top1": -1.0, "epoch": -1, "source": "raw"}
    best_fix: tuple[Path | None, str | None] | None = None   # on resume: what _resume_best says to do with best
    resumed_acc: dict | None = None             # the interrupted epoch's accumulators (mid-epoch checkpoints)
    if state is not None:
        raw_model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_micro, step = int(state["epoch"]), int(state["micro"]), int(state["step"])
        old_world = int(state.get("world_size", world))
        if old_world != world:
            # micro-batches are counted per process: convert through whole updates (checkpoints sit on them)
            start_micro = start_micro // cfg.accum_steps(old_world) * accum
            log(f"note: resuming a {old_world}-process run with {world} process(es); the global batch and lr "
                "stay the same, the RNG streams of the interrupted epoch do not")
        # a pure decision on every rank (same file, same record); the main rank acts on it after DDP's
        # construction (below save_best), when every rank has read the file
        best, best_fix = _resume_best(dict(state.get("best", best)), run_dir / "best.safetensors", log,
                                      epoch=start_epoch, micro=int(state["micro"]),
                                      has_ema=ema is not None and state.get("ema") is not None)
        _restore_rank_rng(state["rng"], di.rank, cfg.run.seed, step)
        if world > len(state["rng"]):
            log(f"note: rank(s) {len(state['rng'])}..{world - 1} had no saved RNG state; each is seeded from run.seed, "
                f"its rank and update {step}")
        if start_micro > 0 and state.get("epoch_acc"):
            resumed_acc = _rank_accumulators(state["epoch_acc"], di.rank, same_world=old_world == world)
        if di.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", start_epoch)
        log(f"resumed from {resumed_from or run_dir / 'last.pt'}: epoch {start_epoch + 1}/{cfg.schedule.epochs}, "
            f"micro-batch {start_micro}, after update {step}")
    scheduler.step_update(step)

    if di.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = torch.compile(model) if cfg.run.compile else model

    # ---- distillation targets cached once, if asked
    cached = None
    if distill and cfg.distill.precompute:
        cache = run_dir / "teacher_logits.pt"
        key = _teacher_cache_key(cfg, bundle.train)
        cached = _cached_teacher_logits(cache, len(bundle.train), num_classes, key, log)
        # the ranks compute shards and gather them: all recompute if any one cannot use the cache (a node
        # without the file), or the gather would wait for ranks that never join
        if any_rank(cached is None, di):
            log("precomputing teacher logits on the un-augmented training set ...")
            cached = precompute_teacher_logits(teacher, _eval_view(bundle.train, bundle, cfg),
                                               batch_size=cfg.run.batch_size, device=device, collate=bundle.collate,
                                               num_classes=num_classes, di=di, num_workers=cfg.data.num_workers)
            if di.is_main:
                atomic_torch_save({"logits": cached, "key": key}, cache)
        cached = CachedTeacherTargets(cached, cfg.distill.kind, cfg.distill.tau)

    mixup_on = cfg.aug.mixup > 0 or cfg.aug.cutmix > 0
    mixup = None
    if mixup_on:
        from timm.data import Mixup
        mixup = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
                      switch_prob=cfg.aug.mixup_switch_prob, mode="batch", label_smoothing=cfg.aug.smoothing,
                      num_classes=num_classes)
    criterion = _build_loss(cfg, mixup_on)

    from timm.utils import dispatch_clip_grad
    tb = None
    if cfg.run.tensorboard and di.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError("run.tensorboard=true needs the tensorboard package: pip install 'repvit[train]'") from e
        # scalars are logged at step = epoch (0-based): on resume, drop those of the epochs that are redone
        tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch if state is not None else None)

    log(f"training {cfg.model.name} on {bundle.name}: {len(bundle.train)} train / {len(bundle.val)} val images, "
        f"{num_classes} classes, {in_chans}x{bundle.img_size}x{bundle.img_size}; global batch {global_batch} "
        f"= {world} process(es) x {cfg.run.batch_size} x {accum} accumulation; lr {lr:.3g}; "
        f"{updates_per_epoch} updates/epoch; device {device}, amp {amp}")

    def save_last(epoch: int, micro: int, acc: dict | None = None) -> None:
        """``acc``: this rank's accumulators of the epoch so far (mid-epoch checkpoints), so that the resumed
        epoch's metrics cover the whole epoch."""
        mine = {"rng": capture_rng(), "acc": acc}
        per_rank = [mine]
        if di.distributed:
            import torch.distributed as tdist
            gathered: list[Any] = [None] * world
            tdist.all_gather_object(gathered, mine)
            per_rank = gathered
        if not di.is_main:
            return
        atomic_torch_save({
            "model": raw_model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "micro": micro, "step": step, "rng": [r["rng"] for r in per_rank], "best": best,
            "epoch_acc": [r["acc"] for r in per_rank] if acc is not None else None,
            "config": config_to_dict(cfg), "world_size": world,
            "data_info": {"num_classes": num_classes, "in_chans": in_chans, "preprocessing": bundle.preprocessing},
        }, run_dir / "last.pt")

    def save_best(which: nn.Module, record: dict) -> None:
        if di.is_main:
            m = copy.deepcopy(which).float().cpu().to(memory_format=torch.contiguous_format)
            m.preprocessing = bundle.preprocessing
            if distill:
                m.set_distilled_training(False)
            # the file carries its own record (epoch, top-1, raw/EMA): a resume can tell whether it holds the
            # weights its checkpoint recorded, or ones written after it (_resume_best)
            repvit.save_checkpoint(m, run_dir / "best.safetensors", preprocessing=bundle.preprocessing,
                                   metadata={BEST_META_KEY: dict(record)})

    if di.is_main and best_fix is not None:
        # here, not in the resume block: DDP's construction above synchronises the ranks, so none of them is still
        # reading the best file's record when it moves
        aside, rewrite_from = best_fix
        if aside is not None:
            os.replace(run_dir / "best.safetensors", aside)
        if rewrite_from is not None:        # the weights just restored from the checkpoint are its best epoch's
            save_best(ema.module if rewrite_from == "ema" else raw_model, best)
    final_files = ("summary.json", "deploy.safetensors")
    if di.is_main and state is not None and any((run_dir / n).exists() for n in final_files):
        # the run had finished (or a continuation abandoned for this checkpoint had, or was killed while finishing):
        # until this one finishes, its summary and deploy file would describe a run that is not the one on disk -
        # kept aside, not deleted
        moved = []
        for name in final_files:
            if (run_dir / name).exists():
                aside = _aside_path(run_dir, name.replace(".", "-abandoned.", 1))
                os.replace(run_dir / name, aside)
                moved.append(f"{name} -> {aside.name}")
        log(f"note: this run had written its final files; moved aside until it finishes again: {', '.join(moved)}")

    epoch = start_epoch
    for epoch in range(start_epoch, cfg.schedule.epochs):
        if cfg.schedule.step_per == "epoch" and epoch > 0:
            # the official loop calls lr_scheduler.step(epoch) after epoch `epoch`: the next one runs at that value
            # (epoch 0 keeps the scheduler's initial warmup_lr); set here, so a resumed run gets it too
            scheduler.step(epoch - 1)
        first = start_micro if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first)
        loader = DataLoader(_Indexed(bundle.train), batch_sampler=sampler, num_workers=cfg.data.num_workers,
                            collate_fn=bundle.collate, pin_memory=device.type == "cuda",
                            # augmentations are seeded per sample (_Indexed); the generator only seeds what else a
                            # worker might draw, distinctly per rank and epoch
                            generator=torch.Generator().manual_seed((cfg.run.seed * 7919 + epoch) * world + di.rank),
                            persistent_workers=False)
        train_model.train()
        loss_sum, loss_n, skipped, dropped, seen = 0.0, 0, 0, 0, 0   # skipped: unreadable; dropped: readable
        empty_batches, empty_updates = 0, 0       # micro-batches of this rank with no readable image; updates (global)
        bn_skips = 0                              # micro-steps skipped on all ranks for SyncBatchNorm (global)
        elapsed = 0.0                             # training time of this epoch before a resume
        if epoch == start_epoch and resumed_acc is not None:
            loss_sum, loss_n, skipped, dropped, seen = (resumed_acc[k] for k in
                                                        ("loss_sum", "loss_n", "skipped", "dropped", "seen"))
            empty_batches, empty_updates, bn_skips, elapsed = (resumed_acc[k] for k in
                                                               ("empty_batches", "empty_updates", "bn_skips",
                                                                "elapsed"))
        micro_batch = sampler.micro_batch
        upd_real, ddp_synced = 0, False           # real samples of the current update (all ranks); last sync by DDP
        t0 = time.perf_counter() - elapsed
        bar = None
        if di.is_main and cfg.run.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(sampler), initial=first, desc=f"epoch {epoch + 1}/{cfg.schedule.epochs}",
                       unit="batch", dynamic_ncols=True, leave=False, file=sys.stderr)
        micro = first
        for micro, batch in enumerate(loader, start=first):
            x, y, idx, n_skip = batch
            skipped += n_skip
            if mixup is not None and len(y) % 2:
                x, y, idx = x[:-1], y[:-1], idx[:-1]     # mixup pairs samples; keep the batch even
                dropped += 1
            m_in_step = micro % accum
            last_micro = m_in_step == accum - 1
            if m_in_step == 0:
                upd_real, ddp_synced = 0, False
            n_local = len(y)
            if n_local == 1:
                # unreadable images left a single sample: BatchNorm cannot train on it, so it is dropped like them
                x, y, idx = x[:0], y[:0], idx[:0]
                n_local, dropped = 0, dropped + 1
            if n_local == 0:
                empty_batches += 1
            if di.distributed:
                # every rank learns, before any forward, how many real samples each micro-step has and whether
                # some rank has none: then all ranks take the same path and join the same collectives
                cnt = all_reduce_sum(torch.tensor([float(n_local), float(n_local == 0)], dtype=torch.float64,
                                                  device=device)).cpu()
                n_total, any_empty = int(cnt[0].item()), cnt[1].item() > 0
            else:
                n_total, any_empty = n_local, n_local == 0
            if collective_bn and any_empty and n_total > 0:
                # SyncBatchNorm: the ranks with data would all_gather in the forward and all_reduce in the backward,
                # which the empty ranks never join -> hang. Skip this micro-step on every rank (all know any_empty)
                # and count the readable images it held as dropped. Chosen over feeding the empty ranks a zero-size
                # batch: that path would need every module (mixup, teacher, loss, compiled graph) to accept an empty
                # batch and the empty ranks to run a matching backward; a skip runs no collective at all.
                bn_skips += 1
                dropped += n_local
                if di.is_main and bn_skips == 1:
                    log(f"note: epoch {epoch + 1}, update {step + 1}: some rank has no readable image in micro-batch "
                        f"{micro}; with run.sync_bn this micro-step is skipped on all ranks ({n_total} readable "
                        "image(s) left out, counted as dropped)")
                n_total = 0
            upd_real += n_total
            if n_total > 0:
                # DDP path only when every rank has data; otherwise the plain module, gradients averaged by hand
                via_ddp = di.distributed and not any_empty
                if via_ddp and last_micro:
                    ddp_synced = True
                loss = None
                if n_local:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if cfg.run.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    t_target = cached[idx].to(device) if cached is not None else None
                    if mixup is not None:
                        x, y, t_target = _mix(mixup, x, y, num_classes, cfg.aug.smoothing, t_target)
                    fwd = train_model if (via_ddp or not di.distributed) else raw_model
                    sync = model.no_sync() if (via_ddp and not last_micro) else contextlib.nullcontext()
                    with sync:
                        with autocast_ctx(device, amp):
                            out = fwd(x)
                            if distill and cached is None:
                                with torch.no_grad():
                                    t_target = teacher(x).float()
                        # the loss in float32: autocast hands back half-precision logits, and outside its block
                        # log_softmax / the mean would run in bf16/fp16
                        out = tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()
                        loss = criterion(out, y, t_target, teacher_is_dist=cached is not None)
                        _check_finite(loss, di, epoch, step, micro, run_dir)
                        # weight by real samples: a full micro-batch keeps exactly loss / accum; the update is
                        # renormalised to the real total below
                        scaled = (loss if n_local == micro_batch else loss * (n_local / micro_batch)) / accum
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += loss.item() * n_local
                    loss_n += n_local
                    seen += n_local
                else:
                    _check_finite(None, di, epoch, step, micro, run_dir)   # join the other ranks' check
            if last_micro:
                nominal = micro_batch * world * accum
                if upd_real > 0:
                    if di.distributed and not ddp_synced:
                        average_gradients(raw_model.parameters(), world)
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if upd_real != nominal:
                        grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
                        if grads:
                            torch._foreach_mul_(grads, nominal / upd_real)
                    if cfg.optim.clip_mode != "none" and cfg.optim.clip_grad:
                        dispatch_clip_grad(raw_model.parameters(), cfg.optim.clip_grad, mode=cfg.optim.clip_mode)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                else:
                    empty_updates += 1                   # no readable sample anywhere: nothing to step
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if upd_real > 0:
                    # a finite loss can still take a step that overflows the weights; catch it here, before the
                    # EMA or a checkpoint takes them in (same weights on every rank, so every rank stops together)
                    _check_finite_weights(raw_model, di, epoch, step, run_dir)
                if ema is not None:
                    ema.update(raw_model, step=step)
                scheduler.step_update(step)
                every = cfg.run.checkpoint_every_steps
                if every and step % every == 0 and micro + 1 < len(sampler):
                    save_last(epoch, micro + 1, acc={
                        "loss_sum": loss_sum, "loss_n": loss_n, "skipped": skipped, "dropped": dropped,
                        "seen": seen, "empty_batches": empty_batches, "empty_updates": empty_updates,
                        "bn_skips": bn_skips, "elapsed": time.perf_counter() - t0})
            if bar is not None:
                dt = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / max(loss_n, 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{seen * world / max(dt, 1e-9):.0f}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        epoch_time = time.perf_counter() - t0
        tot = all_reduce_sum(torch.tensor([loss_sum, loss_n, skipped, seen, empty_batches, dropped],
                                          dtype=torch.float64, device=device)).cpu()
        train_loss = tot[0].item() / max(tot[1].item(), 1.0)
        n_skipped = int(tot[2].item())
        n_empty = int(tot[4].item())
        n_dropped = int(tot[5].item())

        # ---- evaluate raw and EMA weights, keep the best
        ev_kw = dict(device=device, batch_size=max(cfg.run.batch_size, 64), amp=amp if device.type == "cuda" else "none",
                     channels_last=cfg.run.channels_last, world_size=world, rank=di.rank, collate=bundle.collate,
                     num_workers=cfg.data.num_workers)
        if di.distributed:
            # each rank's BatchNorm statistics took in its own last batch (DDP hands out the main rank's buffers
            # only at the start of a forward) and each rank's EMA averaged its own: give every rank the main rank's,
            # the ones last.pt and best.safetensors hold, so the sharded validation scores exactly the saved weights
            broadcast_tensors(raw_model.buffers(), di)
            if ema is not None:
                broadcast_tensors(ema.module.buffers(), di)
        if distill:
            raw_model.set_distilled_training(False)
        ev = evaluate(raw_model, bundle.val, **ev_kw)
        ev_ema = evaluate(ema.module, bundle.val, **ev_kw) if ema is not None else None
        if distill:
            raw_model.set_distilled_training(True)
        cand = [("raw", ev, raw_model)]
        if ev_ema is not None:
            cand.append(("ema", ev_ema, ema.module))
        if cfg.run.save_best_from != "auto":
            cand = [c for c in cand if c[0] == cfg.run.save_best_from] or cand
        src, res, mod = max(cand, key=lambda c: c[1]["top1"])
        if res["top1"] > best["top1"]:
            best = {"top1": res["top1"], "epoch": epoch, "source": src}
            save_best(mod, best)
        rec = {"epoch": epoch, "step": step, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
               "val_loss": ev["loss"], "val_top1": ev["top1"], "val_top5": ev["top5"],
               "epoch_time_s": epoch_time, "train_img_s": tot[3].item() / max(epoch_time, 1e-9),
               "skipped_images": n_skipped, "dropped_images": n_dropped, "empty_batches": n_empty,
               "empty_updates": empty_updates, "sync_bn_skipped_steps": bn_skips}
        if ev_ema is not None:
            rec.update(ema_val_top1=ev_ema["top1"], ema_val_top5=ev_ema["top5"], ema_val_loss=ev_ema["loss"])
        if di.is_main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if tb is not None:
                for k, v in rec.items():
                    if k != "epoch":
                        tb.add_scalar(k, v, epoch)
        ema_txt = f", ema top1 {ev_ema['top1']:.2f}" if ev_ema is not None else ""
        skip_txt = f", skipped {n_skipped} unreadable images" if n_skipped else ""
        if n_dropped:
            skip_txt += f", dropped {n_dropped} readable image(s) left alone in a micro-batch or odd for mixup"
        if n_empty:
            skip_txt += (f" ({n_empty} empty micro-batch(es) skipped"
                         + (f", {empty_updates} update(s) without data" if empty_updates else "") + ")")
        if bn_skips:
            skip_txt += (f", {bn_skips} micro-step(s) skipped on all ranks (a rank had no readable image; "
                         "run.sync_bn needs every rank in each forward)")
        log(f"epoch {epoch + 1}/{cfg.schedule.epochs}: train loss {train_loss:.4f}, val top1 {ev['top1']:.2f} "
            f"top5 {ev['top5']:.2f}{ema_txt}, {rec['train_img_s']:.0f} img/s, {epoch_time:.0f}s{skip_txt}")
        save_last(epoch + 1, 0)
        if di.is_main:
            rotate(run_dir, epoch + 1, cfg.run.keep_last)
    if tb is not None:
        tb.close()

    # ---- final: best weights in train and deploy form; the summary describes the file on disk
    if di.is_main:
        best = _reconcile_best(best, run_dir / "best.safetensors", log)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "best_top1": best["top1"], "best_source": best["source"],
                               "best_epoch": best["epoch"] + 1, "epochs": cfg.schedule.epochs}
    deploy_top1 = None
    if di.is_main and (run_dir / "best.safetensors").exists():
        # rebuild the exact training architecture (also the ablated one) and load the best weights
        from safetensors.torch import load_file
        best_model = build_student(_no_pretrained(cfg), num_classes, in_chans)
        best_model.load_state_dict(load_file(str(run_dir / "best.safetensors")))
        deployed = reparameterize(best_model)
        deployed.preprocessing = bundle.preprocessing
        repvit.save_checkpoint(deployed, run_dir / "deploy.safetensors", preprocessing=bundle.preprocessing)
        dres = evaluate(deployed.to(device), bundle.val, device=device, batch_size=max(cfg.run.batch_size, 64),
                        collate=bundle.collate)
        deploy_top1 = dres["top1"]
        summary.update(deploy_top1=dres["top1"], deploy_top5=dres["top5"],
                       deploy_params=sum(p.numel() for p in deployed.parameters()))
    wall = time.perf_counter() - t_start
    summary["wall_s"] = wall
    if di.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return TrainResult(run_dir, best["top1"], best["source"], best["epoch"] + 1, deploy_top1,
                       cfg.schedule.epochs, wall, summary)


def _no_pretrained(cfg: TrainConfig) -> TrainConfig:
    c = copy.deepcopy(cfg)
    c.model.pretrained = None
    return c


BEST_META_KEY = "train_best"     # best.safetensors metadata: {"epoch" (0-based), "top1", "source"} of its weights


def _has_sync_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def _read_best_record(path: Path) -> dict | None:
    """The record save_best wrote into ``path`` (None: no file, or one from before records were written)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(BEST_META_KEY)
        rec = json.loads(raw) if raw else None
        return {"top1": float(rec["top1"]), "epoch": int(rec["epoch"]), "source": str(rec["source"])} if rec else None
    except Exception:  # noqa: BLE001 - unreadable record: keep what the checkpoint says
        return None


ABANDONED_BEST = "best-abandoned.safetensors"    # a best file set aside on resume (see _resume_best)


def _aside_path(run_dir: Path, name: str) -> Path:
    """``run_dir/name``, or ``stem-2.ext``, ``stem-3.ext``... if taken: a file set aside never replaces one set
    aside by an earlier resume (a resume killed before its first checkpoint, resumed again, sets aside twice)."""
    path, stem, ext = run_dir / name, name.split(".", 1)[0], "." + name.split(".", 1)[1]
    n = 2
    while path.exists():
        path, n = run_dir / f"{stem}-{n}{ext}", n + 1
    return path
_NO_BEST = {"top1": -1.0, "epoch": -1, "source": "raw"}


def _resume_best(best: dict, path: Path, log: Callable[[str], None], *, epoch: int, micro: int,
                 has_ema: bool) -> tuple[dict, tuple[Path | None, str | None] | None]:
    """The best record a run resumed from a checkpoint at (``epoch``, ``micro``) continues with, and what to do
    with the best file at ``path`` first: None (it holds the weights of ``best``, the checkpoint's record), or
    (the path to move it aside to (ABANDONED_BEST, or a free variant of it) or None, rewrite it from the restored
    'raw'/'ema' weights or None).

    save_best writes the file (with its record) before save_last writes a checkpoint holding that record, so the
    file holds another record only when it was written after the checkpoint: by the part of an epoch a kill cut
    short, or by a continuation abandoned for an older checkpoint (``--resume RUN/checkpoint-epochNNNN.pt``).
    Those weights belong to a trajectory this resume leaves, so their record is never adopted; the file is set
    aside, not deleted (it may be worth keeping). The checkpoint's own record is kept when its weights are in
    the checkpoint (written right after its best epoch was evaluated, as checkpoint-epochNNNN.pt files are) and
    the file is rewritten from them; otherwise those weights are nowhere on disk any more, and the record is
    dropped like that of a missing file: a record kept without its weights would leave the run without a best
    file (and deploy.safetensors) if it is never beaten, and the summary must describe the file on disk."""
    rec = _read_best_record(path)
    stale = rec is not None and any(rec[k] != best[k] for k in ("epoch", "source", "top1"))
    missing = best["epoch"] >= 0 and not path.is_file()
    if not (stale or missing):
        return best, None           # (a file without a record, from before records were written, is kept)
    aside = _aside_path(path.parent, ABANDONED_BEST) if stale else None
    what = (f"{path.name} holds the {rec['source']} weights of epoch {rec['epoch'] + 1} (top-1 {rec['top1']:.2f}), "
            f"written after this checkpoint by a continuation that this resume abandons; moved to {aside.name}"
            if stale else f"{path.name} is missing")
    mine = f"this checkpoint's best, epoch {best['epoch'] + 1} ({best['source']}, top-1 {best['top1']:.2f})"
    if best["epoch"] >= 0 and micro == 0 and best["epoch"] == epoch - 1 and (best["source"] == "raw" or has_ema):
        log(f"note: {what}; {path.name} is rewritten from the weights of {mine}, which it holds")
        return best, (aside, best["source"])
    if best["epoch"] >= 0:
        log(f"note: {what}; the weights of {mine} are not in it, so that record is dropped: this run's next "
            f"evaluated epoch writes a new {path.name}")
    else:
        log(f"note: {what}; this run's next evaluated epoch writes a new {path.name}")
    return dict(_NO_BEST), (aside, None)


def _reconcile_best(best: dict, path: Path, log: Callable[[str], None]) -> dict:
    """The best-so-far record that describes the weights in ``path``, at the end of a run (the summary's).

    During a run the file and the record change together (save_best; on resume _resume_best), so they differ only
    if something else wrote the file: the summary then describes the file on disk, not the record."""
    rec = _read_best_record(path)
    if rec is not None and (rec["epoch"], rec["source"], rec["top1"]) != (best["epoch"], best["source"], best["top1"]):
        log(f"note: {path.name} holds the {rec['source']} weights of epoch {rec['epoch'] + 1} (top-1 "
            f"{rec['top1']:.2f}), not what the checkpoint recorded (epoch {best['epoch'] + 1}, top-1 "
            f"{best['top1']:.2f}); using the file's record")
        return rec
    if rec is None and best["epoch"] >= 0 and not path.is_file():
        log(f"note: the checkpoint records a best epoch {best['epoch'] + 1} but {path.name} is missing; that "
            "record is dropped (a later epoch that is evaluated writes a new best file)")
        return {"top1": -1.0, "epoch": -1, "source": "raw"}
    return best


def _restore_rank_rng(rngs: list, rank: int, seed: int, step: int) -> bool:
    """Restore this rank's saved RNG states; a rank the saved run did not have (resumed with more processes) is
    seeded from (seed, rank, step) instead of replaying another rank's stream. False when seeded."""
    if rank < len(rngs):
        restore_rng(rngs[rank])
        return True
    _seed_all(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))
    return False


_SUMMED_ACC = ("loss_sum", "loss_n", "skipped", "dropped", "seen", "empty_batches")   # all-reduced at epoch end
_GLOBAL_ACC = ("empty_updates", "bn_skips", "elapsed")                              # same on every rank


def _rank_accumulators(saved: list, rank: int, *, same_world: bool) -> dict:
    """This rank's share of the interrupted epoch's accumulators. With another number of processes the summed
    ones go to rank 0 (only their all-reduced totals are reported); the global ones are rank 0's."""
    saved = [a or {} for a in saved]
    zero = {k: 0.0 if k in ("loss_sum", "elapsed") else 0 for k in (*_SUMMED_ACC, *_GLOBAL_ACC)}
    if same_world:
        mine = saved[rank] if rank < len(saved) else {}
    elif rank == 0:
        mine = {k: sum(a.get(k, 0) for a in saved) for k in _SUMMED_ACC}
    else:
        mine = {}
    out = {**zero, **{k: mine[k] for k in _SUMMED_ACC if k in mine}}
    out.update({k: saved[0].get(k, zero[k]) for k in _GLOBAL_ACC} if saved else {})
    return out


def _check_finite_weights(model: nn.Module, di: DistInfo, epoch: int, step: int, run_dir: Path) -> None:
    """Stop every rank together when update ``step`` left a NaN/inf in the weights or the BatchNorm statistics
    of any rank (one reduction, then one all-reduce of the flag).

    In training mode BatchNorm normalises with the batch's own variance, so an overflowed ``running_var`` (inf)
    still gives a finite loss; it only shows in eval mode, and in a checkpoint. The parameters agree across
    ranks, but the BatchNorm buffers are per rank (without SyncBN): the flag is all-reduced so that no rank
    raises while the others wait in the next collective."""
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    ok = not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())
    if any_rank(not ok, di):
        where = "" if not ok else " on another rank"
        raise NonFiniteLossError(
            f"non-finite weights after epoch {epoch + 1}, update {step}{where} (its loss was finite; the step or "
            f"the BatchNorm statistics overflowed); {_stop_advice(run_dir)}")


def _stop_advice(run_dir: Path) -> str:
    """The tail of every non-finite stop message: what is kept, and what to try (both paths are followable:
    --resume accepts these --set keys, and a new run can start from the last good weights)."""
    last = run_dir / "last.pt"
    if not last.exists():
        return ("stopping. no checkpoint had been written yet. Start again with a lower optim.base_lr, clipping on "
                "(optim.clip_mode), or run.amp=bf16/none.")
    return (f"stopping. last good checkpoint: {last}. Either continue it with other numerics: repvit train "
            f"--resume {run_dir} --set run.amp=bf16 (or none) / --set optim.clip_mode=agc --set optim.clip_grad=... "
            f"(the lr cannot change on --resume: the restored scheduler holds it); or, for a lower lr, start a new "
            f"run from these weights: --set model.pretrained={last} --set optim.base_lr=... (the schedule restarts).")


def _check_finite(loss: torch.Tensor | None, di: DistInfo, epoch: int, step: int, micro: int,
                  run_dir: Path) -> None:
    """Stop every rank together when any rank sees a NaN/inf loss; checkpoints are left as they are.

    A rank without data for this micro-step passes ``loss=None`` and still joins the all-reduce.
    """
    ok = loss is None or bool(torch.isfinite(loss.detach()).all())
    if any_rank(not ok, di):
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item() if loss is not None and not ok else 'on another rank'}) at epoch "
            f"{epoch + 1}, update {step + 1} (micro-batch {micro}); "
            f"{_stop_advice(run_dir)}")
