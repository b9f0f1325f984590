"""benchmarks/int8_accuracy.py without training or quantizing: the cached model records its training settings and
is reused only when they match; --checkpoint files are checked against the dataset's preprocessing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import repvit
from repvit.models import build_model

from tests.conftest import load_script

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")   # the digits dataset


@pytest.fixture(scope="module")
def i8():
    return load_script("int8_accuracy")


@pytest.fixture
def fake_training(i8, monkeypatch):
    """train_model replaced by one that writes a tiny untrained checkpoint with the metadata it is given."""
    calls = []

    def fake(ds, variant, img, seconds, ckpt, seed=0, resume=False, metadata=None):
        info = {"steps": len(calls) + 1, "batch": 96, "seconds": seconds, "epochs": 0.1, "final_loss": 2.0}
        calls.append({"ds": ds, "seconds": seconds, "seed": seed, "resume": resume})
        repvit.save_checkpoint(build_model("repvit_m0_6", num_classes=10, in_chans=1), ckpt,
                               metadata=metadata(info) if metadata else None)
        return info

    monkeypatch.setattr(i8, "train_model", fake)
    return calls


def _args(tmp_path: Path, **kw) -> SimpleNamespace:
    base = dict(ckpt_dir=str(tmp_path), variant="repvit_m0_6", img=32, seed=0, train_seconds=600.0,
                train_seconds_digits=180.0, retrain=False, train_more=False)
    return SimpleNamespace(**{**base, **kw})


def test_cached_model_is_reused_only_with_the_same_training_settings(i8, fake_training, tmp_path, capsys):
    ckpt, rec, cached = i8.prepare_cached("digits", _args(tmp_path))
    assert not cached and len(fake_training) == 1
    assert rec == {"dataset": "digits", "variant": "repvit_m0_6", "img": 32, "seed": 0, "train_seconds": 180.0,
                   "steps": 1, "batch": 96, "seconds": 180.0, "epochs": 0.1, "final_loss": 2.0}
    assert i8.read_train_record(ckpt) == rec                       # stored in the checkpoint's metadata

    again, rec2, cached2 = i8.prepare_cached("digits", _args(tmp_path))
    assert (again, rec2, cached2) == (ckpt, rec, True) and len(fake_training) == 1   # reused, not retrained
    assert "reusing cached" in capsys.readouterr().out

    for kw, what in ((dict(train_seconds_digits=60.0), "train_seconds 180.0 (requested 60.0)"),
                     (dict(seed=1), "seed 0 (requested 1)")):
        with pytest.raises(ValueError, match="trained with other settings") as e:
            i8.prepare_cached("digits", _args(tmp_path, **kw))
        assert what in str(e.value) and "--retrain" in str(e.value)
    assert len(fake_training) == 1

    # --retrain trains anew with the requested settings
    _, rec3, cached3 = i8.prepare_cached("digits", _args(tmp_path, seed=1, retrain=True))
    assert not cached3 and rec3["seed"] == 1 and fake_training[-1] == {"ds": "digits", "seconds": 180.0, "seed": 1,
                                                                      "resume": False}


def test_train_more_continues_a_matching_model_and_records_the_session(i8, fake_training, tmp_path):
    i8.prepare_cached("digits", _args(tmp_path))
    _, rec, cached = i8.prepare_cached("digits", _args(tmp_path, train_more=True, train_seconds_digits=60.0))
    assert not cached and fake_training[-1]["resume"] is True and fake_training[-1]["seconds"] == 60.0
    assert rec["train_seconds"] == 180.0 and [m["train_seconds"] for m in rec["more"]] == [60.0]
    # a plain rerun with the first run's settings reuses it and reports the extra session
    _, rec2, cached2 = i8.prepare_cached("digits", _args(tmp_path))
    assert cached2 and rec2 == rec
    with pytest.raises(ValueError, match="seed 0 \\(requested 2\\)"):   # continuing needs the same seed
        i8.prepare_cached("digits", _args(tmp_path, train_more=True, seed=2))


def test_cache_without_a_record_is_refused(i8, tmp_path):
    repvit.save_checkpoint(build_model("repvit_m0_6", num_classes=10, in_chans=1),
                           tmp_path / "digits_repvit_m0_6_32.safetensors")
    with pytest.raises(ValueError, match="records no training settings"):
        i8.check_cached("digits", _args(tmp_path))
    assert i8.check_cached("digits", _args(tmp_path, retrain=True)) is None


def test_main_stops_on_a_mismatched_cache_before_any_work(i8, fake_training, tmp_path, capsys):
    i8.prepare_cached("digits", _args(tmp_path / "ck"))
    with pytest.raises(SystemExit) as e:
        i8.main(["--datasets", "digits", "--variant", "repvit_m0_6", "--img", "32", "--ckpt-dir", str(tmp_path / "ck"),
                 "--train-seconds-digits", "60", "--out-dir", str(tmp_path / "out")])
    assert e.value.code == 2 and "train_seconds 180.0 (requested 60.0)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and len(fake_training) == 1


# ------------------------------------------------------------------------------------------- --checkpoint


def _external(path: Path, pre: dict, **metadata) -> Path:
    repvit.save_checkpoint(build_model("repvit_m0_6", num_classes=10, in_chans=1), path, preprocessing=pre,
                           metadata=metadata or None)
    return path


def _digits_pre(i8, size: int = 32, **kw) -> dict:
    mean, std = i8.dataset_stats("digits")
    return {"input_size": [1, size, size], "mean": [mean], "std": [std], "interpolation": "bilinear",
            "crop_pct": 1.0, **kw}


def test_external_checkpoint_with_other_preprocessing_is_refused(i8, tmp_path):
    bad = _external(tmp_path / "bad.safetensors", _digits_pre(i8, mean=[0.5], std=[0.5]))
    with pytest.raises(ValueError, match=r"other inputs.*mean \[0\.5\]"):
        i8.check_external("digits", bad, None)
    ok = _external(tmp_path / "ok.safetensors", _digits_pre(i8))
    assert i8.check_external("digits", ok, None) == {"preprocessing_checked": True}
    assert i8.check_external("digits", ok, 32) == {"preprocessing_checked": True}
    with pytest.raises(ValueError, match=r"input size 32x32 \(--img 48\)"):
        i8.check_external("digits", ok, 48)
    rgb = _external(tmp_path / "rgb.safetensors", dict(_digits_pre(i8), input_size=[3, 32, 32]))
    with pytest.raises(ValueError, match="3 input channels"):
        i8.check_external("digits", rgb, None)


def test_external_checkpoint_selected_on_the_test_split_is_recorded(i8, tmp_path, capsys):
    best = {"epoch": 7, "top1": 97.5, "source": "raw"}
    path = _external(tmp_path / "best.safetensors", _digits_pre(i8), train_best=best)
    facts = i8.check_external("digits", path, None)
    assert facts == {"preprocessing_checked": True, "checkpoint_selected_on_test_split": True,
                     "checkpoint_train_best": best}
    assert "train_best" in capsys.readouterr().out
    md = i8.to_markdown({"variant": "repvit_m0_6", "machine": "m", "threads": 1, "repeats": 1, "datasets": {"digits": {
        "checkpoint": str(path), "variant": "repvit_m0_6", "train": None, "cached": False, **facts, "eval_images": 1,
        "accuracy": {}, "speed": {}, "preprocessing": _digits_pre(i8)}}})
    assert "selected on this held-out split" in md


def test_main_stops_on_a_mismatched_checkpoint_before_any_work(i8, tmp_path, capsys):
    path = _external(tmp_path / "m.safetensors", _digits_pre(i8, size=48))
    with pytest.raises(SystemExit) as e:
        i8.main(["--datasets", "digits", "--img", "32", "--checkpoint", f"digits={path}",
                 "--ckpt-dir", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out")])
    assert e.value.code == 2 and "input size 48x48 (--img 32)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    json.dumps(i8.check_external("digits", path, None))   # without --img the file's size is used: JSON-ready facts
