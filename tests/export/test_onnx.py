"""ONNX export: parity with PyTorch for every variant, no BatchNorm, dynamic batch, baked preprocessing, sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import repvit
from repvit.export import export_onnx, load_source, sha256_of, sidecar_path
from repvit.export.onnx_export import count_ops, ort_session

from .conftest import small_model

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def _run(path, x: np.ndarray) -> np.ndarray:
    s = ort_session(path)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", repvit.list_models())
def test_every_variant_matches_pytorch(name, tmp_path):
    model = small_model(name, num_classes=7)
    out = tmp_path / f"{name}.onnx"
    info = export_onnx(model, out, input_size=(64, 64), batch_size=2)
    assert count_ops(out, "BatchNormalization") == 0
    assert count_ops(out, "Conv") > 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).numpy()  # the *train-form* model: export must equal it after fusing
    # the two images must get clearly different logits, else the parity check would be vacuous
    assert np.abs(want[0] - want[1]).max() > 0.05
    got = _run(out, x.numpy())
    assert got.shape == (2, 7)
    err = np.abs(got - want).max()
    assert err < 1e-3 * max(1.0, np.abs(want).max()), err
    assert info["validation"]["max_abs_diff_vs_torch"] < 1e-3
    assert info["variant"] == repvit.models.registry.canonical_name(name)


def test_dynamic_batch(m06, tmp_path):
    out = tmp_path / "dyn.onnx"
    info = export_onnx(m06, out, input_size=(64, 64), dynamic_batch=True)
    assert info["dynamic_batch"] and info["validation"]["validated_batch"] == 2
    for b in (1, 3, 5):
        x = torch.randn(b, 3, 64, 64)
        with torch.no_grad():
            want = m06(x).numpy()
        np.testing.assert_allclose(_run(out, x.numpy()), want, atol=1e-4, rtol=1e-4)


def test_static_batch_rejects_other_batch(m06, tmp_path):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
    out = tmp_path / "static.onnx"
    export_onnx(m06, out, input_size=(64, 64))
    inp = ort_session(out).get_inputs()[0]
    assert inp.shape == [1, 3, 64, 64]                      # a static batch of 1 (no symbolic batch dimension)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = m06(x).numpy()
    got = _run(out, x.numpy())                              # batch 1 runs and agrees with PyTorch
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, want, atol=1e-3 * max(1.0, np.abs(want).max()), rtol=0)
    with pytest.raises(InvalidArgument, match=r"invalid dimensions for input: input[\s\S]*index: 0 Got: 2 Expected: 1"):
        _run(out, np.zeros((2, 3, 64, 64), np.float32))


@pytest.mark.parametrize("bake", ["uint8", "float"])
def test_baked_preprocessing(m06, tmp_path, bake):
    out = tmp_path / f"{bake}.onnx"
    info = export_onnx(m06, out, input_size=(64, 64), bake_preprocessing=bake, batch_size=2)
    pre = info["preprocessing"]
    raw = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    x01 = raw.float() / 255
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = m06((x01 - mean) / std).numpy()
    feed = raw.numpy() if bake == "uint8" else x01.numpy()
    s = ort_session(out)
    assert s.get_inputs()[0].type == ("tensor(uint8)" if bake == "uint8" else "tensor(float)")
    np.testing.assert_allclose(s.run(None, {"input": feed})[0], want, atol=1e-4, rtol=1e-4)
    assert info["input_dtype"] == ("uint8" if bake == "uint8" else "float32")


def test_sidecar_fields(m06, tmp_path):
    out = tmp_path / "m.onnx"
    export_onnx(m06, out, input_size=(96, 64), opset=17, slim=True)
    side = json.loads(sidecar_path(out).read_text())
    assert side["variant"] == "repvit_m0_6"
    assert side["form"] == "deploy" and side["source_form"] == "train"
    assert side["input_size"] == [3, 96, 64]
    assert side["preprocessing"]["mean"] == pytest.approx(list(m06.preprocessing["mean"]))
    assert side["opset"] == 17
    assert side["sha256"] == sha256_of(out)
    assert side["slimmed_with"]
    assert side["validation"]["batchnorm_nodes"] == 0
    # the shape is really 96x64
    assert _run(out, np.zeros((1, 3, 96, 64), np.float32)).shape == (1, 10)


def test_from_checkpoints_train_and_deploy_form(m06, tmp_path):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = m06(x).numpy()
    for form, model in (("train", m06), ("deploy", repvit.reparameterize(m06))):
        ck = tmp_path / f"{form}.safetensors"
        repvit.save_checkpoint(model, ck)
        fused = load_source(str(ck))
        assert fused.variant == "repvit_m0_6" and fused._export_source_form == form
        out = tmp_path / f"{form}.onnx"
        info = export_onnx(fused, out)
        assert info["source_form"] == form and info["input_size"] == [3, 64, 64]  # size from the checkpoint
        np.testing.assert_allclose(_run(out, x.numpy()), want, atol=1e-4, rtol=1e-4)


def test_errors(m06, tmp_path):
    with pytest.raises(ValueError, match="unknown RepViT variant"):
        load_source("repvit_m9_9")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_source(str(tmp_path / "missing.safetensors"))
    ck = tmp_path / "m06.safetensors"
    repvit.save_checkpoint(m06, ck)
    with pytest.raises(ValueError, match="repvit_m0_6"):
        load_source(str(ck), model="repvit_m1_0")  # checkpoint of another variant
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(m06, tmp_path / "no" / "such" / "dir.onnx")
    with pytest.raises(ValueError, match="is a directory"):
        export_onnx(m06, tmp_path)
    if Path("/proc/self").exists():   # not writable even for root, whose permission check (os.access) passes there
        with pytest.raises(ValueError, match="'/proc' is not writable"):
            export_onnx(m06, "/proc/m06.onnx")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(m06, tmp_path / "old.onnx", opset=13)
    with pytest.raises(ValueError, match="too small"):
        export_onnx(m06, tmp_path / "tiny.onnx", input_size=(16, 16))
    assert not list(tmp_path.glob("*.onnx"))  # nothing half-written left behind
