"""Built-in datasets, folder validation, corrupt-image skipping, and the global-batch sampler."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repvit.data import GlobalBatchSampler, build_data, validate_image_folder
from repvit.data.builtin import FASHION_MNIST_DIR, load_digits, load_fashion_mnist, read_idx
from repvit.train.config import AugConfig, DataConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    _write_idx(tmp_path / "x.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing.gz")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(),
                    reason=f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR}: optional system data "
                           "package, not a failure (Debian/Ubuntu: apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian_idx_files():
    d = load_fashion_mnist()
    assert d["train"][0].shape == (60000, 28, 28) and d["val"][0].shape == (10000, 28, 28)
    assert np.bincount(d["train"][1]).tolist() == [6000] * 10


def test_fashion_mnist_missing_falls_back_to_digits_with_notice(tmp_path):
    b = build_data(DataConfig(dataset="fashion-mnist", img_size=16, download_dir=str(tmp_path)), AugConfig())
    assert b.name == "digits" and any("Falling back" in n for n in b.notes)
    assert len(b.train) + len(b.val) == 1797


def _ignored_notes(bundle) -> list[str]:
    return [n for n in bundle.notes if "does not apply" in n]


def test_builtin_names_the_recipe_settings_it_does_not_apply_once():
    """An ImageNet recipe on a built-in: RandAugment, colour jitter, crop scale, erasing mode, bicubic/timm eval
    crop and 3-value normalisation have no effect there, and one notice says so; the built-in recipes get none."""
    from repvit.train.recipes import load_recipe
    for name in ("digits", "fashion_mnist"):
        cfg = load_recipe(name)
        assert _ignored_notes(build_data(cfg.data, cfg.aug, train=True)) == [], name
    cfg = load_recipe("repvit_m0_9_300e")          # auto_augment rand-m9-..., color_jitter 0.4
    cfg.data.dataset, cfg.data.img_size = "digits", 16
    notes = _ignored_notes(build_data(cfg.data, cfg.aug, train=True))
    assert len(notes) == 1 and "built-in dataset digits" in notes[0]
    assert "aug.auto_augment=rand-m9-mstd0.5-inc1" in notes[0] and "aug.color_jitter=0.4" in notes[0]
    for key in ("aug.scale", "aug.remode", "data.interpolation", "data.eval_crop", "data.mean"):
        assert key not in notes[0]
    data = DataConfig(dataset="digits", img_size=16, interpolation="lanczos", eval_crop="timm",
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    aug = AugConfig(auto_augment=None, color_jitter=0.0, scale=(0.5, 1.0), remode="const")
    notes = _ignored_notes(build_data(data, aug, train=True))
    assert len(notes) == 1
    for part in ("aug.scale=[0.5, 1.0]", "aug.remode=const", "data.interpolation=lanczos", "data.eval_crop=timm",
                 "data.mean=[0.485, 0.456, 0.406] (all but the first value)", "data.std=[0.229, 0.224, 0.225]"):
        assert part in notes[0], part
    assert "auto_augment" not in notes[0] and "color_jitter" not in notes[0]
    # evaluation (train=False) has no augmentation to ignore: only the data settings are named
    ev = _ignored_notes(build_data(data, AugConfig(), train=False))
    assert len(ev) == 1 and "data.eval_crop=timm" in ev[0] and "aug." not in ev[0]


def test_the_loop_logs_the_builtin_notice(tmp_path):
    from repvit.train import train
    from trainhelpers import tiny_config
    lines: list[str] = []
    train(tiny_config("aug.color_jitter=0.3", "schedule.epochs=1", "run.global_batch=8", "run.batch_size=8",
                      "run.max_steps_per_epoch=1", "data.max_train_samples=16", "data.max_val_samples=8",
                      "ema.enabled=false"), tmp_path / "run", log_fn=lines.append)
    assert sum("does not apply aug.color_jitter=0.3" in ln for ln in lines) == 1


def test_digits_split_is_deterministic_and_disjoint():
    a, b = load_digits(), load_digits()
    assert np.array_equal(a["val"][0], b["val"][0]) and len(a["train"][0]) == 1438
    tr = {x.tobytes() for x in a["train"][0]}
    assert sum(x.tobytes() in tr for x in a["val"][0]) < 20   # digits has a few duplicate images


def _folder(root: Path, classes=("cat", "dog"), n=4, size=20) -> Path:
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_folder_validation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_data(DataConfig(dataset=str(tmp_path / "nope")), AugConfig())
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no 'val/' folder"):
        build_data(DataConfig(dataset=str(tmp_path / "flat")), AugConfig())
    loose = tmp_path / "loose" / "val"
    loose.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    with pytest.raises(ValueError, match="no class folders .*1 images lie directly"):
        validate_image_folder(loose)
    root = _folder(tmp_path / "ds")
    (root / "val" / "empty_class").mkdir()
    with pytest.raises(ValueError, match="contain no images .*empty_class"):
        build_data(DataConfig(dataset=str(root)), AugConfig())
    with pytest.raises(FileNotFoundError, match="--data /path/to/imagenet"):
        build_data(DataConfig(dataset="imagenet"), AugConfig())
    mixed = _folder(tmp_path / "mixed")
    (mixed / "train" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "train" / "bird" / "0.png")
    with pytest.raises(ValueError, match=r"only in .*train: bird"):   # says which split has the extra class
        build_data(DataConfig(dataset=str(mixed)), AugConfig())


def test_corrupt_images_are_skipped_and_counted_in_training(tmp_path):
    from repvit.train import train
    from trainhelpers import tiny_config

    root = _folder(tmp_path / "ds", n=8)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    (root / "val" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    cfg = tiny_config(f"data.dataset={root}", "schedule.epochs=1", "data.img_size=16", "run.global_batch=8",
                      "run.batch_size=8", "data.num_workers=0", "data.max_val_samples=null",
                      "aug.auto_augment=rand-m9-mstd0.5-inc1", "aug.reprob=0.25")
    res = train(cfg, tmp_path / "run")
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    log = (tmp_path / "run" / "train.log").read_text()
    assert '"skipped_images": 1' in rows and "skipped 1 unreadable images" in log
    assert res.deploy_top1 is not None
    from repvit.train import evaluate_checkpoint
    out = evaluate_checkpoint(str(tmp_path / "run" / "best.safetensors"), str(root), img_size=16, num_workers=0)
    assert out["n"] == 16 and out["results"][0]["skipped"] == 1


def test_global_batch_sampler_layout():
    n, gb = 120, 24
    one = GlobalBatchSampler(n, gb, accum_steps=2, repeats=3, seed=1)
    r0 = GlobalBatchSampler(n, gb, world_size=2, rank=0, repeats=3, seed=1)
    r1 = GlobalBatchSampler(n, gb, world_size=2, rank=1, repeats=3, seed=1)
    for s in (one, r0, r1):
        s.set_epoch(4)
    a, b0, b1 = list(one), list(r0), list(r1)
    assert len(a) == 2 * (n // gb) and len(b0) == len(b1) == n // gb
    # micro-step m of one process == rank m of DDP
    assert a[0::2] == b0 and a[1::2] == b1
    # an epoch covers n samples; repeated augmentation: 3 copies of each chosen image, in different chunks
    flat = [i for batch in a for i in batch]
    assert len(flat) == n and all(flat.count(i) in (1, 2, 3) for i in set(flat))
    from collections import Counter
    first = Counter(a[0] + a[1])                     # the first global batch: 8 images x 3 copies
    assert len(first) == gb // 3 and set(first.values()) == {3}
    assert set(a[0]) == set(a[1])                    # the copies are spread over both micro-batches
    # epochs differ, seeds reproduce, resume skips exactly the consumed micro-batches
    one.set_epoch(5)
    assert list(one) != a
    one.set_epoch(4, start=3)
    assert list(one) == a[3:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(10, 16)


def test_sample_seeds_follow_the_position_not_the_layout():
    """(index, seed) pairs: the same per position for 1 process x 2 accumulation steps and 2 ranks, equal to the
    plain sampler's indices, distinct for the copies of repeated augmentation, and new each epoch."""
    n, gb = 120, 24
    plain = GlobalBatchSampler(n, gb, accum_steps=2, repeats=3, seed=1)
    one = GlobalBatchSampler(n, gb, accum_steps=2, repeats=3, seed=1, sample_seeds=True)
    r0, r1 = (GlobalBatchSampler(n, gb, world_size=2, rank=r, repeats=3, seed=1, sample_seeds=True) for r in (0, 1))
    for s in (plain, one, r0, r1):
        s.set_epoch(4)
    a = list(one)
    assert a[0::2] == list(r0) and a[1::2] == list(r1)
    assert [[i for i, _ in b] for b in a] == list(plain)
    pairs = [p for b in a for p in b]
    assert len({seed for _, seed in pairs}) == len(pairs)          # three copies of an image: three augmentations
    one.set_epoch(5)
    assert not {seed for b in one for _, seed in b} & {seed for _, seed in pairs}
    one.set_epoch(4, start=3)
    assert list(one) == a[3:]


