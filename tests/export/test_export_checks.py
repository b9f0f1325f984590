"""Export safety checks: parity failures publish nothing, sidecar opset is the file's, format-specific flags are
refused where they do not apply, atomic writes are fsynced, and an OpenVINO IR is published so that a new .bin is
never paired with an old .xml."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import repvit
from repvit.cli import main as cli_main
from repvit.export import common, export_executorch, export_program, export_torchscript, load_source, sidecar_path
from repvit.export.common import ParityError, atomic_output, check_parity

from .conftest import small_model


@pytest.fixture(scope="module")
def m32():
    return small_model(size=32)


def test_check_parity_bound():
    want = torch.tensor([[10.0, -2.0]])
    bound = 1e-3 + 1e-3 * 10.0
    assert check_parity(want + 0.5 * bound, want, "x")["tolerance"] == pytest.approx(bound)
    with pytest.raises(ParityError, match=r"x: max \|exported - PyTorch\| = 0.022 exceeds the tolerance 0.011"):
        check_parity(want + 2 * bound, want, "x")
    with pytest.raises(ParityError, match="exceeds"):
        check_parity(want * float("nan"), want, "x")
    with pytest.raises(ParityError, match="shape"):
        check_parity(want[:, :1], want, "x")


def test_onnx_parity_failure_writes_nothing(m32, tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from repvit.export import export_onnx

    real_export = torch.onnx.export

    def export_then_corrupt(net, args, f, **kw):  # a wrong exporter: the classifier weights are off by 0.5
        real_export(net, args, f, **kw)
        m = onnx.load(f)
        head = next(n for n in m.graph.node if n.op_type in ("Gemm", "MatMul"))
        init = next(i for i in m.graph.initializer if i.name == head.input[1])
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, init.name))
        onnx.save(m, f)

    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(torch.onnx, "export", export_then_corrupt)
    with pytest.raises(ParityError, match="ONNX Runtime vs PyTorch.*exceeds the tolerance"):
        export_onnx(m32, out)
    assert out.read_bytes() == b"previous export" and not sidecar_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left either
    # the unpatched exporter passes the same check and records its tolerance
    monkeypatch.setattr(torch.onnx, "export", real_export)
    info = export_onnx(m32, out)
    v = info["validation"]
    assert v["max_abs_diff_vs_torch"] <= v["tolerance"] and v["tolerance"] >= 1e-3


def test_torchscript_parity_failure_writes_nothing(m32, tmp_path, monkeypatch):
    real_save, real_load = torch.jit.save, torch.jit.load

    def save_corrupted(module, path, *a, **k):
        real_save(module, path, *a, **k)
        copy = real_load(path)
        with torch.no_grad():
            dict(copy.named_parameters())["head.head.weight"].add_(0.5)
        real_save(copy, path)

    monkeypatch.setattr(torch.jit, "save", save_corrupted)
    out = tmp_path / "m.pt"
    with pytest.raises(ParityError, match="TorchScript.*exceeds the tolerance"):
        export_torchscript(m32, out)
    assert not list(tmp_path.iterdir())


def test_pt2_parity_failure_writes_nothing(m32, tmp_path, monkeypatch):
    real_load = torch.export.load

    class Shifted:  # the loaded program computes something else than the eager model
        def __init__(self, ep):
            self.ep = ep

        def module(self):
            mod = self.ep.module()
            return lambda x: mod(x) + 0.5

    monkeypatch.setattr(torch.export, "load", lambda *a, **k: Shifted(real_load(*a, **k)))
    with pytest.raises(ParityError, match="torch.export program.*exceeds the tolerance"):
        export_program(m32, tmp_path / "m.pt2")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_pte_runner_parity(m32, tmp_path, monkeypatch, shift):
    """The .pte check: a runtime output off by more than the tolerance aborts before publishing (the lowering and
    the runtime are faked, so this runs without executorch)."""
    import repvit.export.executorch_int8 as ei
    from repvit.export.source import to_deploy

    fused = to_deploy(m32)
    monkeypatch.setattr(ei, "xnnpack_program", lambda net, x: (SimpleNamespace(buffer=b"program bytes"), None))
    monkeypatch.setattr(ei, "_runtime_method",
                        lambda path: SimpleNamespace(execute=lambda xs: [fused(xs[0]).detach() + shift]))
    out = tmp_path / "m.pte"
    if shift:
        with pytest.raises(ParityError, match="ExecuTorch program.*exceeds the tolerance"):
            export_executorch(m32, out)
        assert not list(tmp_path.iterdir())
    else:
        info = export_executorch(m32, out)
        assert out.read_bytes() == b"program bytes" and info["validation"]["max_abs_diff_vs_eager"] < 1e-5


def test_sidecar_opset_is_the_files(m32, tmp_path):
    """The dynamo exporter has no opset-17 implementation and writes 18: the sidecar must say what the file is."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from repvit.export import export_onnx
    from repvit.export.onnx_export import onnx_opset

    out = tmp_path / "d.onnx"
    info = export_onnx(m32, out, exporter="dynamo", opset=17)
    side = json.loads(sidecar_path(out).read_text())
    assert side["opset"] == info["opset"] == onnx_opset(out)
    assert side["opset_requested"] == 17


