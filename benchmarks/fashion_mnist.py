"""Fashion-MNIST proof run: RepViT-M0.9 vs timm's MobileNetV3-L, plus ablations and training throughput.

Everything is measured side by side in one process: the models of a comparison are stepped in turn
on the *same* batches (same order, same augmentation), so a busy shared CPU slows them equally.

Parts (all written to OUT/fashion_mnist.json and OUT/fashion_mnist.md):
  main      RepViT-M0.9 vs mobilenetv3_large_100, same recipe / resolution / number of updates
  reparam   RepViT-M0.9 with vs without the training-time re-param branches (1x1 + identity)
  distill   a larger teacher (RepViT-M1.5) trained first, then M0.9 hard-distilled from it vs no distillation;
            --teacher-ckpt uses an already trained teacher (evaluated and reported), --student another student
  speed     training images/s of our RepViT-M0.9 vs timm's repvit_m0_9 in the same loop (ratio), and the
            effect of channels_last and bf16 autocast on this CPU (and of torch.compile with --speed-compile)

Resolution (--res): the stem downsamples by 4 and the net by 32, so 28x28 would leave a 7x7 map after the stem
and uneven strides (7, 4, 2, 1). 32x32 (28x28 upsampled bilinearly; in training then zero-padded by 2 and
randomly cropped back) gives 8x8 down to 1x1 and is the cheapest clean choice (the quick and parallel runs).
48x48 gives 12x12 after the stem and a 2x2 last stage, so the last stage's 3x3 depthwise convs see a neighbour;
it costs only about 1.5x the time of 32x32 on this CPU (not the 2.25x of the pixel count: tiny maps are
overhead-bound) and learns more per epoch (+1.4 points after 2 epochs), so the 60-minute run uses it.

    python benchmarks/fashion_mnist.py --quick --out-dir benchmarks/results/quick       # ~10-15 min, subset
    python benchmarks/fashion_mnist.py --budget-minutes 60 --parts main --parallel --out-dir benchmarks/results/main
    python benchmarks/fashion_mnist.py --parts reparam,distill --abl-epochs 1 --parallel --out-dir benchmarks/results/abl
    # each model gets the whole machine (2 threads) for the budget, in turn; batch 256 (2x the img/s of batch 128)
    python benchmarks/fashion_mnist.py --budget-minutes 60 --parts main --threads 2 --batch 256 --lr 0.003 --res 48 \
        --out-dir benchmarks/results/main_r48

Each run writes a fresh ``fashion_mnist.json`` / ``.md`` into ``--out-dir`` and refuses a folder that already
holds one (``--overwrite`` replaces it), so one comparison cannot erase another's numbers. ``top1`` is the test
accuracy of the weights named before the run by ``--weights`` (default ``raw``, the optimizer's final weights, as
the official evaluation reports; ``ema`` for the EMA copy); ``raw_top1`` and ``ema_top1`` are both recorded. No
number is chosen by looking at the test set (results written before 2026-12-01 took the better of the two; their
``weights`` field says which).

--parallel runs the arms of a comparison as separate single-thread processes (one per core) that draw
bit-identical batches (checked: every result row carries a sha256 of the batches it saw, and the run stops if
the arms' digests differ). Model initialisation differs from the single-process mode (each arm seeds its own
process), so only the data, not the initial weights, match that mode exactly.

The trained raw and EMA weights of every main-comparison model are saved next to the results as
``<model>.safetensors`` and ``<model>_ema.safetensors`` (RepViT ones load with ``repvit.load_checkpoint``;
others are timm state dicts), e.g. for ``benchmarks/int8_accuracy.py``.

``--set KEY=VALUE`` accepts only the recipe keys this script uses (``HONOURED_OVERRIDES``; anything else, e.g.
``model.drop_path_rate`` or ``aug.mixup``, is refused instead of being recorded without effect). The schedule is
fixed by the script: cosine over the planned updates with a linear warm-up over the first 5% of them.

``--teacher-ckpt`` must record the same input size and normalisation as this run's data (the teacher sees the
student's batches); a ``best.safetensors`` of ``repvit train`` (metadata ``train_best``) was chosen on the
validation split, which for Fashion-MNIST is the test set: the run warns and records
``teacher_selected_on_test_split``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from repvit.data import GlobalBatchSampler, build_data  # noqa: E402
from repvit.models import build_model  # noqa: E402
from repvit.train.builder import strip_reparam_branches  # noqa: E402
from repvit.train.config import TrainConfig, apply_overrides  # noqa: E402
from repvit.train.distill import DistillationLoss, FrozenTeacher  # noqa: E402
from repvit.train.evaluate import evaluate  # noqa: E402
from repvit.train.recipes import load_recipe  # noqa: E402

WARMUP_FRACTION = 0.05   # linear lr warm-up over this share of the planned updates (the recipe's epochs are unused)

# The recipe keys ``--set`` may change: those the code below (Trainer, side_by_side) and build_data's built-in
# Fashion-MNIST/digits pipeline actually read. Every other key would be recorded in the results but have no effect
# (the models are built by name, the schedule, EMA warm-up, loss, clipping mode and memory format are fixed here);
# the batch size, resolution and lr have their own flags.
HONOURED_OVERRIDES = {
    "optim.opt": "optimizer name (timm create_optimizer_v2)",
    "optim.lr": "peak learning rate (as --lr)",
    "optim.weight_decay": "weight decay",
    "optim.clip_grad": "gradient-norm clipping threshold (null: no clipping; the mode is always norm)",
    "schedule.min_lr": "final lr of the cosine",
    "schedule.warmup_lr": "lr at the start of the warm-up",
    "ema.decay": "EMA decay (always with timm's decay warm-up)",
    "aug.smoothing": "label smoothing",
    "aug.hflip": "horizontal-flip probability",
    "aug.reprob": "random-erasing probability",
    "aug.pad_crop": "pad-and-random-crop pixels",
    "data.mean": "normalisation mean (first value)",
    "data.std": "normalisation std (first value)",
    "data.max_train_samples": "training subset size (null: all)",
    "data.max_val_samples": "test subset size (null: all)",
    "data.download_dir": "folder holding the Fashion-MNIST IDX files",
    "run.seed": "seed of the batch order and augmentation (model initialisation is always seeded 0)",
}


def check_overrides(overrides: list[str]) -> list[str]:
    """The ``--set`` items, if every key is one this script honours; a ValueError lists the others and the keys
    allowed (a refused key would otherwise be recorded as applied while changing nothing)."""
    bad = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (e.g. aug.reprob=0), got {item!r}")
        key = item.split("=", 1)[0].strip()
        if key not in HONOURED_OVERRIDES:
            bad.append(key)
    if bad:
        hint = {"run.batch_size": "--batch", "run.global_batch": "--batch", "data.img_size": "--res"}
        flags = [f"{k}: use {hint[k]}" for k in bad if k in hint]
        raise ValueError(
            f"--set {', '.join(bad)}: not used by this script, so the run would record the override without "
            f"applying it{' (' + '; '.join(flags) + ')' if flags else ''}. The keys it honours: "
            + "; ".join(f"{k} [{v}]" for k, v in HONOURED_OVERRIDES.items()))
    return list(overrides)


def preprocessing_mismatch(pre: dict, data_pre: dict) -> str | None:
    """How a checkpoint's recorded preprocessing (input size, mean, std) differs from the run's data, or None."""
    diffs = []
    a, b = [int(v) for v in pre.get("input_size") or []], [int(v) for v in data_pre["input_size"]]
    if a and a != b:
        diffs.append(f"input size {a} but this run's data is {b}")
    for key in ("mean", "std"):
        x, y = pre.get(key), data_pre.get(key)
        if x is not None and y is not None and (
                len(x) != len(y) or any(abs(float(u) - float(v)) > 1e-3 for u, v in zip(x, y))):
            diffs.append(f"{key} {[round(float(u), 4) for u in x]} but this run's data uses "
                         f"{[round(float(v), 4) for v in y]}")
    return "; ".join(diffs) or None


def check_teacher(path: str, data_pre: dict, log) -> dict:
    """Facts about an external teacher checkpoint, after checking its preprocessing against the run's data.

    A recorded input size or mean/std that differs from ``data_pre`` raises ValueError (the teacher is fed the
    student's batches). A ``train_best`` record (a ``best.safetensors`` of ``repvit train``) means the weights were
    picked on the validation split - the test set for Fashion-MNIST: warned about and recorded, not refused."""
    from repvit.weights.io import read_checkpoint
    meta = read_checkpoint(path).metadata
    pre = meta.get("preprocessing")
    facts: dict = {"teacher_preprocessing_checked": isinstance(pre, dict)}
    if isinstance(pre, dict):
        diff = preprocessing_mismatch(pre, data_pre)
        if diff:
            raise ValueError(f"--teacher-ckpt {path} was trained with other inputs: it records {diff}. The teacher "
                             "sees this run's batches; run with the teacher's --res (and data), or use a teacher "
                             "trained on this run's inputs")
    else:
        log(f"warning: --teacher-ckpt {path} records no preprocessing; its input size and normalisation cannot be "
            "checked against this run's data")
    best = meta.get("train_best")
    if best:
        log(f"warning: --teacher-ckpt {path} carries a train_best record ({best}): it was selected as the best "
            "epoch on the validation split, which for Fashion-MNIST is the test set the students are scored on")
        facts["teacher_selected_on_test_split"] = True
        facts["teacher_train_best"] = best
    return facts


class Trainer:
    """One model + its optimizer/schedule/EMA, built from the same recipe for every model compared."""

    def __init__(self, name: str, model: nn.Module, cfg: TrainConfig, total_updates: int,
                 teacher: nn.Module | None = None, channels_last: bool = True) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler
        from timm.utils import ModelEmaV3
        self.name, self.model, self.teacher, self.cl = name, model, teacher, channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.opt = create_optimizer_v2(model, opt=cfg.optim.opt, lr=cfg.lr(), weight_decay=cfg.optim.weight_decay)
        warm = max(1, int(total_updates * WARMUP_FRACTION))
        self.sched = CosineLRScheduler(self.opt, t_initial=total_updates, lr_min=cfg.schedule.min_lr,
                                       warmup_t=warm, warmup_lr_init=cfg.schedule.warmup_lr, t_in_epochs=False)
        self.ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=True)
        from timm.loss import LabelSmoothingCrossEntropy
        self.loss = DistillationLoss(LabelSmoothingCrossEntropy(cfg.aug.smoothing),
                                     "hard" if teacher is not None else "none")
        if teacher is not None:
            model.set_distilled_training(True)
        self.clip = cfg.optim.clip_grad
        self.step_n, self.busy_s, self.images, self.loss_sum = 0, 0.0, 0, 0.0
        self.data_digest = hashlib.sha256()   # of every batch seen, in order: equal across arms <=> same batches

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.model.train()
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.model(x)
        t_logits = self.teacher(x) if self.teacher is not None else None
        loss = self.loss(out, y, t_logits)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss at update {self.step_n + 1}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.step_n += 1
        self.ema.update(self.model, step=self.step_n)
        self.sched.step_update(self.step_n)
        self.busy_s += time.perf_counter() - t0
        self.images += len(y)
        self.loss_sum += loss.item()
        self.data_digest.update(x.contiguous().numpy().tobytes())
        self.data_digest.update(y.numpy().tobytes())

    def result(self, val, batch: int, weights: str) -> dict:
        """Test accuracy of the raw and EMA weights; ``top1``/``top5`` are those of ``weights``, fixed in advance."""
        if self.teacher is not None:
            self.model.set_distilled_training(False)
        raw = evaluate(self.model, val, device=torch.device("cpu"), batch_size=batch, channels_last=self.cl)
        ema = evaluate(self.ema.module, val, device=torch.device("cpu"), batch_size=batch, channels_last=self.cl)
        rep = {"raw": raw, "ema": ema}[weights]
        return {"model": self.name, "top1": rep["top1"], "top5": rep["top5"], "weights": weights,
                "raw_top1": raw["top1"], "ema_top1": ema["top1"], "updates": self.step_n,
                "planned_updates": getattr(self, "planned_updates", self.step_n),
                "cut_by_deadline": getattr(self, "cut_by_deadline", False),
                "train_images": self.images, "train_s": round(self.busy_s, 1),
                "img_per_s": round(self.images / max(self.busy_s, 1e-9), 1),
                "params": sum(p.numel() for p in self.model.parameters()),
                "data_digest": self.data_digest.hexdigest()[:16]}

    def save(self, path: Path, preprocessing: dict) -> list[str]:
        """Raw weights to ``path``, EMA weights to ``<stem>_ema.safetensors``, each written atomically:
        a repvit checkpoint (with the data's ``preprocessing``) for RepViT models, a timm state dict otherwise."""
        import repvit
        from repvit.models import RepViT
        from repvit.weights.io import write_state_dict
        written = []
        for module, dest in ((self.model, path), (self.ema.module, path.with_name(f"{path.stem}_ema.safetensors"))):
            if isinstance(module, RepViT):
                repvit.save_checkpoint(module, dest, preprocessing=preprocessing)
            else:
                write_state_dict(module.state_dict(), dest)
            written.append(str(dest))
        return written


class DataRNG:
    """Augmentation randomness on its own stream (torch, python, numpy), swapped in only while a batch is drawn.

    Models consume the global RNG differently (initialisation, dropout, drop-path), so without this two
    processes training different models on the same seed would see different augmentations after the first
    batch; with it, every process of a comparison draws bit-identical batches.
    """

    def __init__(self, seed: int) -> None:
        import numpy as np
        outer = self._get()
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.state = self._get()
        self._set(outer)

    @staticmethod
    def _get():
        import numpy as np
        return torch.get_rng_state(), random.getstate(), np.random.get_state()

    @staticmethod
    def _set(state) -> None:
        import numpy as np
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])

    def next(self, it):
        outer = self._get()
        self._set(self.state)
        try:
            return next(it)
        finally:
            self.state = self._get()
            self._set(outer)


