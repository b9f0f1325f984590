"""Recipes: every shipped one parses; ImageNet ones equal the official recipe; overrides and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from repvit.models import list_models
from repvit.train.config import TrainConfig, apply_overrides, config_from_dict, dump_yaml
from repvit.train.recipes import IMAGENET_VARIANTS, list_recipes, load_recipe, recipe_dict


# RepViT reference sheet, training_recipe_official (paper arXiv 2307.09283 / official repo): the values the ImageNet
# recipes must equal, copied here so the check runs (and fails) on any clone, with or without the sheet.
OFFICIAL = {
    "epochs": 300,
    "alt_epochs": 450,
    "batch_per_gpu": 256,
    "gpus": 8,
    "lr": "1e-3 * total_batch / 512 (4e-3 at 2048)",
    "optimizer": "AdamW, eps 1e-8, weight decay 0.025 (no decay on norm/bias)",
    "schedule": "cosine, 5 warmup epochs from 1e-6, min lr 1e-5",
    "clip_grad": "adaptive gradient clipping (unit-wise), factor 0.02",
    "ema": 0.99996,
    "amp": True,
    "augment": "RandomResizedCrop 224 bicubic, hflip, RandAugment rand-m9-mstd0.5-inc1, random erasing p=0.25 pixel "
               "mode, mixup 0.8, cutmix 1.0, label smoothing 0.1, repeated augmentation x3",
}
OFFICIAL_DISTILLATION = (
    "hard (DeiT-style): loss = 0.5 * CE(cls_head, mixed targets) + 0.5 * CE(dist_head, argmax(teacher)); teacher "
    "RegNetY-16GF (timm regnety_160, DeiT checkpoint, 82.9% top-1); soft variant = KL(student/T, teacher/T) * T^2")
# where the sheet lives on the development machine; when present, the copy above must still equal it
REF = Path("/work/shared/reference/repvit_reference.json")


def test_every_shipped_recipe_parses_and_round_trips():
    names = list_recipes()
    assert {"digits", "fashion_mnist"} <= set(names)
    for name in names:
        cfg = load_recipe(name)
        again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
        assert again == cfg, name


def test_imagenet_recipes_exist_for_all_nine_variants_and_schedules():
    assert set(IMAGENET_VARIANTS) == set(list_models())
    for v in IMAGENET_VARIANTS:
        for e in (300, 450):
            for suffix in ("", "_distill"):
                cfg = load_recipe(f"{v}_{e}e{suffix}")
                assert cfg.model.name == v and cfg.schedule.epochs == e
                assert (cfg.distill.kind == "hard") == bool(suffix)
                assert cfg.model.distillation == bool(suffix)


def test_imagenet_recipes_equal_official_defaults():
    off = OFFICIAL
    if REF.exists():   # the copy has not drifted from the sheet (no skip without it: the copy is the reference)
        sheet = json.loads(REF.read_text())["training_recipe_official"]
        assert {k: sheet[k] for k in OFFICIAL} == OFFICIAL
        assert sheet["distillation"] == OFFICIAL_DISTILLATION
    total = off["batch_per_gpu"] * off["gpus"]
    lr_factor = float(re.match(r"([\d.e-]+) \* total_batch / (\d+)", off["lr"]).group(1))
    lr_div = int(re.match(r"([\d.e-]+) \* total_batch / (\d+)", off["lr"]).group(2))
    wd = float(re.search(r"weight decay ([\d.]+)", off["optimizer"]).group(1))
    warm = re.search(r"(\d+) warmup epochs from ([\d.e-]+), min lr ([\d.e-]+)", off["schedule"])
    aa = re.search(r"(rand-[\w.-]+)", off["augment"]).group(1)
    names = [n for n in list_recipes() if re.match(r"repvit_m.*_\d+e", n)]
    assert len(names) == 9 * 2 * 2      # 9 variants x (300, 450 epochs) x (plain, distilled)
    for name in names:
        c = load_recipe(name)
        assert c.global_batch() == total == 2048
        assert c.run.batch_size == off["batch_per_gpu"]
        assert c.lr() == pytest.approx(lr_factor * total / lr_div)
        assert c.accum_steps(1) == 8 and c.lr(1) == c.lr(8)  # one GPU emulates the 2048 batch, same lr
        assert c.optim.opt == "adamw" and c.optim.weight_decay == wd and c.optim.eps == 1e-8
        assert c.schedule.sched == "cosine" and c.schedule.warmup_epochs == float(warm.group(1))
        assert c.schedule.warmup_lr == float(warm.group(2)) and c.schedule.min_lr == float(warm.group(3))
        assert c.optim.clip_mode == "agc" and c.optim.clip_grad == 0.02
        assert c.ema.enabled and c.ema.decay == off["ema"]
        assert c.aug.auto_augment == aa
        assert c.aug.reprob == 0.25 and c.aug.remode == "pixel"
        assert c.aug.mixup == 0.8 and c.aug.cutmix == 1.0 and c.aug.smoothing == 0.1
        assert c.aug.repeated_aug == 3
        assert c.data.interpolation == "bicubic" and c.data.img_size == 224
        assert c.schedule.epochs in (off["epochs"], off["alt_epochs"])
        assert c.run.amp == "fp16" and off["amp"] is True                 # fp16 autocast + gradient scaler
        assert c.model.drop_path_rate == 0.0 and c.model.drop_rate == 0.0  # the official models use no drop path
        assert list(c.optim.betas) == [0.9, 0.999] and list(c.aug.scale) == [0.08, 1.0] and c.aug.hflip == 0.5
        assert c.data.eval_crop == "official"                             # resize 256, centre crop 224
        # the official loop: lr stepped once per epoch (lr_scheduler.step(epoch)), best = the raw model's
        assert c.schedule.step_per == "epoch" and c.run.save_best_from == "raw"
        if name.endswith("_distill"):
            assert c.distill.kind == "hard" and c.distill.alpha == 0.5 and c.distill.tau == 1.0
            assert c.distill.teacher == "regnety_160"
            assert c.distill.teacher_checkpoint == "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth"
        else:
            assert c.distill.kind == "none" and not c.model.distillation


def test_fashion_mnist_48_is_the_documented_48x48_benchmark_run():
    """``repvit train --recipe fashion_mnist_48`` trains as ``benchmarks/fashion_mnist.py --epochs 12 --res 48
    --batch 256 --lr 0.003 --threads 2`` does (that script starts from ``fashion_mnist_full`` and warms up for
    5 % of the updates), so the CLI reproduces the documented 60-minute run."""
    bench = apply_overrides(load_recipe("fashion_mnist_full"), [
        "data.img_size=48", "run.batch_size=256", "run.global_batch=256", "optim.lr=0.003", "run.threads=2",
        "schedule.epochs=12", "schedule.warmup_epochs=0.6", "run.keep_last=2"])
    assert load_recipe("fashion_mnist_48") == bench


def test_fashion_mnist_64_is_the_documented_64x64_run():
    """``--recipe fashion_mnist_64 --set run.amp=bf16`` is the command line of the documented 34-epoch 64x64 run
    (docs/training.md, benchmarks/results/cli_r64_34e/config.yaml), so the best result is reproducible by name."""
    run = apply_overrides(load_recipe("fashion_mnist_48"), [
        "data.img_size=64", "schedule.epochs=34", "schedule.warmup_epochs=1.7", "model.drop_path_rate=0.1",
        "run.checkpoint_every_steps=117", "run.amp=bf16"])
    assert apply_overrides(load_recipe("fashion_mnist_64"), ["run.amp=bf16"]) == run
    # ... and equals the resolved config that run wrote into its directory
    recorded = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cli_r64_34e" / "config.yaml"
    assert config_from_dict(yaml.safe_load(recorded.read_text())) == run
    assert load_recipe("fashion_mnist_64").run.amp == "none"   # bf16 only where the CPU has it natively


def test_base_inherits_a_recipe_and_replaces_only_the_keys_it_names(tmp_path):
    """A ``base:`` recipe keeps every value of its parent it does not mention, section by section."""
    (tmp_path / "ft.yaml").write_text(
        "description: fine-tune the official M0.9 recipe on a folder\n"
        "base: repvit_m0_9_300e\n"
        "data: {dataset: /data/flowers, img_size: 160}\n"
        "schedule: {epochs: 30}\n")
    got = load_recipe(str(tmp_path / "ft.yaml"))
    want = apply_overrides(load_recipe("repvit_m0_9_300e"),
                           ["data.dataset=/data/flowers", "data.img_size=160", "schedule.epochs=30"])
    assert got == want
    assert got.schedule.warmup_epochs == 5 and got.data.interpolation == "bicubic"  # inherited, not reset
    # a base named by a relative path resolves against the file that names it, and chains
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ft2.yaml").write_text("base: ../ft.yaml\nschedule: {epochs: 10}\n")
    assert load_recipe(str(tmp_path / "sub" / "ft2.yaml")) == apply_overrides(got, ["schedule.epochs=10"])
    assert recipe_dict(str(tmp_path / "sub" / "ft2.yaml")).get("description") is None  # not inherited


def test_base_errors_name_the_file_and_the_problem(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match=r"cycle \(a.yaml -> b.yaml -> a.yaml\)"):
        load_recipe(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: fashion_mnist_fulll\n")
    with pytest.raises(ValueError, match="c.yaml, base 'fashion_mnist_fulll'.*Did you mean fashion_mnist_full"):
        load_recipe(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("base: [digits]\n")
    with pytest.raises(ValueError, match="'base:' must name a recipe"):
        load_recipe(str(tmp_path / "d.yaml"))
    (tmp_path / "e.yaml").write_text("base: digits\noptim: {lrr: 0.1}\n")
    with pytest.raises(ValueError, match="e.yaml.*Did you mean optim.lr"):
        load_recipe(str(tmp_path / "e.yaml"))


def test_set_overrides_and_errors():
    cfg = apply_overrides(TrainConfig(), ["optim.base_lr=5e-4", "run.batch_size=128", "aug.scale=[0.2, 1.0]"])
    assert cfg.optim.base_lr == 5e-4 and cfg.run.batch_size == 128 and cfg.aug.scale == (0.2, 1.0)
    assert cfg.accum_steps(1) == 16
    with pytest.raises(ValueError, match="Did you mean optim.base_lr"):
        config_from_dict({"optim": {"base_lrr": 1.0}})
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(TrainConfig(), ["optim.nope=1"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(TrainConfig(), ["run.batch_size=abc"])
    with pytest.raises(ValueError, match="distill.kind must be one of"):
        apply_overrides(TrainConfig(), ["distill.kind=medium"])
    with pytest.raises(ValueError, match="multiple of run.batch_size"):
        apply_overrides(TrainConfig(), ["run.batch_size=300"])
    with pytest.raises(ValueError, match="unknown recipe"):
        load_recipe("repvit_m0_9_301e")


@pytest.mark.parametrize("override,message", [
    ("run.global_batch=0", r"run.global_batch must be >= 1 \(or null\), got 0"),
    ("run.global_batch=-256", r"run.global_batch must be >= 1 \(or null\), got -256"),
    ("optim.lr_base_batch=0", r"optim.lr_base_batch must be >= 1, got 0"),
    ("run.max_steps_per_epoch=-1", r"run.max_steps_per_epoch must be >= 0 \(0 or null: no limit\), got -1"),
    ("run.threads=-2", r"run.threads must be >= 0 \(0 or null: no limit\)"),
    ("model.drop_path_rate=1", r"model.drop_path_rate must lie in \[0, 1\)"),
    ("optim.lr=-0.001", r"optim.lr must be >= 0, got -0.001"),
    ("optim.base_lr=-1e-3", r"optim.base_lr must be >= 0"),
    ("optim.weight_decay=-0.05", r"optim.weight_decay must be >= 0"),
    ("schedule.min_lr=-1e-5", r"schedule.min_lr must be >= 0"),
    ("schedule.warmup_lr=-1e-6", r"schedule.warmup_lr must be >= 0"),
    ("run.keep_last=-1", r"run.keep_last must be >= 0"),
    ("run.checkpoint_every_steps=-5", r"run.checkpoint_every_steps must be >= 0"),
    ("data.num_workers=-2", r"data.num_workers must be >= 0"),
    ("aug.mixup=-0.8", r"aug.mixup must be >= 0"),
    ("aug.pad_crop=-2", r"aug.pad_crop must be >= 0"),
    ("aug.hflip=1.5", r"aug.hflip must lie in \[0, 1\], got 1.5"),
    ("aug.reprob=-0.1", r"aug.reprob must lie in \[0, 1\]"),
    ("aug.mixup_prob=2", r"aug.mixup_prob must lie in \[0, 1\]"),
    ("aug.mixup_switch_prob=-0.5", r"aug.mixup_switch_prob must lie in \[0, 1\]"),
    ("aug.smoothing=1.1", r"aug.smoothing must lie in \[0, 1\]"),
    ("model.drop_rate=-0.2", r"model.drop_rate must lie in \[0, 1\)"),
    ("model.drop_path_rate=1.01", r"model.drop_path_rate must lie in \[0, 1\)"),
    # values that validated (and printed with --dry-run) but crashed the run with a raw traceback
    ("schedule.sched=none", r"schedule.sched must be one of"),
    ("schedule.sched=plateau", r"schedule.sched must be one of"),
    ("data.interpolation=bicubc", r"data.interpolation must be one of"),
    ("data.interpolation=random", r"data.interpolation must be one of"),
    ("optim.opt=adamww", r"optim.opt='adamww' is not a timm optimizer; did you mean adamw"),
    ("distill.tau=.nan", r"distill.tau must be > 0"),
    ("schedule.warmup_epochs=.nan", r"schedule.warmup_epochs must lie in"),
    ("data.std=[0.5, 0]", r"data.std must be positive"),
    ("data.mean=[.nan]", r"data.mean must be a list of numbers"),
    ("data.max_train_samples=-5", r"data.max_train_samples must be >= 0"),
    ("data.max_val_samples=-1", r"data.max_val_samples must be >= 0"),
    # a whole section would reset the recipe's other keys of it to the code defaults
    ("optim={opt: adamw}", r"--set optim=... names a whole section; set its keys one by one"),
])
def test_out_of_range_values_name_the_key_and_the_range(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), [override])


def test_lookahead_optimizers_are_accepted():
    """Accepted by the config and built by timm as Lookahead around AdamW."""
    from timm.optim import Lookahead

    from repvit.models import build_model
    from repvit.train.loop import build_optimization
    cfg = apply_overrides(TrainConfig(), ["optim.opt=lookahead_adamw"])
    assert cfg.optim.opt == "lookahead_adamw"
    opt, _ = build_optimization(cfg, build_model("repvit_m0_6", num_classes=2), world_size=1, updates_per_epoch=2)
    assert isinstance(opt, Lookahead) and isinstance(opt._base_optimizer, torch.optim.AdamW)


def test_range_limits_themselves_are_accepted():
    cfg = apply_overrides(TrainConfig(), [
        "run.global_batch=null", "run.global_batch=256", "optim.lr_base_batch=1", "run.max_steps_per_epoch=1",
        "optim.lr=0", "optim.weight_decay=0", "schedule.min_lr=0", "schedule.warmup_lr=0", "run.keep_last=0",
        "data.num_workers=0", "aug.hflip=1", "aug.reprob=0", "aug.smoothing=0", "model.drop_path_rate=0.99", "run.threads=0", "run.max_steps_per_epoch=0",
        "aug.mixup_prob=0", "aug.mixup_switch_prob=1"])
    assert cfg.global_batch(8) == 256 and cfg.lr(8) == 0.0
    assert apply_overrides(TrainConfig(), ["run.global_batch=null"]).global_batch(4) == 4 * 256


def test_cli_dry_run_prints_resolved_yaml(capsys):
    from repvit.cli import main

    def cli(*args):
        rc = main(list(args))
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, _ = cli("train", "--recipe", "repvit_m1_1_450e_distill", "--data", "/data/imagenet", "--epochs", "3",
                     "--set", "run.batch_size=64", "--dry-run")
    cfg = config_from_dict(yaml.safe_load(out))
    assert rc == 0 and cfg.model.name == "repvit_m1_1" and cfg.schedule.epochs == 3 and cfg.run.batch_size == 64
    assert cfg.data.dataset == "/data/imagenet" and cfg.distill.kind == "hard"
    assert config_from_dict(yaml.safe_load(cli("train", "--dry-run")[1])).data.dataset == "fashion-mnist"
    rc, _, err = cli("train", "--set", "optim.lrr=1", "--dry-run")
    assert rc == 2 and "Did you mean" in err
    # --resume keeps the saved config and directory: every flag that would change them is refused by name
    for extra, flag in [(["--epochs", "9"], "--epochs"), (["--seed", "1"], "--seed"), (["--out", "x"], "--out"),
                        (["--set", "run.seed=1"], "--set")]:
        rc, _, err = cli("train", "--resume", "/nonexistent/run", *extra)
        assert rc == 2 and flag in err, (extra, err)


def test_cpu_autocast_follows_native_bf16():
    """On CPU, fp16 means bf16 only where bf16 is native; without it fp16 trains in float32 and an explicit
    bf16 is kept but warned about (emulated bf16 measured 0.04x float32 on an AVX2 CPU)."""
    from repvit.train.evaluate import resolve_amp
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for asked, native, want, said in [("fp16", True, "bf16", "using bf16"), ("fp16", False, "none", "float32"),
                                      ("bf16", False, "bf16", "warning: run.amp=bf16"), ("bf16", True, "bf16", None),
                                      ("none", False, "none", None)]:
        logs: list[str] = []
        cfg = apply_overrides(TrainConfig(), [f"run.amp={asked}"])
        assert resolve_amp(cfg.run.amp, cpu, logs.append, native_bf16=native) == want, (asked, native)
        assert (said is None and not logs) or (said is not None and said in logs[0]), (asked, native, logs)
    assert resolve_amp(apply_overrides(TrainConfig(), ["run.amp=fp16"]).run.amp, cuda, print,
                       native_bf16=False) == "fp16"


def test_autocast_ctx_uses_the_resolved_dtype_without_remapping():
    """autocast_ctx takes an already-resolved mode: fp16 is fp16 even on CPU (the CPU remapping lives only in
    resolve_amp, so evaluate() and the training loop agree); unknown modes are an error, not a silent default."""
    from repvit.train.evaluate import autocast_ctx, resolve_amp
    cpu = torch.device("cpu")
    for mode, dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        with autocast_ctx(cpu, mode):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    with autocast_ctx(cpu, "none"):
        assert not torch.is_autocast_enabled("cpu")
    for bad in ("fp8", "float16"):
        with pytest.raises(ValueError, match="none, bf16, fp16"):
            autocast_ctx(cpu, bad)
        with pytest.raises(ValueError, match="none, bf16, fp16"):
            resolve_amp(bad, cpu)
    assert resolve_amp("fp16", cpu, native_bf16=False) == "none"
