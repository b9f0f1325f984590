"""Knowledge distillation: DeiT-style hard and soft losses, teacher loading, optional logit caching.

The student's second head (``head_dist``) learns from the teacher, the class head from the labels:
``loss = (1 - alpha) * base(cls, y) + alpha * kd(dist, teacher)`` with
hard: ``CE(dist, argmax teacher)`` and soft: ``KL(softmax(teacher/T) || softmax(dist/T)) * T^2``
(batch mean; DeiT additionally divides its soft term by the number of classes).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillationLoss", "FrozenTeacher", "TeacherEnsemble", "build_teacher", "inference_form",
           "teacher_targets", "precompute_teacher_logits"]


class DistillationLoss(nn.Module):
    """Combine the label loss of the class head with the teacher loss of the distillation head.

    ``teacher`` is either raw teacher logits (online teacher) or, with ``teacher_is_dist=True``,
    a per-sample target distribution already built by :func:`teacher_targets` (and possibly mixed
    by mixup like the labels) - the precomputed path.
    """

    def __init__(self, base: nn.Module, kind: str = "hard", alpha: float = 0.5, tau: float = 1.0) -> None:
        super().__init__()
        if kind not in ("none", "hard", "soft"):
            raise ValueError(f"distillation kind must be none, hard or soft, got {kind!r}")
        self.base, self.kind, self.alpha, self.tau = base, kind, alpha, tau

    def forward(self, outputs, target: torch.Tensor, teacher: torch.Tensor | None = None,
                teacher_is_dist: bool = False) -> torch.Tensor:
        if self.kind == "none":
            return self.base(outputs, target)
        if not isinstance(outputs, (tuple, list)):
            raise ValueError("distillation needs the (cls, dist) outputs: build the student with distillation=True "
                             "and call model.set_distilled_training(True)")
        if teacher is None:
            raise ValueError("distillation loss called without teacher outputs")
        cls, dist = outputs
        base = self.base(cls, target)
        p = teacher if teacher_is_dist else teacher_targets(teacher, self.kind, self.tau)
        p = p.to(dist.dtype if dist.dtype == torch.float32 else torch.float32)
        if self.kind == "hard":
            kd = -(p * F.log_softmax(dist.float(), dim=-1)).sum(-1).mean()
        else:
            t = self.tau
            log_q = F.log_softmax(dist.float() / t, dim=-1)
            kd = (p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(-1).mean() * (t * t)
        return (1 - self.alpha) * base + self.alpha * kd


@torch.no_grad()
def teacher_targets(logits: torch.Tensor, kind: str, tau: float = 1.0) -> torch.Tensor:
    """Teacher logits -> target distribution: one-hot argmax (hard) or softmax(logits / tau) (soft)."""
    logits = logits.float()
    if kind == "hard":
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return F.softmax(logits / tau, dim=-1)


class CachedTeacherTargets:
    """Precomputed teacher targets of every training sample, indexed like the dataset.

    Hard distillation keeps only the teacher's class per sample and builds the one-hot rows per batch: the
    same targets as :func:`teacher_targets`, in 8 bytes per sample instead of 4 x num_classes (for ImageNet-1k
    10 MB instead of 5.1 GB in every training process). Soft targets need the whole distribution."""

    def __init__(self, logits: torch.Tensor, kind: str, tau: float = 1.0) -> None:
        self.num_classes = logits.shape[-1]
        self.classes = logits.float().argmax(-1) if kind == "hard" else None
        self.probs = None if kind == "hard" else teacher_targets(logits, kind, tau)

    def __len__(self) -> int:
        return len(self.classes if self.classes is not None else self.probs)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.classes is not None:
            return F.one_hot(self.classes[idx], self.num_classes).float()
        return self.probs[idx]


def _class_logits(out) -> torch.Tensor:
    """A teacher's prediction: the class head's logits of a (cls, dist) pair, or the single output."""
    return out[0] if isinstance(out, (tuple, list)) else out


class FrozenTeacher(nn.Module):
    """Wraps a teacher: no gradients, always in eval mode (``train()`` cannot switch it back)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return self  # a teacher's BatchNorm statistics must never be updated

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _class_logits(self.model(x))