def side_by_side(trainers: list[Trainer], bundle, cfg: TrainConfig, epochs: float, deadline: float, log,
                 progress: list | None = None, on_progress=None) -> None:
    """Feed every trainer the same batches in turn until ``epochs`` are done or the deadline passes.

    With ``progress`` (a list), the EMA weights are evaluated at every epoch end and appended to it.
    """
    gb = cfg.run.batch_size
    sampler = GlobalBatchSampler(len(bundle.train), gb, seed=cfg.run.seed)
    total = trainers[0].sched.t_initial
    done, epoch = 0, 0
    data_rng = DataRNG(cfg.run.seed + 1)
    while done < total:
        sampler.set_epoch(epoch)
        loader = DataLoader(bundle.train, batch_sampler=sampler, collate_fn=bundle.collate,
                            generator=torch.Generator().manual_seed(epoch))
        it = iter(loader)
        in_epoch = 0
        while True:
            try:
                x, y, _ = data_rng.next(it)
            except StopIteration:
                break
            in_epoch += 1
            order = trainers if done % 2 == 0 else trainers[::-1]   # alternate who goes first
            for t in order:
                t.step(x, y)
            done += 1
            if done % 50 == 0:
                log(f"  update {done}/{total}: " + ", ".join(
                    f"{t.name} loss {t.loss_sum / t.step_n:.3f} {t.images / t.busy_s:.0f} img/s" for t in trainers))
            if done >= total or time.time() > deadline:
                break
        epoch += 1
        if progress is not None and done < total:
            row = {"epoch": epoch, "updates": done}
            if in_epoch < len(sampler):   # cut off by the deadline: not a whole epoch
                row["partial"] = True
            for t in trainers:
                r = evaluate(t.ema.module, bundle.val, device=torch.device("cpu"), batch_size=256, channels_last=t.cl)
                row[t.name] = {"ema_top1": r["top1"], "train_s": round(t.busy_s, 1)}
            progress.append(row)
            log(f"  epoch {epoch} done: {json.dumps(row)}")
            if on_progress:
                on_progress()
        if time.time() > deadline:
            log(f"  budget reached after {done} updates ({done / max(1, len(sampler)):.2f} epochs)")
            break
    for t in trainers:   # recorded with the results: a run cut by the safety deadline is not the planned one
        t.planned_updates, t.cut_by_deadline = total, done < total