def test_sample_seeding_reproduces_draws_and_restores_the_streams():
    import random

    import numpy as np
    import torch

    from repvit.data import preserved_rng, seed_sample

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    expected_next = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    with preserved_rng():
        seed_sample(123)
        first = draws()
        seed_sample(124)
        other = draws()
    assert draws() == expected_next                 # the outer streams continue as if nothing happened
    seed_sample(123)
    assert draws() == first and other != first


def test_tar_layout_through_the_one_format_option(tmp_path):
    import tarfile
    src = _folder(tmp_path / "src", classes=("a", "b", "c"), n=2)
    root = tmp_path / "tars"
    root.mkdir()
    for split in ("train", "val"):
        with tarfile.open(root / f"{split}.tar", "w") as t:
            for c in ("a", "b", "c"):
                t.add(src / split / c, arcname=c)
    for fmt in ("auto", "tar"):
        b = build_data(DataConfig(dataset=str(root), format=fmt, img_size=16), AugConfig(auto_augment=None))
        assert b.num_classes == 3 and len(b.train) == 6 and len(b.val) == 6
        assert sorted(b.val[i][1] for i in range(6)) == [0, 0, 1, 1, 2, 2]
        assert b.train[0][0].shape == (3, 16, 16)
    # a val archive lacking a class keeps the training archive's label indices (timm alone would renumber it)
    with tarfile.open(root / "val.tar", "w") as t:
        for c in ("a", "c"):
            t.add(src / "val" / c, arcname=c)
    b = build_data(DataConfig(dataset=str(root), format="tar", img_size=16), AugConfig(auto_augment=None))
    assert b.num_classes == 3 and sorted(b.val[i][1] for i in range(len(b.val))) == [0, 0, 2, 2]
    with tarfile.open(root / "val.tar", "w") as t:       # a class the training archive lacks: refused by name
        for c in ("a", "d"):
            t.add(src / "val" / ("a" if c == "a" else "b"), arcname=c)
    with pytest.raises(ValueError, match="only in val: d"):
        build_data(DataConfig(dataset=str(root), format="tar", img_size=16), AugConfig(auto_augment=None))
    # a single archive cannot be both splits of a training run, but can be evaluated
    with pytest.raises(ValueError, match="single archive"):
        build_data(DataConfig(dataset=str(root / "train.tar"), format="tar"), AugConfig())
    assert len(build_data(DataConfig(dataset=str(root / "train.tar"), format="tar", img_size=16), AugConfig(),
                          train=False).val) == 6
    (root / "val.tar").unlink()
    with pytest.raises(FileNotFoundError, match="no val.tar"):
        build_data(DataConfig(dataset=str(root), format="tar"), AugConfig())