class TeacherEnsemble(nn.Module):
    """Several teachers as one: the log of their mean softmax probability.

    Averaging probabilities (not logits) is what an ensemble predicts; returned as log-probabilities so that
    ``softmax(output)`` is that average (soft targets at tau 1, argmax for hard ones) and higher temperatures still
    flatten it.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("a teacher ensemble needs at least two members")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = None
        for m in self.members:
            p = F.softmax(_class_logits(m(x)).float(), dim=-1)
            probs = p if probs is None else probs + p
        return (probs / len(self.members)).clamp_min(1e-12).log()


def split_comma_list(value: str, what: str) -> list[str]:
    """The entries of "a,b,..." (stripped); an empty entry is an error naming ``what``. Used for teacher ensembles
    and for the ensembles ``repvit eval`` scores, so both read a list the same way."""
    parts = [s.strip() for s in value.split(",")]
    if any(not s for s in parts):
        raise ValueError(f"{what} {value!r} has an empty entry in its comma-separated list")
    return parts


def _load_state(src: str) -> dict:
    if src.startswith(("http://", "https://")):
        sd = torch.hub.load_state_dict_from_url(src, map_location="cpu", check_hash=False)
    else:
        p = Path(src)
        if not p.is_file():
            raise FileNotFoundError(f"teacher checkpoint {p} not found")
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def build_teacher(name: str, checkpoint: str | None, *, num_classes: int, in_chans: int) -> FrozenTeacher:
    """Teacher from a checkpoint file (any format repvit reads; a run's last.pt or directory gives its EMA weights
    when it has them), a repvit variant, or a timm model name; a comma-separated list of these is an ensemble
    (:class:`TeacherEnsemble`).

    A timm teacher loads ``checkpoint`` (URL or file, e.g. the DeiT RegNetY-16GF weights); without
    one it uses timm's pretrained weights.
    """
    import repvit
    from repvit.models import list_models

    if "," in name:
        # "a.safetensors,b.safetensors": an ensemble of teachers (each any of the forms below, its own weights)
        if checkpoint:
            raise ValueError("distill.teacher_checkpoint names one checkpoint, but distill.teacher lists "
                             f"{name.count(',') + 1} teachers: give each teacher as a checkpoint file and set "
                             "distill.teacher_checkpoint=null")
        members = [build_teacher(n, None, num_classes=num_classes, in_chans=in_chans).model
                   for n in split_comma_list(name, "distill.teacher")]
        return FrozenTeacher(TeacherEnsemble(members))

    # The teacher's classifier is what it teaches: never ask for num_classes while loading its weights (that
    # would put a random head on a pretrained teacher, silently); load it as it is and compare below.
    if Path(name).exists():
        # any checkpoint file, or a run directory / training state (last.pt): the model `repvit eval` scores for it
        # (a run's EMA weights when it holds them), so an eval ensemble of the same files predicts what it teaches
        from .evaluate import load_eval_model
        model = load_eval_model(Path(name))[1]
    elif name.lower().replace("-", "_").replace(".", "_") in list_models():
        model = repvit.create_model(name, checkpoint=checkpoint, in_chans=in_chans) if checkpoint \
            else repvit.create_model(name, pretrained=True)
    else:
        import timm
        if not timm.is_model(name):
            raise ValueError(f"teacher {name!r} is neither a file, a repvit variant nor a timm model name")
        if checkpoint:
            state = _load_state(checkpoint)
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"teacher checkpoint {checkpoint} does not fit timm's {name} with {num_classes} "
                                 f"classes and {in_chans} input channel(s): {str(e)[:300]}") from e
        else:
            model = timm.create_model(name, pretrained=True, in_chans=in_chans)
    if getattr(model, "num_classes", num_classes) != num_classes:
        raise ValueError(f"teacher {name!r} predicts {model.num_classes} classes but the data has {num_classes}: a "
                         "teacher must be trained on the same labels. Train one on this data first and pass its "
                         "checkpoint as distill.teacher=PATH (benchmarks/fashion_mnist.py --parts distill shows how)")
    return FrozenTeacher(inference_form(model))


def inference_form(model: nn.Module) -> nn.Module:
    """The teacher as it runs fastest with the same function: a frozen teacher only ever runs in eval mode, so its
    BatchNorms and re-parameterisable branches fold into its convolutions (RepViT's deploy form through
    :func:`repvit.reparameterize`; timm's RepViT, MobileOne, FastViT, ... through timm's own
    ``reparameterize_model``). The teacher's forward is a third of a soft-distillation step or more on a CPU (two
    for a two-member ensemble), and the fold removes a memory pass per BatchNorm and branch."""
    model = model.eval()
    if type(model).__module__.startswith("repvit."):
        from repvit.reparam import is_deploy_form, reparameterize
        return model if is_deploy_form(model) else reparameterize(model)
    if any(callable(getattr(m, a, None)) for m in model.modules()
           for a in ("fuse", "reparameterize", "switch_to_deploy")):
        from timm.utils.model import reparameterize_model
        return reparameterize_model(model).eval()
    return model


def teacher_input_mismatch(teacher: nn.Module, student_pre: dict) -> str | None:
    """How the teacher's expected normalisation differs from the student's data, or None (unknown counts as equal).

    The teacher is fed the student's batches, so a teacher trained with other mean/std sees shifted inputs."""
    if isinstance(teacher, TeacherEnsemble):   # every member sees the same batches: check each
        notes = [f"member {i}: {n}" for i, m in enumerate(teacher.members)
                 if (n := teacher_input_mismatch(m, student_pre))]
        return "; ".join(notes) or None
    want = getattr(teacher, "preprocessing", None)                      # repvit models
    if not isinstance(want, dict):
        cfg = getattr(teacher, "pretrained_cfg", None) or {}            # timm models
        want = {"mean": cfg.get("mean"), "std": cfg.get("std")} if cfg.get("mean") else None
    if not want:
        return None
    diffs = []
    for key in ("mean", "std"):
        a, b = want.get(key), student_pre.get(key)
        if a is not None and b is not None and (len(a) != len(b) or any(abs(x - y) > 1e-3 for x, y in zip(a, b))):
            diffs.append(f"it expects {key} {tuple(round(v, 4) for v in a)} and the data uses "
                         f"{tuple(round(v, 4) for v in b)}")
    return "; ".join(diffs) or None