def comparison_model(name: str) -> nn.Module:
    """Ours for RepViT names, timm's for anything else (e.g. mobilenetv3_large_100); 10 classes, 1 channel."""
    from repvit.models import list_models
    if name in list_models():
        return build_model(name, num_classes=10, in_chans=1)
    import timm
    return timm.create_model(name, num_classes=10, in_chans=1)


def run_parallel(args, part: str, arms: list[str], epochs: float, root: Path, log) -> list[dict]:
    """Run each arm of a comparison in its own single-thread process (one per core), then read their results.

    The arms see bit-identical batches (same sampler seed, :class:`DataRNG`), so this is the same experiment
    as stepping them in turn in one process, in about half the wall time on a 2-core machine.
    """
    procs = []
    for arm in arms:
        sub = root / part / arm
        cmd = [sys.executable, str(Path(__file__).resolve()), "--parts", part, "--arms", arm,
               "--epochs" if part == "main" else "--abl-epochs", repr(epochs),
               "--budget-minutes", str(args.budget_minutes), "--res", str(args.res),
               "--batch", str(args.batch), "--threads", "1", "--out-dir", str(sub), "--tag", arm]
        if args.lr:
            cmd += ["--lr", repr(args.lr)]
        cmd += ["--weights", args.weights]
        for kv in args.overrides:
            cmd += ["--set", kv]
        if part == "distill" and args.teacher_ckpt:
            cmd += ["--teacher-ckpt", args.teacher_ckpt, "--teacher", args.teacher, "--student", args.student]
        if args.quick:
            cmd.append("--quick")
        procs.append((arm, sub, subprocess.Popen(cmd)))
    try:
        while any(proc.poll() is None for _, _, proc in procs):   # notice a failed arm while others still run
            failed = [(arm, proc.returncode) for arm, _, proc in procs if proc.returncode not in (None, 0)]
            if failed:
                raise RuntimeError(f"{part} arm {failed[0][0]} failed (exit {failed[0][1]}); see its log above")
            time.sleep(2)
        failed = [(arm, proc.returncode) for arm, _, proc in procs if proc.returncode != 0]
        if failed:
            raise RuntimeError(f"{part} arm {failed[0][0]} failed (exit {failed[0][1]}); see its log above")
    finally:
        for _, _, proc in procs:          # never leave an arm running behind a failure
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    results = [json.loads((sub / "fashion_mnist.json").read_text()) for _, sub, _ in procs]
    rows = [row for r in results for row in (r[part]["students"] if part == "distill" else r[part])]
    digests = {row["model"]: row.get("data_digest") for row in rows}
    if len(set(digests.values())) > 1:
        raise RuntimeError(f"{part}: the arms did not see the same batches ({digests}); the comparison is invalid")
    return results


