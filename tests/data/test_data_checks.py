"""Data checks found by review: labels that do not fit the model, class order across formats, tar layouts,
forked tar readers, built-in normalisation, info.json detection, 'none' policies, eval class counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from repvit.data import build_data
from repvit.train.config import AugConfig, DataConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_datasets import _solid_png as _png, _tar_of_pngs as _tar  # noqa: E402
from test_wds_hfds import make_wds  # noqa: E402

AUG = AugConfig(auto_augment=None)


def _folder(root: Path, classes, n: int = 2) -> Path:
    for split in ("train", "val"):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / c / f"{i}.png").write_bytes(_png(20 * k + i))
    return root


def _tars_like(folder: Path, out: Path) -> Path:
    out.mkdir()
    for split in ("train", "val"):
        _tar(out / f"{split}.tar", {f"{c.name}/{f.name}": f.read_bytes()
                                    for c in sorted((folder / split).iterdir()) for f in sorted(c.iterdir())})
    return out


@pytest.mark.parametrize("fmt", ["folder", "tar", "digits"])
def test_labels_beyond_model_num_classes_are_refused_up_front(tmp_path, fmt):
    """model.num_classes=2 on 3-class data used to pass build_data and fail in the loss at the first high label."""
    if fmt == "digits":
        cfg = DataConfig(dataset="digits", img_size=16)
    else:
        root = _folder(tmp_path / "f", ("a", "b", "c"))
        if fmt == "tar":
            root = _tars_like(root, tmp_path / "t")
        cfg = DataConfig(dataset=str(root), format=fmt, img_size=16)
    top = 9 if fmt == "digits" else 2
    with pytest.raises(ValueError, match=rf"labels up to {top} \({top + 1} classes\) but model.num_classes is 2"):
        build_data(cfg, AUG, num_classes=2)
    assert build_data(cfg, AUG, num_classes=top + 1).train is not None       # enough outputs: fine
    assert build_data(cfg, AUG, num_classes=top + 5).train is not None       # a larger head is the user's choice


def test_folder_and_tar_number_the_same_classes_alike(tmp_path):
    """timm's tar reader sorts class names naturally (class2 < class10); class folders sort them as strings. The
    same data in both formats must give the same label to the same image."""
    folder = _folder(tmp_path / "f", ("class2", "class10", "class1"))
    tars = _tars_like(folder, tmp_path / "t")
    a = build_data(DataConfig(dataset=str(folder), format="folder", img_size=12, eval_crop="timm"), AUG)
    b = build_data(DataConfig(dataset=str(tars), format="tar", img_size=12, eval_crop="timm"), AUG)
    assert a.val.classes == ["class1", "class10", "class2"]
    assert b.val.class_name_to_idx == {"class1": 0, "class10": 1, "class2": 2}

    def by_pixel(ds):          # image identity (its solid value) -> label
        out = {}
        for i in range(len(ds)):
            x, y = ds[i]
            out[round(float(x[0, 0, 0]), 4)] = y
        return out
    assert by_pixel(a.val) == by_pixel(b.val)                    # (training images are randomly augmented)
    assert sorted(set(by_pixel(b.val).values())) == [0, 1, 2]
    assert b.train.class_name_to_idx == b.val.class_name_to_idx and sorted(a.train.targets) == sorted(b.train.targets)


def test_tar_with_images_at_the_top_level_is_refused(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    for split in ("train", "val"):
        _tar(root / f"{split}.tar", {f"img{i}.png": _png(10 * i) for i in range(3)})
    with pytest.raises(ValueError, match=r"images at its top level, outside any class folder; put each class's "):
        build_data(DataConfig(dataset=str(root), format="tar", img_size=12), AUG)


def test_tar_without_images_says_so(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    _tar(root / "val.tar", {"a/readme.txt": b"no images here"})
    with pytest.raises(ValueError, match=r"val.tar holds no images"):
        build_data(DataConfig(dataset=str(root), format="tar", img_size=12), AUG, train=False)


def test_a_forked_process_opens_its_own_archive(tmp_path):
    """timm's reader caches the open archive; a DataLoader worker forked after the parent read from it would share
    its file position (good images then read as corrupt). A new process drops the inherited handles."""
    root = tmp_path / "t"
    root.mkdir()
    _tar(root / "val.tar", {f"{c}/{i}.png": _png(30 * k + i) for k, c in enumerate("ab") for i in range(2)})
    ds = build_data(DataConfig(dataset=str(root), format="tar", img_size=12), AUG, train=False).val
    ds[0]
    inherited = ds.reader.tar_state.tf
    assert inherited is not None
    ds[1]
    assert ds.reader.tar_state.tf is inherited                # same process: the cached handle is reused
    ds._pid = -1                                              # as seen from a forked worker
    assert ds[2] is not None and ds.reader.tar_state.tf is not inherited


def test_builtin_keeps_one_mean_and_std_for_its_one_channel():
    """A recipe's 3-value mean on a built-in used to be saved as the 1-channel model's preprocessing (exporting that
    checkpoint then failed)."""
    b = build_data(DataConfig(dataset="digits", img_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
                   AUG)
    pre = b.preprocessing
    assert pre["input_size"][0] == 1 and pre["mean"] == [0.485] and pre["std"] == [0.229]


def test_an_unrelated_info_json_does_not_make_a_class_folder_webdataset(tmp_path):
    root = _folder(tmp_path / "f", ("a", "b"))
    (root / "info.json").write_text(json.dumps({"description": "my photos"}))
    b = build_data(DataConfig(dataset=str(root), img_size=12), AUG)
    assert b.num_classes == 2 and len(b.train) == 4


@pytest.mark.parametrize("value", ["none", "None", ""])
def test_auto_augment_none_means_off_for_image_data(tmp_path, value):
    root = _folder(tmp_path / "f", ("a", "b"))
    b = build_data(DataConfig(dataset=str(root), img_size=12), AugConfig(auto_augment=value))
    assert b.train[0][0].shape == (3, 12, 12)
    assert "RandAugment" not in repr(b.train.transform)
    on = build_data(DataConfig(dataset=str(root), img_size=12), AugConfig(auto_augment="rand-m9-mstd0.5-inc1"))
    assert "RandAugment" in repr(on.train.transform)           # the check above can see it when it is there


def test_eval_of_integer_labelled_data_whose_split_lacks_the_top_class(tmp_path):
    """Evaluation passes the checkpoint's class count: a webdataset validation split without the highest label
    counted one class fewer than the model and was refused although every label is valid."""
    import repvit
    from repvit.train.evaluate import evaluate_checkpoint
    root = tmp_path / "wds"
    make_wds(root, shards=(("train", 6), ("validation", 2)), info=False)   # validation labels 0, 1 of 3 classes
    model = repvit.create_model("repvit_m0_6", num_classes=3)
    ckpt = tmp_path / "m.safetensors"
    repvit.save_checkpoint(model.eval(), ckpt)
    res = evaluate_checkpoint(str(ckpt), data=str(root), split="validation", img_size=32, num_workers=0)
    assert res["results"][0]["n"] == 2
    one = repvit.create_model("repvit_m0_6", num_classes=1)          # a label the model cannot predict: refused
    repvit.save_checkpoint(one.eval(), tmp_path / "one.safetensors")
    with pytest.raises(ValueError, match=r"predicts 1 classes but .* has 2"):
        evaluate_checkpoint(str(tmp_path / "one.safetensors"), data=str(root), split="validation", img_size=32,
                            num_workers=0)
    # a declared class count must match the model's: a 1000-class model is not scored on 3-class data
    (root / "_info.json").write_text(json.dumps({"num_classes": 3, "splits": {"validation": {
        "filenames": sorted(p.name for p in root.glob("*validation-*.tar"))}}}))
    big = repvit.create_model("repvit_m0_6", num_classes=1000)
    repvit.save_checkpoint(big.eval(), tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match=r"predicts 1000 classes but .* has 3"):
        evaluate_checkpoint(str(tmp_path / "big.safetensors"), data=str(root), split="validation", img_size=32,
                            num_workers=0)
    assert evaluate_checkpoint(str(ckpt), data=str(root), split="validation", img_size=32,
                               num_workers=0)["results"][0]["n"] == 2