@torch.no_grad()
def precompute_teacher_logits(teacher: nn.Module, dataset, *, batch_size: int, device: torch.device,
                              collate, num_classes: int, di=None, num_workers: int = 0) -> torch.Tensor:
    """Teacher logits for every sample of ``dataset`` (evaluation transform), indexed by sample.

    With several processes (``di``, a :class:`repvit.train.dist.DistInfo`) each rank runs the teacher over its own
    contiguous shard and the shards are gathered, so every rank holds the whole table after 1/world of the work
    (each used to compute all of it)."""
    from torch.utils.data import DataLoader, Subset

    from repvit.data.sampler import shard_range

    from .dist import any_rank, gather_shards
    n = len(dataset)
    together = di is not None and di.distributed
    part = Subset(dataset, shard_range(n, di.world_size, di.rank)) if together else dataset
    outs = [torch.empty(0, num_classes)]            # a rank whose shard is empty still joins the gather
    failure: Exception | None = None
    try:
        for batch in DataLoader(part, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                num_workers=num_workers, pin_memory=device.type == "cuda"):
            x = batch[0]
            if batch[-1]:
                raise RuntimeError("the training set holds unreadable images; remove them before using "
                                   "distill.precompute (cached logits are indexed by sample)")
            outs.append(teacher(x.to(device, non_blocking=True)).float().cpu())
    except Exception as e:  # noqa: BLE001 - with other ranks: stop them too (below) instead of leaving them waiting
        if not together:
            raise
        failure = e
    # each rank reads only its shard, so a bad image stops one rank: every rank learns of it before the gather
    if together and any_rank(failure is not None, di):
        if failure is not None:
            raise failure
        raise RuntimeError("another rank failed while precomputing the teacher logits (its log says why); "
                           "every rank stops")
    local = torch.cat(outs)
    return gather_shards(local, n, di) if di is not None else local
