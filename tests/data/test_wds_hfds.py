"""data.format=wds (webdataset shards + timm's _info.json) and hfds (Hugging Face datasets), built in tmp_path.

Reading webdataset shards needs no extra package (our reader indexes the tar files); the cross-check against
timm's own streaming reader needs ``webdataset``, and the Hugging Face tests need ``datasets``.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repvit.data import build_data
from repvit.train.config import AugConfig, DataConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

CLASSES = ("ant", "bee", "cat")
AUG = AugConfig(auto_augment=None)


def _png(rng: np.random.RandomState, size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def _labels(n: int, offset: int = 0) -> list[int]:
    return [(i + offset) % len(CLASSES) for i in range(n)]


def make_wds(root: Path, *, shards=(("train", 9), ("train", 6), ("validation", 6)), info=True,
             corrupt: set[str] = frozenset()) -> dict[str, list[int]]:
    """timm's webdataset layout: ROOT/_info.json + ROOT/tiny-<split>-NNNN.tar with KEY.png + KEY.cls members."""
    rng = np.random.RandomState(0)
    root.mkdir(parents=True)
    splits: dict[str, dict] = {}
    labels: dict[str, list[int]] = {}
    for split, n in shards:
        s = splits.setdefault(split, {"name": split, "filenames": [], "shard_lengths": [], "num_samples": 0})
        fname = f"tiny-{split}-{len(s['filenames']):04d}.tar"
        ys = _labels(n, offset=len(labels.get(split, [])))
        with tarfile.open(root / fname, "w") as t:
            for i, y in enumerate(ys):
                key = f"{split}_{len(s['filenames'])}_{i:05d}"
                _add(t, f"{key}.png", b"garbage, not a png" if key in corrupt else _png(rng))
                _add(t, f"{key}.cls", str(y).encode())
                _add(t, f"{key}.json", json.dumps({"filename": f"{key}.png"}).encode())
        s["filenames"].append(fname)
        s["shard_lengths"].append(n)
        s["num_samples"] += n
        labels.setdefault(split, []).extend(ys)
    if info:
        (root / "_info.json").write_text(json.dumps({"name": "tiny", "splits": splits}))
    return labels


def _wds_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset=str(root), format=kw.pop("format", "wds"), img_size=16, val_split="validation", **kw)


def test_wds_shards_with_timm_info(tmp_path):
    root = tmp_path / "wds"
    labels = make_wds(root)
    for fmt in ("wds", "auto"):                      # auto: an _info.json means webdataset
        b = build_data(_wds_cfg(root, format=fmt), AUG)
        assert b.num_classes == 3 and len(b.train) == 15 and len(b.val) == 6
        assert b.train.targets == labels["train"] and b.val.targets == labels["validation"]
        assert [b.val[i][1] for i in range(6)] == labels["validation"]
        x, y = b.train[10]
        assert x.shape == (3, 16, 16) and y == labels["train"][10]
    # the subset option works on it (random access)
    b = build_data(_wds_cfg(root, max_train_samples=5), AUG)
    assert len(b.train) == 5


def test_wds_reads_what_timm_reads(tmp_path):
    pytest.importorskip("webdataset")
    from timm.data.readers.reader_wds import ReaderWds

    from repvit.data.wds import WdsDataset
    root = tmp_path / "wds"
    make_wds(root)
    for split in ("train", "validation"):
        ours = WdsDataset(root, split)
        theirs = list(ReaderWds(str(root), split=split, is_training=False))
        assert len(theirs) == len(ours)
        for i, (img, target) in enumerate(theirs):
            mine, label = ours[i]
            assert label == target and np.array_equal(np.asarray(mine), np.asarray(img))


