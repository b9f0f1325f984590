"""What ``repvit eval`` (and the training loop) check about the data before computing anything: the dataset is the
one asked for (no silent Fashion-MNIST -> digits substitution), its format, its channel count, the ensemble members'
preprocessing, and the teacher-logit cache. Checkpoints are untrained repvit_m0_6 models written in tmp_path."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import repvit
import repvit.data.builtin as builtin
from repvit.cli import main
from repvit.train import evaluate_checkpoint, train

from trainhelpers import tiny_config


def _checkpoint(path: Path, *, in_chans: int, num_classes: int = 10, **pre) -> str:
    model = repvit.create_model("repvit_m0_6", num_classes=num_classes, in_chans=in_chans)
    prep = {"input_size": [in_chans, 16, 16], "mean": [0.5] * in_chans, "std": [0.25] * in_chans,
            "interpolation": "bilinear", "crop_pct": 1.0, **pre}
    repvit.save_checkpoint(model, path, preprocessing=prep)
    return str(path)


def _fake_fashion_mnist(root: Path, n_train: int = 8, n_val: int = 6) -> Path:
    """The four IDX files of Fashion-MNIST, with a few random images."""
    rng = np.random.RandomState(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        for kind, arr in (("images-idx3", rng.randint(0, 255, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.astype(np.uint8).tobytes())
    return root


def _rgb_folder(root: Path, splits=("train", "val"), classes=("a", "b"), n: int = 2) -> Path:
    rng = np.random.RandomState(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture
def no_debian_fashion_mnist(tmp_path, monkeypatch):
    """The Debian default folder replaced by an empty one (whether or not the package is installed here)."""
    empty = tmp_path / "no_fmnist"
    empty.mkdir()
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", str(empty))
    return empty


def test_eval_never_substitutes_digits_for_a_missing_fashion_mnist(tmp_path, no_debian_fashion_mnist, capsys):
    ck = _checkpoint(tmp_path / "fm.safetensors", in_chans=1)
    with pytest.raises(FileNotFoundError, match="cannot evaluate on Fashion-MNIST: .*not found in .*no_fmnist.*"
                                                "--download-dir"):
        evaluate_checkpoint(ck, "fashion-mnist", num_workers=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", ck, "--data", "fashion-mnist", "--download-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"not found in {empty}" in err and "never substitutes" in err


def test_eval_download_dir_flag_prints_the_dataset(tmp_path, no_debian_fashion_mnist, capsys):
    ck = _checkpoint(tmp_path / "fm.safetensors", in_chans=1)
    d = _fake_fashion_mnist(tmp_path / "fm")
    assert main(["eval", ck, "--data", "fashion-mnist", "--download-dir", str(d), "--workers", "0", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert "data: fashion-mnist" in out and res["data"] == "fashion-mnist" and res["n"] == 6 and res["notes"] == []


def test_eval_of_a_run_reads_fashion_mnist_from_the_runs_download_dir(tmp_path, monkeypatch):
    d = _fake_fashion_mnist(tmp_path / "fm", n_train=8)
    run = tmp_path / "run"
    train(tiny_config("data.dataset=fashion-mnist", f"data.download_dir={d}", "schedule.epochs=1",
                      "run.global_batch=4", "run.batch_size=4", "run.max_steps_per_epoch=1"), run)
    empty = tmp_path / "no_fmnist"
    empty.mkdir()
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", str(empty))
    res = evaluate_checkpoint(str(run / "last.pt"), "fashion-mnist", num_workers=0)
    assert res["data"] == "fashion-mnist" and res["n"] == 6 and [r["weights"] for r in res["results"]] == ["raw", "ema"]


def test_eval_format_option_is_passed_through(tmp_path, capsys):
    """An evaluation-only folder with val.tar: auto finds it, --format folder looks for val/ instead."""
    import tarfile
    src = _rgb_folder(tmp_path / "src", splits=("val",))
    root = tmp_path / "tars"
    root.mkdir()
    with tarfile.open(root / "val.tar", "w") as t:
        for c in ("a", "b"):
            t.add(src / "val" / c, arcname=c)
    ck = _checkpoint(tmp_path / "rgb.safetensors", in_chans=3, num_classes=2)
    for fmt in ("auto", "tar"):
        assert main(["eval", ck, "--data", str(root), "--format", fmt, "--workers", "0", "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 4
    assert main(["eval", ck, "--data", str(root), "--format", "folder", "--workers", "0"]) == 2
    assert "no 'val/' folder" in capsys.readouterr().err


def test_eval_refuses_a_checkpoint_whose_channels_differ_from_the_data(tmp_path):
    gray = _checkpoint(tmp_path / "gray.safetensors", in_chans=1, num_classes=2)
    with pytest.raises(ValueError, match=r"the checkpoint expects 1-channel \(grayscale\) images but .* gives "
                                         r"3-channel \(RGB\) ones: evaluate it on data like it was trained on"):
        evaluate_checkpoint(gray, str(_rgb_folder(tmp_path / "rgb", splits=("val",))), num_workers=0)
    rgb = _checkpoint(tmp_path / "rgb.safetensors", in_chans=3, num_classes=10)
    with pytest.raises(ValueError, match=r"expects 3-channel \(RGB\) images but digits gives 1-channel .*the "
                                         "built-in datasets are grayscale"):
        evaluate_checkpoint(rgb, "digits", num_workers=0, max_samples=4)


@pytest.mark.parametrize("key, value", [("interpolation", "bicubic"), ("crop_pct", 0.875)])
def test_eval_ensemble_members_must_share_interpolation_and_crop(tmp_path, key, value):
    a = _checkpoint(tmp_path / "a.safetensors", in_chans=1)
    b = _checkpoint(tmp_path / "b.safetensors", in_chans=1, **{key: value})
    with pytest.raises(ValueError, match=f"ensemble member .*b.safetensors was trained with {key} {value}"):
        evaluate_checkpoint(f"{a},{b}", "digits", num_workers=0, max_samples=4)


def test_training_refuses_models_whose_channels_differ_from_the_data(tmp_path):
    with pytest.raises(ValueError, match=r"model.in_chans=3\) expects 3-channel .* digits gives 1-channel .*drop "
                                         "model.in_chans"):
        train(tiny_config("model.in_chans=3"), tmp_path / "run")
    data = _rgb_folder(tmp_path / "rgb")
    gray = _checkpoint(tmp_path / "gray.safetensors", in_chans=1, num_classes=2)
    with pytest.raises(ValueError, match=r"model.pretrained .*gray.safetensors expects 1-channel .* gives 3-channel"):
        train(tiny_config(f"data.dataset={data}", f"model.pretrained={gray}"), tmp_path / "run2")
    with pytest.raises(ValueError, match=r"the teacher .*gray.safetensors.* expects 1-channel .* gives 3-channel"):
        train(tiny_config(f"data.dataset={data}", "distill.kind=hard", f"distill.teacher={gray}",
                          "distill.teacher_checkpoint=null"), tmp_path / "run3")


def test_a_cached_teacher_logit_file_of_another_training_set_is_recomputed(tmp_path):
    from repvit.data import build_data
    from repvit.train.loop import _cached_teacher_logits, _teacher_cache_key

    notes: list[str] = []
    path = tmp_path / "teacher_logits.pt"
    key = "k1"
    assert _cached_teacher_logits(path, 5, 3, key, notes.append) is None and not notes        # no cache yet
    good = torch.randn(5, 3)
    torch.save({"logits": good, "key": key}, path)
    assert torch.equal(_cached_teacher_logits(path, 5, 3, key, notes.append), good) and not notes
    for n, k in ((6, 3), (5, 4)):                     # another training-set size, another class count
        assert _cached_teacher_logits(path, n, k, key, notes.append) is None
    assert len(notes) == 2 and "shape (5, 3)" in notes[0] and "6 images of 3 classes" in notes[0]
    # the same shape computed for another teacher or training set (or a bare tensor of an older version)
    assert _cached_teacher_logits(path, 5, 3, "k2", notes.append) is None and "another teacher" in notes[-1]
    torch.save(good, path)
    assert _cached_teacher_logits(path, 5, 3, key, notes.append) is None
    # the key tells apart what the shape cannot: another teacher; a subset of the same size drawn with another seed
    cfg = tiny_config("data.max_train_samples=100", "distill.kind=hard", "distill.teacher=a.safetensors")
    b0 = build_data(cfg.data, cfg.aug, train=True, seed=0)
    b1 = build_data(cfg.data, cfg.aug, train=True, seed=1)
    assert len(b0.train) == len(b1.train) == 100
    k0 = _teacher_cache_key(cfg, b0.train)
    assert k0 == _teacher_cache_key(cfg, b0.train) and k0 != _teacher_cache_key(cfg, b1.train)
    cfg.distill.teacher = "b.safetensors"
    assert _teacher_cache_key(cfg, b0.train) != k0


def test_fine_tuning_warns_when_the_pretrained_weights_expect_other_normalisation(tmp_path):
    # digits are normalised with their own mean/std; a checkpoint trained with mean 0.5 / std 0.25 expects those
    other = _checkpoint(tmp_path / "other.safetensors", in_chans=1)
    lines: list[str] = []
    train(tiny_config(f"model.pretrained={other}", "run.max_steps_per_epoch=1", "schedule.epochs=1"),
          tmp_path / "run", log_fn=lines.append)
    warn = [ln for ln in lines if ln.startswith("warning: model.pretrained")]
    assert len(warn) == 1 and "mean (0.5,)" in warn[0] and "data.mean/data.std" in warn[0], lines
    # the same checkpoint fine-tuned with its own statistics: no warning
    lines.clear()
    train(tiny_config(f"model.pretrained={other}", "run.max_steps_per_epoch=1", "schedule.epochs=1",
                      "data.mean=[0.5]", "data.std=[0.25]"), tmp_path / "run2", log_fn=lines.append)
    assert not [ln for ln in lines if ln.startswith("warning: model.pretrained")], lines


def test_a_non_finite_loss_on_another_rank_is_not_reported_with_this_ranks_finite_value(tmp_path, monkeypatch):
    import repvit.train.dist as dist
    import repvit.train.loop as loop
    from repvit.train.dist import DistInfo
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t.add_(1.0))      # another rank saw a NaN
    di = DistInfo(rank=0, world_size=2)
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss \(on another rank\) at epoch 1, update 5"):
        loop._check_finite(torch.tensor(2.3026), di, 0, 4, 9, tmp_path)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t)
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss \(nan\)"):
        loop._check_finite(torch.tensor(float("nan")), di, 0, 4, 9, tmp_path)