def _tar_of_pngs(path: Path, images: dict[str, bytes]) -> None:
    import io
    import tarfile
    with tarfile.open(path, "w") as t:
        for name, data in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _solid_png(value: int, size: int = 12) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_corrupt_image_is_skipped_and_counted_not_replaced_by_its_neighbour(tmp_path):
    """timm's ImageDataset answers a corrupt image with the next index's sample; ours returns None (counted)."""
    import torch
    from torch import nn

    from repvit.data import skip_none_collate
    from repvit.train.evaluate import evaluate
    values = {f"{c}/{i}.png": 40 * k + 10 * i for k, c in enumerate(("a", "b", "c")) for i in range(2)}
    images = {name: _solid_png(v) for name, v in values.items()}
    images["b/0.png"] = images["b/0.png"][:len(images["b/0.png"]) // 2]        # truncated: cannot be decoded
    root = tmp_path / "tars"
    root.mkdir()
    _tar_of_pngs(root / "val.tar", images)
    b = build_data(DataConfig(dataset=str(root), format="tar", img_size=8, eval_crop="timm"), AugConfig(),
                   train=False)
    items = [b.val[i] for i in range(len(b.val))]
    assert len(items) == 6 and sum(it is None for it in items) == 1
    bad = next(i for i, it in enumerate(items) if it is None)
    assert b.val.reader.filename(bad) == "b/0.png" and b.val.targets[bad] == 1
    good = [it for it in items if it is not None]
    # every readable image once: no sample duplicated in place of the corrupt one
    firsts = sorted(round(float(x[0, 0, 0]), 4) for x, _ in good)
    assert len(set(firsts)) == 5
    assert sorted(y for _, y in good) == [0, 0, 1, 2, 2]
    assert skip_none_collate(items)[-1] == 1
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    r = evaluate(model, b.val, device=torch.device("cpu"), batch_size=4)
    assert r["n"] == 5 and r["skipped"] == 1


def test_auto_format_looks_at_the_requested_split(tmp_path):
    """An evaluation-only folder holding just val.tar is tar data, not a class folder without val/."""
    root = tmp_path / "evalonly"
    root.mkdir()
    _tar_of_pngs(root / "val.tar", {f"{c}/{i}.png": _solid_png(30 * i + 1) for c in ("a", "b") for i in range(2)})
    b = build_data(DataConfig(dataset=str(root), img_size=8), AugConfig(), train=False)
    assert len(b.val) == 4 and b.num_classes == 2 and sorted(b.val.targets) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="no 'test/' folder"):             # a split the folder does not have
        build_data(DataConfig(dataset=str(root), img_size=8, val_split="test"), AugConfig(), train=False)
    (root / "test.tar").write_bytes((root / "val.tar").read_bytes())
    assert len(build_data(DataConfig(dataset=str(root), img_size=8, val_split="test"), AugConfig(),
                          train=False).val) == 4
