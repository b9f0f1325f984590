"""benchmarks/fashion_mnist.py without training: --set keys it ignores are refused, an external teacher's
preprocessing is checked against the run's data, and a progress row cut off by the deadline is marked partial."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import repvit
from repvit.models import build_model
from repvit.train.config import apply_overrides, config_to_dict
from repvit.train.recipes import load_recipe

from tests.conftest import load_script



@pytest.fixture(scope="module")
def fm():
    return load_script("fashion_mnist")


# ------------------------------------------------------------------------------------------- --set allowlist


@pytest.mark.parametrize("key", ["model.drop_path_rate=0.1", "aug.mixup=0.8", "schedule.warmup_epochs=1",
                                 "ema.enabled=false", "optim.clip_mode=agc", "run.amp=bf16",
                                 "run.channels_last=false", "schedule.epochs=10"])
def test_ignored_keys_are_refused_before_any_work(fm, tmp_path, capsys, key):
    out = tmp_path / "fm"
    with pytest.raises(SystemExit) as e:
        fm.main(["--set", "aug.reprob=0", "--set", key, "--parts", "main", "--out-dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--set {key.split('=')[0]}: not used by this script" in err, err   # only the refused key is named
    for allowed in ("optim.weight_decay", "aug.reprob", "ema.decay", "run.seed"):   # the allowed keys are listed
        assert allowed in err
    assert not out.exists()   # refused before the output folder or the data


def test_batch_and_resolution_keys_point_to_their_flags(fm):
    with pytest.raises(ValueError, match=r"run.batch_size: use --batch.*data.img_size: use --res"):
        fm.check_overrides(["run.batch_size=64", "data.img_size=48"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        fm.check_overrides(["aug.reprob"])


def test_every_allowed_key_is_a_recipe_key_and_the_trainer_reads_them(fm):
    """Each allowlisted key names a real recipe field (apply_overrides raises on unknown ones); the trainer is
    shown to read weight decay, the EMA decay and the warm-up (the other keys go through the same config)."""
    assert fm.check_overrides(["aug.reprob=0", "optim.clip_grad=null"]) == ["aug.reprob=0", "optim.clip_grad=null"]
    base = config_to_dict(load_recipe("fashion_mnist_full"))
    for key in fm.HONOURED_OVERRIDES:
        section, name = key.split(".")
        value = base[section][name]
        # an unknown key raises in apply_overrides: the allowlist names real fields
        apply_overrides(load_recipe("fashion_mnist_full"), [f"{key}={json.dumps(value)}"])
    cfg = apply_overrides(load_recipe("fashion_mnist_full"), ["optim.weight_decay=0.07", "ema.decay=0.9"])
    t = fm.Trainer("m", build_model("repvit_m0_6", num_classes=10, in_chans=1), cfg, 100)
    assert {g["weight_decay"] for g in t.opt.param_groups} == {0.0, 0.07}   # norms and biases: no decay
    assert t.ema.decay == 0.9
    assert t.sched.warmup_t == int(100 * fm.WARMUP_FRACTION)


def test_clip_grad_null_means_no_clipping(fm):
    cfg = apply_overrides(load_recipe("fashion_mnist_full"), ["optim.clip_grad=null", "data.img_size=32"])
    t = fm.Trainer("m", build_model("repvit_m0_6", num_classes=10, in_chans=1), cfg, 10)
    t.step(torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,)))
    assert t.step_n == 1 and t.clip is None


# ------------------------------------------------------------------------------------------- teacher checks

DATA_PRE = {"input_size": [1, 32, 32], "mean": [0.286], "std": [0.353], "interpolation": "bilinear", "crop_pct": 1.0}


def _teacher(path: Path, pre: dict | None, **metadata) -> str:
    m = build_model("repvit_m0_6", num_classes=10, in_chans=1)
    repvit.save_checkpoint(m, path, preprocessing=pre, metadata=metadata or None)
    return str(path)


@pytest.mark.parametrize("pre,what", [
    (dict(DATA_PRE, input_size=[1, 64, 64]), "input size [1, 64, 64]"),
    (dict(DATA_PRE, mean=[0.5], std=[0.5]), "mean [0.5]"),
])
def test_teacher_with_other_preprocessing_is_refused(fm, tmp_path, pre, what):
    path = _teacher(tmp_path / "teacher.safetensors", pre)
    with pytest.raises(ValueError, match="trained with other inputs") as e:
        fm.check_teacher(path, DATA_PRE, log=print)
    assert what in str(e.value)


def test_teacher_mismatch_stops_the_script_before_training(fm, tmp_path, capsys, monkeypatch):
    path = _teacher(tmp_path / "teacher.safetensors", dict(DATA_PRE, input_size=[1, 48, 48]))
    bundle = SimpleNamespace(name="fashion-mnist", preprocessing=DATA_PRE, train=[0] * 10, val=[0] * 2)
    monkeypatch.setattr(fm, "build_data", lambda *a, **k: bundle)
    monkeypatch.setattr(fm, "Trainer", None)   # any training would fail loudly
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)   # keep this test process's threads
    with pytest.raises(SystemExit) as e:
        fm.main(["--parts", "distill", "--teacher-ckpt", path, "--out-dir", str(tmp_path / "out")])
    assert e.value.code == 2 and "input size [1, 48, 48]" in capsys.readouterr().err


def test_teacher_selected_on_the_test_split_is_recorded_not_refused(fm, tmp_path):
    best = {"epoch": 3, "top1": 91.0, "source": "ema"}
    path = _teacher(tmp_path / "best.safetensors", DATA_PRE, train_best=best)
    logged = []
    facts = fm.check_teacher(path, DATA_PRE, log=logged.append)
    assert facts["teacher_selected_on_test_split"] is True and facts["teacher_train_best"] == best
    assert facts["teacher_preprocessing_checked"] is True
    assert any("train_best" in m and "test set" in m for m in logged)
    plain = fm.check_teacher(_teacher(tmp_path / "last.safetensors", DATA_PRE), DATA_PRE, log=logged.append)
    assert "teacher_selected_on_test_split" not in plain


# ------------------------------------------------------------------------------------------- progress rows


class _FakeTrainer:
    def __init__(self, name: str, total: int) -> None:
        self.name, self.cl = name, False
        self.sched = SimpleNamespace(t_initial=total)
        self.ema = SimpleNamespace(module=None)
        self.step_n, self.busy_s, self.images, self.loss_sum = 0, 1e-3, 0, 0.0

    def step(self, x, y) -> None:
        self.step_n += 1
        self.images += len(y)


def _run(fm, monkeypatch, total: int, deadline: float) -> list[dict]:
    monkeypatch.setattr(fm, "evaluate", lambda *a, **k: {"top1": 50.0})
    data = [(torch.zeros(1, 4, 4), i % 10) for i in range(8)]
    bundle = SimpleNamespace(train=data, val=None, collate=lambda b: (
        torch.stack([x for x, _ in b]), torch.tensor([y for _, y in b]), 0))
    cfg = SimpleNamespace(run=SimpleNamespace(batch_size=2, seed=0))   # 4 updates per epoch
    progress: list[dict] = []
    fm.side_by_side([_FakeTrainer("a", total)], bundle, cfg, 1.0, deadline, lambda m: None, progress=progress)
    return progress


def test_progress_row_cut_by_the_deadline_is_partial(fm, monkeypatch):
    (row,) = _run(fm, monkeypatch, total=100, deadline=time.time() - 1)   # past: stops after the first update
    assert row["partial"] is True and row["updates"] == 1
    rows = _run(fm, monkeypatch, total=6, deadline=time.time() + 600)    # one whole epoch, then the planned end
    assert rows == [{"epoch": 1, "updates": 4, "a": {"ema_top1": 50.0, "train_s": 0.0}}]


def test_partial_rows_survive_merging_and_rendering(fm):
    merged = fm.merge_progress([[{"epoch": 1, "updates": 4, "a": {"ema_top1": 80.0, "train_s": 10}}],
                                [{"epoch": 1, "updates": 4, "b": {"ema_top1": 70.0, "train_s": 11}, "partial": True}]])
    assert merged == [{"epoch": 1, "updates": 4, "a": {"ema_top1": 80.0, "train_s": 10},
                       "b": {"ema_top1": 70.0, "train_s": 11}, "partial": True}]
    settings = {"dataset": "fashion-mnist", "train_images": 8, "val_images": 2, "res": 32, "batch": 2, "threads": 1,
                "parent_threads": 2, "quick": True, "overrides": []}
    md = fm.render_md({"settings": settings, "main_progress": merged})
    assert "| 1 (partial: cut by the deadline) | 80.00 (10 s) | 70.00 (11 s) |" in md
    assert "1 thread(s) per arm process" in md