def merge_progress(per_arm: list[list[dict]]) -> list[dict]:
    """Join the per-epoch progress rows of parallel arms by epoch."""
    rows: dict[int, dict] = {}
    for arm_rows in per_arm:
        for row in arm_rows:
            merged = rows.setdefault(row["epoch"], {"epoch": row["epoch"], "updates": row["updates"]})
            merged.update({k: v for k, v in row.items() if k not in PROGRESS_KEYS})
            if row.get("partial"):      # any arm cut off by its deadline makes the joined row partial
                merged["partial"] = True
    return [rows[e] for e in sorted(rows)]


PROGRESS_KEYS = ("epoch", "updates", "partial")   # the keys of a progress row that are not model names


def speed(args, log) -> dict:
    """Training images/s: ours vs timm's RepViT-M0.9, and channels_last / bf16 / compile effects (median of rounds)."""
    import timm
    x = torch.randn(args.batch, 1, args.res, args.res)
    y = torch.randint(0, 10, (args.batch,))

    def make(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        m = build_model("repvit_m0_9", num_classes=10, in_chans=1) if kind == "ours" else \
            timm.create_model("repvit_m0_9", num_classes=10, in_chans=1, distillation=False)   # one head, as ours
        return m, torch.optim.AdamW(m.parameters(), 1e-3)

    def step(m, opt, cl: bool, bf16: bool) -> float:
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(m(xi).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    configs = {"ours": ("ours", False, False), "timm": ("timm", False, False),
               "ours_channels_last": ("ours", True, False), "ours_bf16": ("ours", False, True),
               "ours_channels_last_bf16": ("ours", True, True), "timm_channels_last": ("timm", True, False)}
    if args.speed_compile:
        configs["ours_channels_last_compile"] = ("ours", True, False)
    models = {}
    for name, (kind, cl, _) in configs.items():
        m, opt = make(kind)
        if cl:
            m.to(memory_format=torch.channels_last)
        # the compiled arm shares nothing with the eager ones; its parameters live in the wrapped module
        models[name] = (torch.compile(m), opt) if name.endswith("_compile") else (m, opt)
    times: dict[str, list[float]] = {k: [] for k in configs}
    compile_s = None
    for name, (m, opt) in models.items():          # warm-up (the compiled arm compiles here: timed separately)
        t0 = time.perf_counter()
        for _ in range(2 if name.endswith("_compile") else 1):
            step(m, opt, configs[name][1], configs[name][2])
        if name.endswith("_compile"):
            compile_s = round(time.perf_counter() - t0, 1)
    for r in range(args.speed_rounds):              # interleaved rounds, order rotated each round
        names = list(configs)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            m, opt = models[name]
            times[name].append(step(m, opt, configs[name][1], configs[name][2]))
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"img_per_s": round(args.batch / med, 1), "median_step_s": round(med, 4),
                     "spread_s": [round(min(ts), 4), round(max(ts), 4)]}
    ratios = [t_timm / t_ours for t_ours, t_timm in zip(times["ours"], times["timm"])]
    out["ratio_ours_over_timm"] = {"median": round(statistics.median(ratios), 3),
                                   "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    # like ours/timm: the median of per-round ratios (both arms of a round saw the same machine load)
    for key, arm in (("ratio_channels_last_ours", "ours_channels_last"), ("ratio_bf16_ours", "ours_bf16")):
        r = [a / b for a, b in zip(times["ours"], times[arm])]
        out[key] = {"median": round(statistics.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}
    if "ours_channels_last_compile" in times:
        r = [e / c for e, c in zip(times["ours_channels_last"], times["ours_channels_last_compile"])]
        out["ratio_compile_ours_channels_last"] = {"median": round(statistics.median(r), 3),
                                                   "min": round(min(r), 3), "max": round(max(r), 3)}
        out["compile_warmup_s"] = compile_s
    log(f"speed: {json.dumps(out)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-minutes", type=float, default=60.0,
                    help="training-time budget of RepViT-M0.9 in the main comparison (MobileNetV3-L gets the same "
                         "number of updates; wall time is about twice this plus evaluation)")
    ap.add_argument("--quick", action="store_true", help="subset of the data, minutes instead of an hour")
    ap.add_argument("--epochs", type=float, help="epochs of the main comparison (default: fitted to the budget)")
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, help="peak learning rate (default: the fashion_mnist_full recipe's, "
                                             "tuned for batch 128)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the fashion_mnist_full recipe for every model compared "
                         "(e.g. --set aug.reprob=0); repeatable, recorded in the results")
    ap.add_argument("--weights", choices=["raw", "ema"], default="raw",
                    help="which trained weights top1/top5 report (fixed before the run; both are recorded)")
    ap.add_argument("--parts", default="speed,main,reparam,distill")
    ap.add_argument("--speed-rounds", type=int, default=7)
    ap.add_argument("--speed-compile", action="store_true",
                    help="speed part: add a torch.compile'd channels_last arm (compiles for a few minutes on CPU)")
    ap.add_argument("--main-models", default="repvit_m0_9,mobilenetv3_large_100",
                    help="models of the main comparison (ours for RepViT names, timm's otherwise)")
    ap.add_argument("--parallel", action="store_true",
                    help="train each model of a comparison in its own 1-thread process (one per core), same batches")
    ap.add_argument("--tag", default="", help="prefix for log lines (set for the per-arm processes of --parallel)")
    ap.add_argument("--arms", help="run only these arms of the selected part (used by --parallel's per-arm processes)")
    ap.add_argument("--abl-epochs", type=float, help="epochs of each ablation arm (default: --epochs, else 1)")
    ap.add_argument("--teacher", default="repvit_m1_5", help="teacher of the distillation ablation (trained first)")
    ap.add_argument("--teacher-threads", type=int, default=os.cpu_count() or 1,
                    help="threads for training the teacher (default: all CPUs; nothing else runs meanwhile)")
    ap.add_argument("--teacher-ckpt", help="use this trained teacher instead of training one")
    ap.add_argument("--student", default="repvit_m0_9", help="student of the distillation ablation")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing fashion_mnist.json in --out-dir (otherwise the run refuses to start)")
    args = ap.parse_args(argv)
    try:
        check_overrides(args.overrides)
        cfg = apply_overrides(load_recipe("fashion_mnist_full"), [
            f"data.img_size={args.res}", f"run.batch_size={args.batch}", f"run.global_batch={args.batch}",
            f"data.max_train_samples={6000 if args.quick else 'null'}",
            f"data.max_val_samples={2000 if args.quick else 'null'}",
            *([f"optim.lr={args.lr}"] if args.lr else []), *args.overrides])
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_dir = Path(args.out_dir)
    if (out_dir / "fashion_mnist.json").exists() and not args.overwrite and not args.arms:
        # every run writes a fresh results file: a second run into the same folder (say, an ablation after the
        # main comparison) would erase the first one's numbers
        ap.error(f"{out_dir / 'fashion_mnist.json'} holds earlier results; choose another --out-dir "
                 "or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{(time.time() - t_start) / 60:5.1f} min]{' ' + args.tag if args.tag else ''} {msg}", flush=True)

    bundle = build_data(cfg.data, cfg.aug, seed=0)
    if bundle.name != "fashion-mnist":
        log("NOTICE: Fashion-MNIST IDX files not found; results are on digits")
    parts = args.parts.split(",")
    teacher_facts: dict = {}
    if "distill" in parts and args.teacher_ckpt:   # before any training: a mismatched teacher stops the run now
        try:
            teacher_facts = check_teacher(args.teacher_ckpt, bundle.preprocessing,
                                          log if not args.arms else (lambda msg: None))   # the parent warns
        except ValueError as e:
            ap.error(str(e))
    steps_per_epoch = len(bundle.train) // args.batch
    results: dict = {"settings": {"quick": args.quick, "res": args.res, "batch": args.batch, "threads": args.threads,
                                  "train_images": len(bundle.train), "val_images": len(bundle.val),
                                  "budget_minutes": args.budget_minutes, "dataset": bundle.name, "lr": cfg.lr(),
                                  "torch": torch.__version__, "cpu_count": os.cpu_count(),
                                  "parallel": args.parallel, "overrides": args.overrides,
                                  "aug": {"reprob": cfg.aug.reprob, "smoothing": cfg.aug.smoothing,
                                          "hflip": cfg.aug.hflip, "pad_crop": cfg.aug.pad_crop},
                                  "weight_decay": cfg.optim.weight_decay, "ema_decay": cfg.ema.decay,
                                  "warmup_fraction": WARMUP_FRACTION}}

    def arms_in_processes() -> None:
        # --parallel: the arms train in 1-thread processes; --threads is then only this process's (the speed
        # part, the teacher trained here with --teacher-threads aside)
        results["settings"].update(threads=1, parent_threads=args.threads)

    def save() -> None:
        tmp = out_dir / ".fashion_mnist.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, out_dir / "fashion_mnist.json")
        tmp = out_dir / ".fashion_mnist.md.tmp"
        tmp.write_text(render_md(results))
        os.replace(tmp, out_dir / "fashion_mnist.md")

    def budget_epochs(share: float, n_models: float) -> float:
        if args.epochs:
            return args.epochs
        if args.quick:
            return 1.0
        # a short probe of M0.9's step time sets how many epochs fit into the budget share
        probe = Trainer("probe", build_model("repvit_m0_9", num_classes=10, in_chans=1), cfg, 1000)
        x, y = torch.randn(args.batch, 1, args.res, args.res), torch.randint(0, 10, (args.batch,))
        probe.step(x, y)                      # warm-up, not timed
        probe.busy_s = 0.0
        for _ in range(4):
            probe.step(x, y)
        per_update = probe.busy_s / 4 * n_models
        return max(0.25, args.budget_minutes * 60 * share / per_update / steps_per_epoch)

    if "speed" in parts:
        log("part speed: ours vs timm RepViT-M0.9 training step, channels_last, bf16")
        results["speed"] = speed(args, log)
        save()

    if "main" in parts:
        names = (args.arms or args.main_models).split(",")
        ep = budget_epochs(1.0, 1.0)
        total = max(1, int(ep * steps_per_epoch))
        log(f"part main: {' vs '.join(names)}, {ep:.2f} epochs = {total} updates each"
            + (", one process (core) per model" if args.parallel else ""))
        if args.parallel and len(names) > 1:
            arms_in_processes()
            subs = run_parallel(args, "main", names, ep, out_dir / "_parallel", log)
            results["main"] = [row for sub in subs for row in sub["main"]]
            results["main_progress"] = merge_progress([sub.get("main_progress", []) for sub in subs])
            results["main_epochs"] = subs[0]["main_epochs"]
            results["weights"] = [w for sub in subs for w in sub.get("weights", [])]
        else:
            tr = [Trainer(n, comparison_model(n), cfg, total) for n in names]
            results["main_progress"] = []
            side_by_side(tr, bundle, cfg, ep, t_start + 2.2 * args.budget_minutes * 60, log,
                         progress=results["main_progress"], on_progress=save)
            results["main"] = [t.result(bundle.val, 256, args.weights) for t in tr]
            results["main_epochs"] = round(tr[0].step_n / steps_per_epoch, 3)
            results["weights"] = [w for t in tr for w in t.save(out_dir / f"{t.name}.safetensors", bundle.preprocessing)]
        log(f"main: {json.dumps(results['main'])}")
        save()

    abl_epochs = args.abl_epochs or args.epochs or (0.5 if args.quick else 1.0)
    abl_total = max(1, int(abl_epochs * steps_per_epoch))
    far = time.time() + 10 * 24 * 3600
    arms = args.arms.split(",") if args.arms else None

    # the distillation arms are named after the student: m0_9_hard_kd / m0_9_no_kd for the default M0.9
    kd_arms = [f"{args.student.removeprefix('repvit_')}_{kind}" for kind in ("hard_kd", "no_kd")]

    def student(arm: str) -> Trainer:
        """One arm of an ablation: re-param branches on/off, or the student with/without hard KD."""
        if arm == "reparam_off":
            return Trainer(arm, strip_reparam_branches(build_model("repvit_m0_9", num_classes=10, in_chans=1)),
                           cfg, abl_total)
        if arm == kd_arms[0]:
            if not args.teacher_ckpt:
                raise ValueError(f"arm {arm} needs --teacher-ckpt")
            import repvit
            teacher = FrozenTeacher(repvit.create_model(args.teacher, checkpoint=args.teacher_ckpt))
            return Trainer(arm, build_model(args.student, num_classes=10, in_chans=1, distillation=True), cfg,
                           abl_total, teacher=teacher)
        if arm == kd_arms[1]:
            return Trainer(arm, build_model(args.student, num_classes=10, in_chans=1), cfg, abl_total)
        if arm == "reparam_on":
            return Trainer(arm, build_model("repvit_m0_9", num_classes=10, in_chans=1), cfg, abl_total)
        raise ValueError(f"unknown ablation arm {arm!r}")

    def ablation(part: str, default_arms: list[str]) -> list[dict]:
        todo = arms or default_arms
        if args.parallel and len(todo) > 1:
            arms_in_processes()
            subs = run_parallel(args, part, todo, abl_epochs, out_dir / "_parallel", log)
            return [row for sub in subs
                    for row in (sub[part]["students"] if part == "distill" else sub[part])]
        tr = [student(a) for a in todo]
        side_by_side(tr, bundle, cfg, abl_epochs, far, log)
        return [t.result(bundle.val, 256, args.weights) for t in tr]

    if "reparam" in parts:
        log(f"part reparam: M0.9 with vs without re-param branches, {abl_total} updates each")
        results["reparam"] = ablation("reparam", ["reparam_on", "reparam_off"])
        save()

    if "distill" in parts:
        if args.teacher_ckpt and args.arms:   # a per-arm process of --parallel: the parent has the teacher
            results["distill"] = {"students": ablation("distill", kd_arms)}
        elif args.teacher_ckpt:   # a teacher trained elsewhere (e.g. a long `repvit train` run): report its accuracy
            import repvit
            log(f"part distill: teacher {args.teacher} from {args.teacher_ckpt}, then {args.student} +/- hard KD")
            t_eval = evaluate(repvit.create_model(args.teacher, checkpoint=args.teacher_ckpt), bundle.val,
                              device=torch.device("cpu"), batch_size=256)
            results["distill"] = {"teacher_eval": {"model": args.teacher, "checkpoint": args.teacher_ckpt,
                                                   "top1": t_eval["top1"], "top5": t_eval["top5"], **teacher_facts}}
            if teacher_facts.get("teacher_selected_on_test_split"):
                results["distill"]["teacher_selected_on_test_split"] = True
            log(f"teacher top-1 {t_eval['top1']:.2f} %")
            results["distill"]["students"] = ablation("distill", kd_arms)
        else:
            import repvit
            name = args.teacher
            log(f"part distill: teacher {name} trained first ({abl_total} updates, {args.teacher_threads} "
                f"thread(s)), then {args.student} +/- hard KD")
            torch.set_num_threads(args.teacher_threads)
            teacher_t = Trainer(f"teacher_{name}", build_model(name, num_classes=10, in_chans=1), cfg, abl_total)
            side_by_side([teacher_t], bundle, cfg, abl_epochs, far, log)
            torch.set_num_threads(args.threads)
            t_res = teacher_t.result(bundle.val, 256, args.weights)
            teacher_model = teacher_t.ema.module if t_res["weights"] == "ema" else teacher_t.model
            args.teacher_ckpt = str(out_dir / "_parallel" / "distill" / "teacher.safetensors")
            Path(args.teacher_ckpt).parent.mkdir(parents=True, exist_ok=True)
            # with this run's preprocessing: the per-arm processes check it against their data
            repvit.save_checkpoint(copy.deepcopy(teacher_model), args.teacher_ckpt, preprocessing=bundle.preprocessing)
            results["distill"] = {"teacher": t_res, "students": ablation("distill", kd_arms)}
        save()

    results["wall_minutes"] = round((time.time() - t_start) / 60, 1)
    save()
    print(render_md(results))
    return 0


def render_md(r: dict) -> str:
    s = r["settings"]
    out = [f"Fashion-MNIST ({s['dataset']}, {s['train_images']} train / {s['val_images']} test images, "
           f"{s['res']}x{s['res']}, batch {s['batch']}, lr {s.get('lr', 0.002)}, {s['threads']} thread(s)"
           f"{' per arm process' if 'parent_threads' in s else ''}, "
           f"quick={s['quick']})"
           + (f"; recipe overrides: {', '.join(s['overrides'])}" if s.get("overrides") else ""), ""]

    def table(rows: list[dict]) -> None:
        out.append("| model | top-1 % | top-5 % | weights | updates | train s | img/s | params |")
        out.append("|---|---|---|---|---|---|---|---|")
        for x in rows:
            out.append(f"| {x['model']} | {x['top1']:.2f} | {x['top5']:.2f} | {x['weights']} | {x['updates']} | "
                       f"{x['train_s']} | {x['img_per_s']} | {x['params'] / 1e6:.2f}M |")
        out.append("")
    if "main" in r:
        out.append(f"**Main** (same batches, {r.get('main_epochs')} epochs each)")
        table(r["main"])
    if r.get("main_progress"):
        out.append("**Main, EMA top-1 at epoch ends**")
        names = [k for k in r["main_progress"][0] if k not in PROGRESS_KEYS]
        out.append("| epoch | " + " | ".join(names) + " |")
        out.append("|---|" + "---|" * len(names))
        for row in r["main_progress"]:
            epoch = f"{row['epoch']} (partial: cut by the deadline)" if row.get("partial") else row["epoch"]
            out.append(f"| {epoch} | " + " | ".join(
                f"{row[n]['ema_top1']:.2f} ({row[n]['train_s']:.0f} s)" for n in names) + " |")
        out.append("")
    if "reparam" in r:
        out.append("**Ablation: re-param branches**")
        table(r["reparam"])
    if "distill" in r:
        teacher = r["distill"].get("teacher", {}).get("model", "a larger teacher")
        if "teacher_eval" in r["distill"]:
            te = r["distill"]["teacher_eval"]
            teacher = f"{te['model']} ({Path(te['checkpoint']).name}, test top-1 {te['top1']:.2f} %"
            teacher += ", weights selected on the test split)" if te.get("teacher_selected_on_test_split") else ")"
        out.append(f"**Ablation: hard distillation from {teacher} trained first**")
        table([*([r["distill"]["teacher"]] if "teacher" in r["distill"] else []), *r["distill"]["students"]])
    if "speed" in r:
        sp = r["speed"]
        out.append("**Training throughput (median of interleaved rounds)**")
        out.append("| configuration | img/s | median step s | min..max s |")
        out.append("|---|---|---|---|")
        for k, v in sp.items():
            if isinstance(v, dict) and "img_per_s" in v:
                out.append(f"| {k} | {v['img_per_s']} | {v['median_step_s']} | {v['spread_s'][0]}..{v['spread_s'][1]} |")
        out.append("")
        out.append(f"ours / timm speed ratio: {sp['ratio_ours_over_timm']}; channels_last speed-up "
                   f"{sp['ratio_channels_last_ours']}x; bf16 speed-up {sp['ratio_bf16_ours']}x")
        if "ratio_compile_ours_channels_last" in sp:
            out.append(f"torch.compile speed-up over eager channels_last: {sp['ratio_compile_ours_channels_last']} "
                       f"(compile + first steps {sp['compile_warmup_s']} s, not in the medians)")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
