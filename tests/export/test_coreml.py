"""Core ML: the normalisation folding is exact (no coremltools needed); conversion gives a valid spec."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from repvit.export import export_coreml, sidecar_path
from repvit.export.common import Preprocess, require
from repvit.export.coreml import _fold_channel_scale, coreml_image_params
from repvit.export.source import to_deploy

from .conftest import small_model


def _coremltools_reason() -> str | None:
    try:
        require("coremltools", "Core ML export")
        return None
    except RuntimeError as e:
        return str(e)


_SKIP = _coremltools_reason()
needs_ct = pytest.mark.skipif(_SKIP is not None, reason=f"coremltools unavailable: {_SKIP}")


@pytest.mark.parametrize("chans", [3, 1])
def test_image_scale_bias_plus_fold_equals_normalisation(chans):
    """Core ML computes scale*pixel + bias_c; with the per-channel factor folded into the stem conv
    the result must equal the model applied to (pixel/255 - mean_c) / std_c."""
    model = to_deploy(small_model(in_chans=chans))
    mean = [0.485, 0.456, 0.406][:chans] if chans == 3 else [0.29]
    std = [0.2, 0.4, 0.8] if chans == 3 else [0.35]  # very unequal, so a missing fold would show
    scale, bias, fold = coreml_image_params(mean, std)
    pix = torch.randint(0, 256, (2, chans, 64, 64)).float()
    coreml_input = pix * scale + torch.tensor(bias).view(1, -1, 1, 1)
    with torch.no_grad():
        got = _fold_channel_scale(model, fold)(coreml_input)
        want = Preprocess(model, mean, std, "uint8")(pix.to(torch.uint8))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if chans == 3:  # unequal stds really need the fold: without it the outputs differ
        with torch.no_grad():
            assert not torch.allclose(model(coreml_input), want, atol=1e-3)


def test_missing_coremltools_names_the_package(m06, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # makes ``import coremltools`` fail
    with pytest.raises(RuntimeError, match="pip install coremltools"):
        export_coreml(m06, tmp_path / "m.mlpackage")


def test_wrong_suffix(m06, tmp_path):
    with pytest.raises(ValueError, match=".mlpackage"):
        export_coreml(m06, tmp_path / "m.onnx")


@needs_ct
def test_fp16_rgb_spec(tmp_path):
    model = small_model(size=32, num_classes=5)
    out = tmp_path / "m.mlpackage"
    info = export_coreml(model, out, fp16=True, class_labels=list("abcde"))
    assert out.is_dir()
    spec = info["spec"]
    assert spec["type"] == "mlProgram" and spec["input_shape"] == [1, 3, 32, 32]
    assert spec["color_space"] == "RGB" and spec["num_class_labels"] == 5 and spec["first_labels"] == ["a", "b", "c"]
    side = json.loads(sidecar_path(out).read_text())
    assert side["precision"] == "fp16" and side["target"].startswith("mlprogram/")
    assert side["variant"] == "repvit_m0_6" and len(side["sha256"]) == 64
    assert side["image_scale"] == pytest.approx(info["image_scale"])
    # Core ML's image input computes scale * pixel + bias_c, and the first conv is scaled per channel by fold_c:
    # together they must be the model's normalisation (pixel / 255 - mean_c) / std_c, for any 0..255 pixel
    pre = model.preprocessing
    for c, (m, sd) in enumerate(zip(pre["mean"], pre["std"])):
        for px in (0.0, 37.0, 128.0, 255.0):
            got = (side["image_scale"] * px + side["image_bias"][c]) * side["folded_channel_scale"][c]
            assert got == pytest.approx((px / 255.0 - m) / sd, rel=1e-6, abs=1e-6)


@needs_ct
def test_fp32_grayscale_spec(tmp_path):
    model = small_model(in_chans=1, size=32, num_classes=10)
    info = export_coreml(model, tmp_path / "g.mlpackage", fp16=False)
    assert info["spec"]["color_space"] == "GRAYSCALE" and info["precision"] == "fp32"
    assert info["spec"]["num_class_labels"] == 10