def test_atomic_output_fsyncs_before_replace(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(common.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(common.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    with atomic_output(tmp_path / "f.bin") as tmp:
        tmp.write_bytes(b"data")
    assert events == ["fsync", "replace"] and (tmp_path / "f.bin").read_bytes() == b"data"
    events.clear()
    with atomic_output(tmp_path / "d.mlpackage", directory=True) as tmp:  # a directory: every file and folder
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "w.bin").write_bytes(b"w")
    assert events == ["fsync"] * 3 + ["replace"]


def test_publish_ir_never_pairs_a_new_bin_with_an_old_xml(tmp_path, monkeypatch):
    import repvit.export.openvino_int8 as ov8

    src, dst = tmp_path / "stage" / "m.xml", tmp_path / "m.xml"
    src.parent.mkdir()
    src.write_text("new ir")
    src.with_suffix(".bin").write_text("new weights")
    dst.write_text("old ir")
    dst.with_suffix(".bin").write_text("old weights")
    real_replace, calls = os.replace, []

    def crash_on_second(a, b):
        calls.append(Path(b).name)
        if len(calls) == 2:
            raise OSError("crash between the two renames")
        real_replace(a, b)

    monkeypatch.setattr(ov8.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="crash"):
        ov8._publish_ir(src, dst)
    # the .bin is new by now: the old .xml must not be there to read it
    assert dst.with_suffix(".bin").read_text() == "new weights" and not dst.exists()
    monkeypatch.setattr(ov8.os, "replace", real_replace)
    src.with_suffix(".bin").write_text("newer weights")
    ov8._publish_ir(src, dst)
    assert dst.read_text() == "new ir" and dst.with_suffix(".bin").read_text() == "newer weights"


@pytest.mark.parametrize("fmt,extra,flag", [
    ("torchscript", ["--opset", "18"], "--opset"),          # an explicit default is refused too
    ("pt2", ["--slim"], "--slim"),
    ("executorch", ["--exporter", "dynamo"], "--exporter"),
    ("onnx", ["--labels", "labels.txt"], "--labels"),
    ("onnx", ["--fp16"], "--fp16"),
])
def test_export_refuses_options_of_other_formats(tmp_path, capsys, fmt, extra, flag):
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2", "executorch": ".pte"}[fmt]
    rc = cli_main(["export", "repvit_m0_6", "--format", fmt, "--out", str(tmp_path / f"m{suffix}"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and f"{flag} do not apply to --format {fmt}" in err, err
    assert not list(tmp_path.iterdir())


def test_num_classes_and_in_chans_are_refused_with_a_checkpoint(m32, tmp_path, capsys):
    ck = tmp_path / "m.safetensors"
    repvit.save_checkpoint(m32, ck)
    for flags in (["--num-classes", "5"], ["--in-chans", "1"]):
        rc = cli_main(["export", str(ck), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), *flags])
        err = capsys.readouterr().err
        assert rc == 2 and f"{flags[0]} apply to a variant-name SOURCE only" in err, err
        rc = cli_main(["quantize", str(ck), "--calib", "digits", "--out", str(tmp_path / "q.onnx"), *flags])
        err = capsys.readouterr().err
        assert rc == 2 and f"{flags[0]} apply to a variant-name SOURCE only" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    with pytest.raises(ValueError, match="variant name only"):
        load_source(str(ck), num_classes=10)
    assert load_source("repvit_m0_6", num_classes=3).num_classes == 3  # a variant name still takes them


def test_a_sidecar_path_that_is_a_directory_is_refused_before_the_old_file_is_replaced(m32, tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_bytes(b"the good old export")
    (tmp_path / "m.pt.json").mkdir()
    rc = cli_main(["export", "repvit_m0_6", "--format", "torchscript", "--input-size", "32", "32", "--out", str(out)])
    assert rc == 2 and "sidecar path" in capsys.readouterr().err
    assert out.read_bytes() == b"the good old export"


def test_replacing_an_export_drops_the_old_sidecar_first(m32, tmp_path, monkeypatch):
    """A failure between the replace and the new sidecar leaves no sidecar rather than one with the old checksum."""
    out = tmp_path / "m.pt"
    export_torchscript(m32, out)
    old = json.loads(sidecar_path(out).read_text())["sha256"]

    def fail(*a, **k):
        raise OSError("disk full while writing the sidecar")
    monkeypatch.setattr(common, "atomic_write_text", fail)
    m = small_model(size=32, seed=1)
    with pytest.raises(OSError, match="disk full"):
        export_torchscript(m, out)
    assert not sidecar_path(out).exists() and common.sha256_of(out) != old


def test_model_flag_must_match_the_variant_the_file_names(tmp_path):
    ck = tmp_path / "m09.safetensors"
    repvit.save_checkpoint(repvit.create_model("repvit_m0_9", num_classes=10, deploy=True), ck)
    with pytest.raises(ValueError, match="holds repvit_m0_9 .* but --model says repvit_m1"):
        load_source(str(ck), model="repvit_m1")             # same widths and depths: it would load, mislabelled
    assert load_source(str(ck), model="repvit_m0_9").variant == "repvit_m0_9"


def test_ema_with_a_variant_name_and_huge_input_sizes_are_refused(tmp_path, capsys):
    rc = cli_main(["export", "repvit_m0_6", "--ema", "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert rc == 2 and "--ema selects the EMA weights of a training checkpoint" in capsys.readouterr().err
    rc = cli_main(["export", "repvit_m0_6", "--format", "onnx", "--input-size", "100000", "100000",
                   "--out", str(tmp_path / "m.onnx")])
    assert rc == 2 and "too large" in capsys.readouterr().err
    rc = cli_main(["quantize", "repvit_m0_6", "--calib", "digits", "--num-eval", "10", "--out", str(tmp_path / "q.onnx")])
    assert rc == 2 and "add --eval" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_dynamo_export_with_json_prints_only_json(tmp_path, capsys):
    rc = cli_main(["export", "repvit_m0_6", "--num-classes", "10", "--input-size", "32", "32", "--format", "onnx",
                   "--exporter", "dynamo", "--out", str(tmp_path / "d.onnx"), "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["exporter"] == "dynamo"


def test_calibration_folders_follow_symlinked_class_folders(tmp_path):
    """Training's folder reader follows symlinks; calibration and --eval must see the same images."""
    import numpy as np
    from PIL import Image

    from repvit.export.calib import load_images
    real = tmp_path / "real"
    for c in ("a", "b"):
        (real / c).mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), 50, np.uint8)).save(real / c / "x.png")
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a").symlink_to(real / "a", target_is_directory=True)
    (calib / "b").symlink_to(real / "b", target_is_directory=True)
    pre = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}
    x, y = load_images(str(calib), pre, num_classes=2)
    assert x.shape[0] == 2 and sorted(y.tolist()) == [0, 1]


def test_coreml_refuses_repeated_class_labels(m32, tmp_path):
    pytest.importorskip("coremltools")
    from repvit.export import export_coreml
    labels = [f"c{i}" for i in range(m32.num_classes)]
    labels[3] = labels[1]
    with pytest.raises(ValueError, match=r"class labels must be unique .*'c1' \(classes 1 and 3\)"):
        export_coreml(m32, tmp_path / "m.mlpackage", class_labels=labels)
    assert not list(tmp_path.iterdir())


def test_out_that_is_the_source_checkpoint_is_refused(m32, tmp_path, capsys):
    ck = tmp_path / "m.pt"
    torch.save(m32.state_dict(), ck)
    before = ck.read_bytes()
    for cmd in (["export", str(ck), "--model", "repvit_m0_6", "--format", "torchscript", "--out", str(ck)],
                ["quantize", str(ck), "--model", "repvit_m0_6", "--calib", "digits", "--out", str(ck)]):
        rc = cli_main(cmd)
        err = capsys.readouterr().err
        assert rc == 2 and "is the SOURCE checkpoint itself" in err, err
    assert ck.read_bytes() == before


def test_sidecar_says_which_weights_of_a_training_checkpoint(m32, tmp_path):
    """A training checkpoint holds raw and EMA weights: the sidecar says which were exported."""
    ema = small_model(size=32, seed=2)
    ck = tmp_path / "train.pth"
    torch.save({"model": m32.state_dict(), "model_ema": ema.state_dict()}, ck)
    for flag, want in ((None, "raw"), (True, "ema")):
        out = tmp_path / f"{want}.pt"
        export_torchscript(load_source(str(ck), model="repvit_m0_6", use_ema=flag), out)
        assert json.loads(sidecar_path(out).read_text())["weights"] == want
    export_torchscript(load_source("repvit_m0_6", num_classes=10), tmp_path / "r.pt")
    assert json.loads(sidecar_path(tmp_path / "r.pt").read_text())["weights"] == "random"


def test_sidecar_weights_of_a_runs_best_file_follow_its_record(m32, tmp_path):
    ck = tmp_path / "best.safetensors"
    repvit.save_checkpoint(m32, ck, metadata={"train_best": {"epoch": 3, "top1": 90.0, "source": "ema"}})
    assert load_source(str(ck))._export_weights == "ema"