def test_wds_bad_input_errors(tmp_path):
    root = tmp_path / "wds"
    make_wds(root)
    with pytest.raises(ValueError, match="split 'val' is not in .*splits: train, validation"):
        build_data(DataConfig(dataset=str(root), format="wds"), AUG)           # default val_split 'val'
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_data(_wds_cfg(tmp_path / "nope"), AUG)
    (root / "tiny-train-0001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="1 shard.* of split 'train' are missing: .*tiny-train-0001.tar"):
        build_data(_wds_cfg(root), AUG)
    info = json.loads((root / "_info.json").read_text())
    info["splits"]["train"] = {**info["splits"]["train"], "filenames": ["tiny-train-0000.tar"],
                               "shard_lengths": [9], "num_samples": 10}
    (root / "_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="declares 10 samples .* shards hold 9"):
        build_data(_wds_cfg(root), AUG)
    (root / "_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_data(_wds_cfg(root), AUG)
    bare = tmp_path / "bare"
    make_wds(bare, info=False)
    (bare / "tiny-validation-0000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="no _info.json and no shards named \\*validation-\\*.tar"):
        build_data(_wds_cfg(bare), AUG)


def test_wds_without_info_and_a_corrupt_image(tmp_path):
    root = tmp_path / "wds"
    labels = make_wds(root, info=False, corrupt={"train_0_00003"})
    for fmt in ("wds", "auto"):                      # auto finds shards named by split without an info file
        b = build_data(_wds_cfg(root, format=fmt), AUG)   # shards found by name: *-train-*.tar, *-validation-*.tar
        assert b.num_classes == 3 and len(b.train) == 15 and b.train.targets == labels["train"]
    assert b.train[3] is None and b.train[4] is not None      # unreadable: dropped by the collate and counted


def test_wds_one_epoch_cli_run(tmp_path):
    from trainhelpers import TINY, as_overrides, run_cli
    root = tmp_path / "wds"
    make_wds(root, shards=(("train", 24), ("train", 8), ("validation", 6)), corrupt={"train_1_00002"})
    out = tmp_path / "run"
    run_cli("train", "--recipe", "digits", "--data", str(root), "--out", str(out), "--epochs", "1",
            *as_overrides(TINY + ["data.format=wds", "data.val_split=validation", "run.global_batch=16",
                                  "run.batch_size=16", "data.max_val_samples=null"]))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 2 and rows[0]["skipped_images"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["deploy_top1"] is not None
    from repvit.train import evaluate_checkpoint
    ev = evaluate_checkpoint(str(out / "best.safetensors"), str(root), split="validation", data_format="wds",
                             num_workers=0)
    assert ev["n"] == 6


# ---------------------------------------------------------------------------------------------- Hugging Face

def _hf_split(datasets, n: int, offset: int = 0, corrupt: int | None = None):
    rng = np.random.RandomState(offset)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    images = [{"bytes": b"garbage" if i == corrupt else _png(rng), "path": None} for i in range(n)]
    return datasets.Dataset.from_dict({"image": images, "label": _labels(n, offset)}, features=feats)


def test_hfds_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "hf"
    datasets.DatasetDict({"train": _hf_split(datasets, 12, corrupt=5),
                          "validation": _hf_split(datasets, 6, offset=1)}).save_to_disk(str(root))
    for fmt in ("hfds", "auto"):                     # auto: dataset_dict.json means a saved DatasetDict
        b = build_data(_wds_cfg(root, format=fmt), AUG)
        assert b.num_classes == 3 and len(b.train) == 12 and len(b.val) == 6
        assert b.train.classes == list(CLASSES)
        assert b.train.targets == _labels(12) and [b.val[i][1] for i in range(6)] == _labels(6, 1)
        assert b.train[0][0].shape == (3, 16, 16)
        assert b.train[5] is None                    # unreadable image: skipped and counted, not a crash
    with pytest.raises(ValueError, match="no split 'val' .*splits: train, validation"):
        build_data(DataConfig(dataset=str(root), format="hfds"), AUG)
    with pytest.raises(ValueError, match="hfids .* not supported"):
        build_data(_wds_cfg(root, format="hfids"), AUG)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_data(_wds_cfg(tmp_path / "missing", format="hfds"), AUG)


@pytest.mark.parametrize("labels, says", [([[0, 1], [2], [1]], "holds a list"), (["cat", "dog", "cat"], "holds str 'cat'")])
def test_hfds_labels_that_are_not_class_indices(tmp_path, labels, says):
    datasets = pytest.importorskip("datasets")
    rng = np.random.RandomState(0)
    images = [{"bytes": _png(rng), "path": None} for _ in labels]
    split = datasets.Dataset.from_dict({"image": images, "labels": labels},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "labels": datasets.Dataset.from_dict(
                                                                       {"l": labels}).features["l"]}))
    root = tmp_path / "hf"
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(root))
    with pytest.raises(ValueError, match=f"label column 'labels' .*one integer class index per image; row 0 {says}"):
        build_data(_wds_cfg(root, format="hfds"), AUG)


def test_hfds_split_folders_and_parquet_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    per_split = tmp_path / "per_split"                # <split>/ folders, each a Dataset.save_to_disk
    _hf_split(datasets, 9).save_to_disk(str(per_split / "train"))
    _hf_split(datasets, 3, offset=2).save_to_disk(str(per_split / "val"))
    for fmt in ("hfds", "auto"):                     # auto recognises <split>/state.json too
        b = build_data(DataConfig(dataset=str(per_split), format=fmt, img_size=16), AUG)
        assert b.num_classes == 3 and len(b.train) == 9 and b.val.targets == _labels(3, 2)
    pq = tmp_path / "pq"                              # data files load_dataset opens (no hub access)
    pq.mkdir()
    _hf_split(datasets, 9).to_parquet(str(pq / "train-00000-of-00001.parquet"))
    _hf_split(datasets, 3, offset=2).to_parquet(str(pq / "validation-00000-of-00001.parquet"))
    b = build_data(_wds_cfg(pq, format="hfds", download_dir=str(tmp_path / "cache")), AUG)
    assert b.num_classes == 3 and len(b.train) == 9 and b.val.targets == _labels(3, 2)
    assert b.train.classes == list(CLASSES)
    with pytest.raises(ValueError, match="cannot load split 'val'"):
        build_data(DataConfig(dataset=str(pq), format="hfds", download_dir=str(tmp_path / "cache")), AUG)


def test_hfds_one_epoch_run(tmp_path):
    datasets = pytest.importorskip("datasets")
    from repvit.train import train
    from trainhelpers import tiny_config
    root = tmp_path / "hf"
    datasets.DatasetDict({"train": _hf_split(datasets, 32, corrupt=7),
                          "validation": _hf_split(datasets, 6, offset=1)}).save_to_disk(str(root))
    res = train(tiny_config(f"data.dataset={root}", "data.format=hfds", "data.val_split=validation",
                            "schedule.epochs=1", "run.global_batch=16", "run.batch_size=16",
                            "data.max_val_samples=null"), tmp_path / "run")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["step"] == 2 and row["skipped_images"] == 1     # every image is drawn once
    assert res.deploy_top1 is not None and res.summary["deploy_params"] > 0


def test_wds_bounded_open_shards_and_io_errors_propagate(tmp_path, monkeypatch):
    """Shard files stay open only up to a bound (ImageNet has ~1000 shards per split, per worker), and an I/O
    error is raised, not turned into a silently skipped "unreadable image"."""
    import repvit.data.wds as wds
    root = tmp_path / "wds"
    make_wds(root, shards=(("train", 3), ("train", 3), ("train", 3), ("validation", 3)))
    ds = wds.WdsDataset(root, "train")
    monkeypatch.setattr(wds, "MAX_OPEN_SHARDS", 2)
    for i in range(len(ds)):
        assert ds[i] is not None
        assert len(ds._files) <= 2
    ds.close()
    assert not ds._files
    (root / "tiny-train-0001.tar").write_bytes(b"")            # shard truncated after indexing
    with pytest.raises(OSError, match="shorter than when it was indexed"):
        ds[4]
    (root / "tiny-train-0002.tar").unlink()                    # shard gone
    with pytest.raises(FileNotFoundError):
        ds[7]
    assert ds[0] is not None


def test_wds_home_relative_path_and_text_json_labels(tmp_path, monkeypatch):
    """``~/...`` data paths are expanded, and a label stored as text in the sample's JSON ("2") is read."""
    monkeypatch.setenv("HOME", str(tmp_path))
    root = tmp_path / "wds"
    make_wds(root, shards=(("train", 4), ("validation", 3)))
    b = build_data(_wds_cfg(Path("~/wds")), AUG)
    assert len(b.train) == 4 and len(b.val) == 3
    # a shard whose samples carry the label only as a JSON string
    shard = root / "tiny-train-0001.tar"
    rng = np.random.RandomState(1)
    with tarfile.open(shard, "w") as t:
        for i, y in enumerate(("2", "0")):
            _add(t, f"txt_{i}.png", _png(rng))
            _add(t, f"txt_{i}.json", json.dumps({"label": y}).encode())
    info = json.loads((root / "_info.json").read_text())
    info["splits"]["train"]["filenames"].append(shard.name)
    info["splits"]["train"]["shard_lengths"].append(2)
    info["splits"]["train"]["num_samples"] += 2
    (root / "_info.json").write_text(json.dumps(info))
    b = build_data(_wds_cfg(Path("~/wds")), AUG)
    assert len(b.train) == 6 and b.train.targets[-2:] == [2, 0]


def _hf_named(datasets, names: list[str], labels: list[str]):
    """A split whose ClassLabel names are its own (as class_encode_column gives each split)."""
    rng = np.random.RandomState(len(labels))
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    images = [{"bytes": _png(rng), "path": None} for _ in labels]
    return datasets.Dataset.from_dict({"image": images, "label": [names.index(c) for c in labels]}, features=feats)


def test_hfds_validation_labels_use_the_training_class_indices(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "hf"
    train = _hf_named(datasets, ["cat", "dog", "fox"], ["cat", "dog", "fox", "dog", "cat", "fox"])
    val = _hf_named(datasets, ["dog", "fox"], ["fox", "dog", "dog"])     # per split: dog -> 0, fox -> 1
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(root))
    b = build_data(_wds_cfg(root, format="hfds"), AUG)
    assert b.num_classes == 3 and b.val.classes == ["cat", "dog", "fox"]
    assert b.val.targets == [2, 1, 1] and [b.val[i][1] for i in range(3)] == [2, 1, 1]
    # evaluation alone (repvit eval builds no training split) numbers them the same way: the model's indices
    ev = build_data(_wds_cfg(root, format="hfds"), AUG, train=False)
    assert ev.train is None and ev.num_classes == 3 and ev.val.targets == [2, 1, 1]
    # an eval-only dataset (no training split to read the order from) says that it could not check
    solo = tmp_path / "hf_val_only"
    datasets.DatasetDict({"validation": val}).save_to_disk(str(solo))
    ev = build_data(_wds_cfg(solo, format="hfds"), AUG, train=False)
    assert ev.val.targets == [1, 0, 0] and any("own class order" in n for n in ev.notes)
    # a class only the validation split has: refused, named
    other = tmp_path / "hf2"
    datasets.DatasetDict({"train": train, "validation": _hf_named(datasets, ["dog", "wolf"], ["wolf", "dog"])}
                         ).save_to_disk(str(other))
    with pytest.raises(ValueError, match="classes the training split lacks .*only in validation: wolf"):
        build_data(_wds_cfg(other, format="hfds"), AUG)


def test_hfds_out_of_range_labels_name_their_cause(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.RandomState(0)

    def split(labels):
        return datasets.Dataset.from_dict({"image": [{"bytes": _png(rng), "path": None} for _ in labels],
                                           "label": labels},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "label": datasets.Value("int64")}))
    root = tmp_path / "hf"
    datasets.DatasetDict({"train": split([0, 1, 2, 1]), "validation": split([0, 4])}).save_to_disk(str(root))
    with pytest.raises(ValueError, match=r"outside 0..2 \(e.g. 4; the class count is 3, from the training split"):
        build_data(_wds_cfg(root, format="hfds"), AUG)
    unlabelled = tmp_path / "hf_test"
    datasets.DatasetDict({"train": split([0, 1, 2, 1]), "validation": split([-1, -1])}).save_to_disk(str(unlabelled))
    with pytest.raises(ValueError, match="-1 marks unlabelled images"):
        build_data(_wds_cfg(unlabelled, format="hfds"), AUG)


def test_wds_eval_only_folder_is_detected_from_its_split(tmp_path):
    root = tmp_path / "wds"
    labels = make_wds(root, shards=(("validation", 4),), info=False)
    b = build_data(_wds_cfg(root, format="auto"), AUG, train=False)    # no train shards: still webdataset
    assert b.val.targets == labels["validation"]


# ------------------------------------------------------------------------- malformed inputs: clear errors

def _edit_info(root: Path, edit) -> None:
    info = json.loads((root / "_info.json").read_text())
    edit(info)
    (root / "_info.json").write_text(json.dumps(info))


@pytest.mark.parametrize("edit, says", [
    (lambda i: i.update(splits=list(i["splits"].values())),
     r"'splits' entry of webdataset info file \S*_info.json is a list; it must be an object that maps each split name"),
    (lambda i: i.pop("splits"), r"'splits' entry of webdataset info file \S*_info.json is missing"),
    (lambda i: i["splits"].update(train=[i["splits"]["train"]]),
     r"split 'train' of webdataset info file \S*_info.json is a list; it must be an object with the split's"),
    (lambda i: i["splits"]["train"].update(filenames=[5]), r"filenames\[0\] is 5; each entry must be a shard file"),
    (lambda i: i["splits"]["train"].update(filenames={"a": "tiny-train-0000.tar"}),
     r"'filenames' is an object; it must be a list of shard file names"),
    (lambda i: i["splits"]["train"]["filenames"].append("tiny-train-0000.tar"),
     r"lists the shard 'tiny-train-0000.tar' more than once"),
    (lambda i: i["splits"]["train"].update(num_samples="many"),
     r"split 'train' of webdataset info file \S*_info.json: num_samples is 'many'; it must be a non-negative"),
    (lambda i: (i["splits"]["train"].pop("num_samples"), i["splits"]["train"].update(shard_lengths=[9, "six"])),
     r"shard_lengths\[1\] is 'six'; it must be a non-negative whole number"),
    (lambda i: i.update(num_classes="ten"), r"_info.json: num_classes is 'ten'; it must be a non-negative"),
    (lambda i: i.update(classes="ant bee cat"), r"_info.json: 'classes' must be a list of class names"),
    (lambda i: i.update(num_classes=3, classes=["ant", "bee"]), r"num_classes is 3 but 'classes' names 2"),
], ids=["splits-list", "splits-missing", "split-list", "filename-int", "filenames-object", "filename-twice",
        "num_samples-text", "shard_lengths-text", "num_classes-text", "classes-string", "classes-count"])
def test_wds_malformed_info_file_is_named(tmp_path, edit, says):
    from repvit.data.wds import WdsDataset
    root = tmp_path / "wds"
    make_wds(root)
    _edit_info(root, edit)
    with pytest.raises(ValueError, match=says):
        WdsDataset(root, "train")


def test_wds_info_json_is_named_and_one_filename_string_is_one_shard(tmp_path):
    from repvit.data.wds import WdsDataset
    root = tmp_path / "wds"
    labels = make_wds(root)
    _edit_info(root, lambda i: i["splits"]["train"].update(filenames="tiny-train-0000.tar", num_samples=9))
    ds = WdsDataset(root, "train")                  # a single string names one shard, not 19 one-letter files
    assert len(ds) == 9 and ds.targets == labels["train"][:9]
    (root / "_info.json").rename(root / "info.json")
    with pytest.raises(ValueError, match=r"split 'val' is not in \S*[/\\]info\.json \(splits: train, validation\)"):
        WdsDataset(root, "val")


def test_wds_broken_sample_json_and_truncated_shard_name_the_shard(tmp_path):
    from repvit.data.wds import WdsDataset
    root = tmp_path / "wds"
    make_wds(root, shards=(("train", 3), ("validation", 3)))
    shard = root / "tiny-train-0000.tar"
    rng = np.random.RandomState(0)
    with tarfile.open(shard, "w") as t:             # labels only in the .json sidecars; one is not JSON
        _add(t, "k_0.png", _png(rng))
        _add(t, "k_0.json", b'{"label": 1}')
        _add(t, "k_1.png", _png(rng))
        _add(t, "k_1.json", b'{"label": 2,')
        _add(t, "k_2.png", _png(rng))
        _add(t, "k_2.json", b'{"label": 0}')
    with pytest.raises(ValueError, match=r"shard \S*tiny-train-0000.tar, sample 'k_1': its .json member is not "
                                         r"valid JSON .*fix the shard") as e:
        WdsDataset(root, "train")
    assert isinstance(e.value.__cause__, json.JSONDecodeError)
    with tarfile.open(shard, "w") as t:             # a .json that parses but carries no label names its fields
        _add(t, "k_0.png", _png(rng))
        _add(t, "k_0.json", b'{"filename": "k_0.png"}')
    with pytest.raises(ValueError, match=r"sample 'k_0': no label .*its .json has the fields filename"):
        WdsDataset(root, "train")
    make_wds(tmp_path / "cut", shards=(("train", 3), ("validation", 3)))
    cut = tmp_path / "cut" / "tiny-train-0000.tar"
    cut.write_bytes(cut.read_bytes()[:1500])      # an interrupted copy: ends inside the first image
    with pytest.raises(ValueError, match=r"shard \S*tiny-train-0000.tar is truncated or damaged"):
        WdsDataset(tmp_path / "cut", "train")


def _hf_saved(datasets, root: Path) -> None:
    datasets.DatasetDict({"train": _hf_split(datasets, 4), "validation": _hf_split(datasets, 3, offset=1)}
                         ).save_to_disk(str(root))


@pytest.mark.parametrize("content, says", [
    ("{not json", r"dataset_dict.json is not valid JSON .*save the DatasetDict again with save_to_disk"),
    ('{"splits": "train"}', r"dataset_dict.json must hold \{\"splits\": \[\"train\", ...\]\} \(a list of split"),
    ('["train"]', r"dataset_dict.json must hold .*not \[\"train\"\]"),
], ids=["not-json", "splits-string", "a-list"])
def test_hfds_malformed_dataset_dict_json(tmp_path, content, says):
    datasets = pytest.importorskip("datasets")
    from repvit.data.hf import open_hf_split
    root = tmp_path / "hf"
    _hf_saved(datasets, root)
    (root / "dataset_dict.json").write_text(content)
    with pytest.raises(ValueError, match=says):
        open_hf_split(str(root), "train")


def test_hfds_missing_or_damaged_split_folder(tmp_path):
    import shutil
    datasets = pytest.importorskip("datasets")
    from repvit.data.hf import open_hf_split
    root = tmp_path / "hf"
    _hf_saved(datasets, root)
    assert len(open_hf_split(str(root), "validation")) == 3
    (root / "train" / "state.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"folder \S*train \(split 'train' listed in \S*dataset_dict.json\) is "
                                         r"damaged \(JSONDecodeError") as e:
        open_hf_split(str(root), "train")
    assert isinstance(e.value.__cause__, json.JSONDecodeError)
    for arrow in (root / "train").glob("*.arrow"):
        arrow.unlink()
    shutil.copy(root / "validation" / "state.json", root / "train" / "state.json")
    with pytest.raises(FileNotFoundError, match=r"folder \S*train .* is incomplete .*\.arrow"):
        open_hf_split(str(root), "train")
    shutil.rmtree(root / "train")
    with pytest.raises(FileNotFoundError, match=r"folder \S*train \(split 'train' listed in \S*dataset_dict.json\) "
                                                r"does not exist; save the DatasetDict again") as e:
        open_hf_split(str(root), "train")
    assert isinstance(e.value.__cause__, FileNotFoundError)
    assert len(open_hf_split(str(root), "validation")) == 3      # the other split still opens


def test_hfds_image_column_that_holds_no_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    from repvit.data.hf import HFImageDataset
    root = tmp_path / "hf"
    split = datasets.Dataset.from_dict({"image": [1, 2, 3], "label": [0, 1, 2]})
    datasets.DatasetDict({"train": split}).save_to_disk(str(root))
    with pytest.raises(ValueError, match=r"image column 'image' of split 'train' of Hugging Face dataset .* holds "
                                         r".*int64.*, not images"):
        HFImageDataset(str(root), "train")


def test_wds_shards_found_by_name_match_the_split_as_a_word(tmp_path):
    """Without an info file, split 'val' must not also take 'trainval' shards (training images in validation)."""
    root = tmp_path / "wds"
    make_wds(root, shards=(("train", 6), ("val", 3), ("trainval", 4)), info=False)
    b = build_data(DataConfig(dataset=str(root), format="wds", img_size=16, val_split="val"), AUG)
    assert len(b.val) == 3 and len(b.train) == 6


def test_hfds_eval_of_a_hub_dataset_reads_class_names_without_the_training_split(monkeypatch):
    """Evaluation needs the training split's class order; for a hub dataset its metadata has it (one ClassLabel
    for all splits): loading the training split to read it would download all of its images."""
    datasets = pytest.importorskip("datasets")
    val = _hf_named(datasets, ["cat", "dog", "fox"], ["fox", "dog"])
    loaded = []

    def load_dataset(src, split=None, cache_dir=None):
        loaded.append(split)
        if split != "validation":
            raise AssertionError(f"split {split!r} was downloaded")
        return val

    class Builder:
        info = type("Info", (), {"features": val.features})()
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda src, cache_dir=None: Builder())
    ev = build_data(DataConfig(dataset="someone/tiny-animals", format="hfds", img_size=16, val_split="validation"),
                    AUG, train=False)
    assert loaded == ["validation"] and ev.val.classes == ["cat", "dog", "fox"] and ev.val.targets == [2, 1]
    assert not any("could not read" in n for n in ev.notes)
