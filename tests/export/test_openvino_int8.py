"""OpenVINO/NNCF INT8: the CLI backend runs, keeps accuracy on a small trained model, writes IR + sidecar,
leaves sensitive groups in float on request, and refuses bad options clearly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from repvit.cli import main as cli_main
from repvit.export import sidecar_path
from repvit.export.calib import load_images, normalise

from .test_quantize import digits_ckpt, quantize_cli_within_bound  # noqa: F401  (the trained digits probe fixture)

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'repvit[openvino]')")
pytest.importorskip("nncf", reason="nncf is not installed (pip install 'repvit[openvino]')")


def test_openvino_quantize_cli_keeps_accuracy(digits_ckpt, tmp_path, capsys):  # noqa: F811
    from repvit.export.openvino_int8 import evaluate_openvino, openvino_session, precision_summary

    ckpt, fused = digits_ckpt
    out = tmp_path / "int8.xml"
    quantize_cli_within_bound(ckpt, out, 64, capsys)
    assert out.is_file() and out.with_suffix(".bin").is_file()
    side = json.loads(sidecar_path(out).read_text())
    assert side["format"] == "openvino-int8" and side["variant"] == "repvit_m0_6"
    assert side["quantization"]["calibration"]["images"] == 64
    from repvit.bench.machine import int8_overflow_risk   # x86 without VNNI needs NNCF's fix on every layer
    assert side["quantization"]["overflow_fix"].startswith("all layers" if int8_overflow_risk() else "first layer")
    # the compiled model really runs convolutions in 8-bit, and predicts the same as the CLI reported
    prims = precision_summary(openvino_session(out, threads=1))
    assert sum(n for p, n in prims.items() if p in ("u8", "i8")) > 10, prims
    raw, labels = load_images("digits", fused.preprocessing, split="val", limit=5, seed=3)
    res = evaluate_openvino(out, normalise(raw, fused.preprocessing).numpy(), labels.numpy(), threads=1)
    assert res["logits"].shape == (5, 10) and np.isfinite(res["logits"]).all()


def test_openvino_keep_float_leaves_groups_in_float(digits_ckpt, tmp_path):  # noqa: F811
    from repvit.export.openvino_int8 import openvino_session, precision_summary, quantize_openvino

    _, fused = digits_ckpt
    all_q = quantize_openvino(fused, tmp_path / "a.xml", calib="digits", num_calib=8, sidecar=False, keep_float=())
    kept = quantize_openvino(fused, tmp_path / "b.xml", calib="digits", num_calib=8, sidecar=False,
                             keep_float=["depthwise", "se", "head"])
    int8 = lambda c: sum(n for p, n in c.items() if p in ("u8", "i8"))  # noqa: E731
    assert int8(kept["int8_primitives"]) < int8(all_q["int8_primitives"])
    assert int8(precision_summary(openvino_session(tmp_path / "b.xml"))) == int8(kept["int8_primitives"])


def test_openvino_backend_errors(digits_ckpt, tmp_path, capsys):  # noqa: F811
    ckpt, fused = digits_ckpt
    cases = [
        (["--backend", "openvino", "--out", str(tmp_path / "m.onnx")], "must end in .xml"),
        (["--per-tensor", "--out", str(tmp_path / "m.xml")], "--per-tensor do not apply to --backend openvino"),
        (["--preset", "mixed", "--out", str(tmp_path / "m.onnx")], "(only to openvino)"),
        (["--backend", "onnxruntime", "--out", str(tmp_path / "m.xml")], "OpenVINO IR"),
        (["--keep-float", "none", "se", "--out", str(tmp_path / "m.xml")], "cannot be combined"),
    ]
    for extra, message in cases:
        rc = cli_main(["quantize", str(ckpt), "--calib", "digits", *extra])
        err = capsys.readouterr().err
        assert rc != 0 and message in err, (extra, err)
    assert not list(tmp_path.iterdir()), "a refused command must not leave files behind"
    from repvit.export.openvino_int8 import quantize_openvino
    with pytest.raises(ValueError, match="keep-float"):
        quantize_openvino(fused, tmp_path / "c.xml", calib="digits", num_calib=2, keep_float=["everything"])


def test_openvino_failed_run_leaves_no_files(tmp_path, monkeypatch):
    """An error after quantization (here: in the fp32/INT8 comparison) or a bad --eval path must not leave an
    IR behind - nor replace an existing one - without its sidecar."""
    import repvit.export.openvino_int8 as ov8

    from .conftest import small_model

    model = small_model(in_chans=1, size=32, num_classes=10, seed=0)
    model.preprocessing = {"input_size": [1, 32, 32], "mean": [0.3], "std": [0.35], "interpolation": "bilinear",
                           "crop_pct": 1.0}
    out = tmp_path / "m.xml"
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=re.escape(f"'{missing}' is neither an existing folder nor a built-in")):
        ov8.quantize_openvino(model, out, calib="digits", num_calib=2, eval_data=missing)
    assert not list(tmp_path.iterdir())

    def broken(*a, **k):
        raise RuntimeError("comparison failed")

    out.write_text("old ir")
    out.with_suffix(".bin").write_text("old weights")
    monkeypatch.setattr(ov8, "evaluate_openvino", broken)
    with pytest.raises(RuntimeError, match="comparison failed"):
        ov8.quantize_openvino(model, out, calib="digits", num_calib=2, eval_data="digits", num_eval=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    assert out.read_text() == "old ir" and out.with_suffix(".bin").read_text() == "old weights"


def test_fp32_reference_runs_in_f32_and_precisions_are_recorded(tmp_path, monkeypatch):
    """OpenVINO's CPU plugin runs an fp32 model in bf16 by default on AMX/AVX512-BF16 CPUs: the fp32 side of
    ``--eval`` must ask for f32, and the sidecar must say which precision each side really ran with."""
    import repvit.export.openvino_int8 as ov8

    from .conftest import small_model

    calls = []
    real_session = ov8.openvino_session

    def spy(path, **kw):
        calls.append((Path(path).name, kw.get("precision")))
        return real_session(path, **kw)

    monkeypatch.setattr(ov8, "openvino_session", spy)
    model = small_model(in_chans=1, size=32, num_classes=10, seed=0)
    model.preprocessing = {"input_size": [1, 32, 32], "mean": [0.3], "std": [0.35], "interpolation": "bilinear",
                           "crop_pct": 1.0}
    out = tmp_path / "m.xml"
    info = ov8.quantize_openvino(model, out, calib="digits", num_calib=2, eval_data="digits", num_eval=4)
    fp32_calls = [p for name, p in calls if name.endswith(".onnx")]
    assert fp32_calls == ["f32"], calls
    e = info["eval"]
    assert e["fp32_inference_precision"] == "f32"
    # what the INT8 side ran with is the plugin's real default on this CPU (bf16 with AMX/AVX512-BF16, else f32)
    default = ov8.inference_precision(real_session(out))
    assert e["int8_inference_precision"] == info["int8_inference_precision"] == default
    assert json.loads(sidecar_path(out).read_text())["eval"]["fp32_inference_precision"] == "f32"


def test_republishing_without_a_sidecar_removes_the_old_one(tmp_path):
    """A new IR published over an old one takes the old sidecar (its checksum and accuracy are the old model's)
    with it, also when the new one is written without a sidecar."""
    import repvit.export.openvino_int8 as ov8

    from .conftest import small_model

    model = small_model(in_chans=1, size=32, num_classes=10, seed=0)
    model.preprocessing = {"input_size": [1, 32, 32], "mean": [0.3], "std": [0.35], "interpolation": "bilinear",
                           "crop_pct": 1.0}
    out = tmp_path / "m.xml"
    ov8.quantize_openvino(model, out, calib="digits", num_calib=2)
    assert sidecar_path(out).exists()
    ov8.quantize_openvino(model, out, calib="digits", num_calib=2, sidecar=False)
    assert out.exists() and not sidecar_path(out).exists()
