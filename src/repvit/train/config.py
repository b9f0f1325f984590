"""Typed training configuration: dataclasses, YAML load/validate, ``--set key=value`` overrides.

The dataclass defaults are the official ImageNet recipe for RepViT (300 epochs, no
distillation); shipped YAML recipes in ``repvit/recipes`` spell every value out.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ModelConfig", "DataConfig", "AugConfig", "OptimConfig", "ScheduleConfig", "EMAConfig", "DistillConfig",
    "RunConfig", "TrainConfig", "config_from_dict", "config_to_dict", "apply_overrides", "dump_yaml", "load_yaml",
    "RESUME_OVERRIDABLE", "check_resume_overrides",
]

# Official values: RepViT reference sheet (paper arXiv 2307.09283 / official repo), training_recipe_official.
DEIT_REGNETY160_URL = "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    name: str = "repvit_m0_9"
    distillation: bool = False          # two heads (class + distillation); forced on when distill.kind != none
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0         # the official recipe uses none
    pretrained: str | None = None       # checkpoint to fine-tune from (any format repvit.create_model reads)
    in_chans: int | None = None         # None: taken from the dataset (1 for the grayscale built-ins)
    num_classes: int | None = None      # None: taken from the dataset
    reparam_branches: bool = True       # False: plain dw 3x3 token mixer (ablation of the 1x1/identity branches)


@dataclass
class DataConfig:
    dataset: str = "imagenet"           # path to a dataset root, or a built-in name: fashion-mnist, digits
    format: str = "auto"                # auto | folder | tar | wds | hfds | hfids (timm readers)
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, ...] | None = None   # None: ImageNet stats (RGB) or the built-in dataset's own
    std: tuple[float, ...] | None = None
    eval_crop: str = "official"         # official (resize 256 -> crop 224, crop_pct 0.875) | timm (crop_pct 0.95)
    num_workers: int = 8
    max_train_samples: int | None = None  # use a deterministic subset (quick runs)
    max_val_samples: int | None = None
    download_dir: str | None = None     # built-ins: directory holding the IDX files (default: Debian path)


@dataclass
class AugConfig:
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    reprob: float = 0.25                # random erasing
    remode: str = "pixel"
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    repeated_aug: int = 3               # repeated augmentation: copies of each image per epoch
    pad_crop: int = 0                   # built-ins: random crop after padding by this many pixels


@dataclass
class OptimConfig:
    opt: str = "adamw"
    base_lr: float = 1e-3               # lr = base_lr * global_batch / lr_base_batch
    lr_base_batch: int = 512
    lr: float | None = None             # set to override the scaling rule
    weight_decay: float = 0.025         # not applied to norms and biases
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    clip_mode: str = "agc"              # agc | norm | value | none
    clip_grad: float | None = 0.02


@dataclass
class ScheduleConfig:
    epochs: int = 300
    sched: str = "cosine"
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    # update: the lr follows the schedule every optimizer update (smooth; what short runs want).
    # epoch: the official RepViT/DeiT loop - the lr changes once per epoch (lr_scheduler.step(epoch) after each
    # epoch), so epoch 0 and 1 run at warmup_lr and epoch e >= 1 at the schedule's value for e - 1
    step_per: str = "update"


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.99996
    warmup: bool = False                # timm decay warmup, useful for short runs


@dataclass
class DistillConfig:
    kind: str = "none"                  # none | hard (DeiT) | soft (KL with temperature)
    alpha: float = 0.5
    tau: float = 1.0
    teacher: str = "regnety_160"        # timm model name, repvit variant, checkpoint file, or "a,b,..." (ensemble)
    teacher_checkpoint: str | None = DEIT_REGNETY160_URL  # URL or file for a timm/repvit teacher
    precompute: bool = False            # run the teacher once on un-augmented images and cache logits


@dataclass
class RunConfig:
    global_batch: int | None = 2048     # None: batch_size * world size (no accumulation)
    batch_size: int = 256               # per process per step; accumulation fills up to global_batch
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    amp: str = "fp16"                   # none | bf16 | fp16 (fp16 falls back to bf16 on CPU)
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    grad_checkpointing: bool = False    # recompute blocks in backward: less activation memory, ~1 more forward
    keep_last: int = 2                  # rolling checkpoints kept besides last.pt and the best
    checkpoint_every_steps: int = 0     # 0: at epoch ends only
    save_best_from: str = "auto"        # auto (EMA if enabled and better) | ema | raw
    tensorboard: bool = False
    progress: bool = True
    threads: int | None = None          # torch intra-op threads (CPU runs)
    max_steps_per_epoch: int | None = None  # truncate epochs (smoke tests)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first inconsistent value."""
        _choice("distill.kind", self.distill.kind, ("none", "hard", "soft"))
        _choice("run.amp", self.run.amp, ("none", "bf16", "fp16"))
        _choice("data.eval_crop", self.data.eval_crop, ("official", "timm"))
        from repvit.data import DATA_FORMATS  # one list for the config, the data builder and `repvit eval --format`
        _choice("data.format", self.data.format, DATA_FORMATS)
        _choice("optim.clip_mode", self.optim.clip_mode, ("agc", "norm", "value", "none"))
        _choice("run.save_best_from", self.run.save_best_from, ("auto", "ema", "raw"))
        _choice("schedule.step_per", self.schedule.step_per, ("update", "epoch"))
        _choice("run.device", self.run.device, ("auto", "cpu", "cuda"))
        # schedulers the loop can drive per update (plateau needs a metric, none builds no scheduler)
        _choice("schedule.sched", self.schedule.sched, ("cosine", "tanh", "step", "multistep", "poly"))
        # what timm's resize transforms take ('random' is a training-only mode: evaluation needs one)
        _choice("data.interpolation", self.data.interpolation,
                ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"))
        try:
            from timm.optim import list_optimizers
        except ImportError:                 # older timm: the optimizer factory reports an unknown name itself
            list_optimizers = None
        base_opt = self.optim.opt.lower().removeprefix("lookahead_")   # timm wraps any optimizer in Lookahead
        if list_optimizers is not None and base_opt not in list_optimizers():
            close = difflib.get_close_matches(base_opt, list_optimizers(), n=3)
            raise ValueError(f"optim.opt={self.optim.opt!r} is not a timm optimizer"
                             f"{'; did you mean ' + ', '.join(close) + '?' if close else ''}")
        for name, v in (("data.mean", self.data.mean), ("data.std", self.data.std)):
            if v is not None and (not v or any(not isinstance(x, (int, float)) or x != x for x in v)):
                raise ValueError(f"{name} must be a list of numbers (one per input channel) or null, got {v}")
        if self.data.std is not None and any(x <= 0 for x in self.data.std):
            raise ValueError(f"data.std must be positive, got {self.data.std}")
        for name, v in (("data.max_train_samples", self.data.max_train_samples),
                        ("data.max_val_samples", self.data.max_val_samples)):
            if v is not None and not v >= 0:
                raise ValueError(f"{name} must be >= 0 (0 or null: all samples), got {v}")
        for name, v in (("schedule.epochs", self.schedule.epochs), ("run.batch_size", self.run.batch_size),
                        ("data.img_size", self.data.img_size), ("aug.repeated_aug", self.aug.repeated_aug)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        for name, v in (("run.global_batch", self.run.global_batch), ("optim.lr_base_batch", self.optim.lr_base_batch)):
            if v is not None and not v >= 1:
                optional = "" if name == "optim.lr_base_batch" else " (or null)"
                raise ValueError(f"{name} must be >= 1{optional}, got {v}")
        # 0 keeps its long-standing meaning here (no limit / torch's default), so older run configs still load
        for name, v in (("run.max_steps_per_epoch", self.run.max_steps_per_epoch), ("run.threads", self.run.threads)):
            if v is not None and not v >= 0:
                raise ValueError(f"{name} must be >= 0 (0 or null: no limit), got {v}")
        for name, v in (("optim.base_lr", self.optim.base_lr), ("optim.lr", self.optim.lr),
                        ("optim.weight_decay", self.optim.weight_decay), ("schedule.min_lr", self.schedule.min_lr),
                        ("schedule.warmup_lr", self.schedule.warmup_lr), ("run.keep_last", self.run.keep_last),
                        ("run.checkpoint_every_steps", self.run.checkpoint_every_steps),
                        ("data.num_workers", self.data.num_workers), ("aug.color_jitter", self.aug.color_jitter),
                        ("aug.mixup", self.aug.mixup), ("aug.cutmix", self.aug.cutmix),
                        ("aug.pad_crop", self.aug.pad_crop)):
            if v is not None and not v >= 0:          # NaN too
                raise ValueError(f"{name} must be >= 0, got {v}")
        for name, v in (("aug.hflip", self.aug.hflip), ("aug.reprob", self.aug.reprob),
                        ("aug.mixup_prob", self.aug.mixup_prob), ("aug.mixup_switch_prob", self.aug.mixup_switch_prob),
                        ("aug.smoothing", self.aug.smoothing)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        for name, v in (("model.drop_rate", self.model.drop_rate), ("model.drop_path_rate", self.model.drop_path_rate)):
            if not 0.0 <= v < 1.0:      # the model builder's rule: a rate of 1 drops everything
                raise ValueError(f"{name} must lie in [0, 1), got {v}")
        if self.run.global_batch is not None and self.run.global_batch % self.run.batch_size:
            raise ValueError(f"run.global_batch ({self.run.global_batch}) must be a multiple of run.batch_size "
                             f"({self.run.batch_size}) so gradient accumulation can fill it")
        if not 0.0 <= self.distill.alpha <= 1.0 or not self.distill.tau > 0:     # NaN fails both
            raise ValueError("distill.alpha must lie in [0, 1] and distill.tau must be > 0")
        if not 0.0 <= self.ema.decay < 1.0:
            raise ValueError(f"ema.decay must lie in [0, 1), got {self.ema.decay}")
        if not 0 <= self.schedule.warmup_epochs <= self.schedule.epochs:
            raise ValueError("schedule.warmup_epochs must lie in [0, schedule.epochs]")
        if (self.aug.mixup > 0 or self.aug.cutmix > 0) and self.run.batch_size % 2:
            raise ValueError("mixup/cutmix need an even run.batch_size")
        return self

    def lr(self, world_size: int = 1) -> float:
        """Peak learning rate: explicit ``optim.lr`` or the linear scaling rule on the global batch."""
        if self.optim.lr is not None:
            return self.optim.lr
        return self.optim.base_lr * self.global_batch(world_size) / self.optim.lr_base_batch

    def global_batch(self, world_size: int = 1) -> int:
        if self.run.global_batch is not None:
            return self.run.global_batch
        return self.run.batch_size * world_size

    def accum_steps(self, world_size: int = 1) -> int:
        per_step = self.run.batch_size * world_size
        gb = self.global_batch(world_size)
        if gb % per_step:
            raise ValueError(f"global batch {gb} is not a multiple of batch_size x world size = {per_step}; "
                             "change run.batch_size or run.global_batch")
        return gb // per_step


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")


# ----------------------------------------------------------------------------- dict <-> dataclass


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Convert a YAML value to the annotated type, or raise a ValueError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(path, a, value)
            except ValueError:
                continue
        raise ValueError(f"config key {path}: cannot use {value!r} as {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0]
        if len(args) == 2 and args[1] is not Ellipsis or len(args) > 2:
            if len(value) != len(args):
                raise ValueError(f"config key {path}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(path, inner, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"config key {path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"config key {path}: expected a string, got {value!r}")
        return str(value)
    raise ValueError(f"config key {path}: unsupported type {tp}")  # pragma: no cover


def _fill(obj: Any, data: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=2)
            hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ValueError(f"unknown config key {path!r}.{hint} Valid keys: {', '.join(prefix + n for n in names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config section {path!r} must be a mapping, got {value!r}")
            _fill(current, value, path + ".")
        else:
            setattr(obj, key, _coerce(path, hints[key], value))


def config_from_dict(data: dict | None) -> TrainConfig:
    """Build and validate a TrainConfig from a (possibly partial) nested dict."""
    cfg = TrainConfig()
    if data:
        if not isinstance(data, dict):
            raise ValueError(f"a recipe must be a YAML mapping, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "description"}
        _fill(cfg, data, "")
    return cfg.validate()


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict (tuples become lists) - safe for YAML and torch.load(weights_only=True)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.key=value`` strings (value parsed as YAML) and re-validate."""
    data = config_to_dict(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value (e.g. optim.base_lr=5e-4), got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ValueError(f"unknown config section {p!r} in --set {item!r}; sections: {', '.join(data)}")
            node = node[p]
        if parts[-1] not in node:
            close = difflib.get_close_matches(parts[-1], list(node), n=2)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {key!r} in --set.{hint}")
        if isinstance(node[parts[-1]], dict):
            # replacing a whole section would reset its other keys to the code defaults, not the recipe's
            raise ValueError(f"--set {key}=... names a whole section; set its keys one by one "
                             f"(e.g. --set {key}.{next(iter(node[parts[-1]]))}=...)")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return config_from_dict(data)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe file {p} does not exist; pass a shipped recipe name (see `repvit train --list-recipes`) or a YAML path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {p} is not valid YAML: {e}") from e
    return data or {}


# config keys that ``--resume`` may change with ``--set``: none of them alters the model, the data order, the
# optimizer/scheduler state or the schedule's horizon. The learning rate is deliberately absent: the restored
# optimizer and scheduler carry the old peak lr (timm's base_values), so a new lr would be overwritten or would
# jump the cosine mid-run; to lower it, start a new run from the last good weights (see _stop_advice).
RESUME_OVERRIDABLE = ("optim.clip_grad", "optim.clip_mode", "run.amp", "run.progress", "run.tensorboard",
                      "run.keep_last", "run.checkpoint_every_steps", "run.threads")


def check_resume_overrides(overrides: list[str] | None) -> list[str]:
    """The ``key=value`` items ``--resume`` accepts (keys in RESUME_OVERRIDABLE); a ValueError names the rest."""
    bad = []
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or key not in RESUME_OVERRIDABLE:
            bad.append(key if "=" in item else item)
    if bad:
        raise ValueError(f"--resume continues a run with its saved config; --set {', '.join(bad)} cannot change "
                         f"mid-run. Allowed with --resume: {', '.join(RESUME_OVERRIDABLE)}. For anything else "
                         "(e.g. a lower optim.base_lr) start a new run from the last good weights with "
                         "--set model.pretrained=RUN_DIR/last.pt")
    return list(overrides or [])
