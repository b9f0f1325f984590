"""TorchScript, torch.export (.pt2) and ExecuTorch exports load back and match the eager model."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from repvit.export import export_executorch, export_program, export_torchscript, sha256_of, sidecar_path

from .conftest import small_model


@pytest.fixture(scope="module")
def m32():
    return small_model(size=32)


def test_torchscript(m32, tmp_path):
    out = tmp_path / "m.pt"
    info = export_torchscript(m32, out)
    loaded = torch.jit.load(str(out))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m32(x), atol=1e-4, rtol=1e-4)
    side = json.loads(sidecar_path(out).read_text())
    assert side["format"] == "torchscript" and side["sha256"] == sha256_of(out) and side["input_size"] == [3, 32, 32]
    assert info["validation"]["max_abs_diff_vs_eager"] < 1e-4


def test_program_dynamic_batch(m32, tmp_path):
    out = tmp_path / "m.pt2"
    export_program(m32, out, dynamic_batch=True, bake_preprocessing="uint8")
    prog = torch.export.load(str(out)).module()
    raw = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    pre = m32.preprocessing
    x = (raw.float() / 255 - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(prog(raw), m32(x), atol=1e-4, rtol=1e-4)
    assert json.loads(sidecar_path(out).read_text())["dynamic_batch"] is True


def test_missing_executorch_names_the_package(m32, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)
    with pytest.raises(RuntimeError, match="pip install executorch"):
        export_executorch(m32, tmp_path / "m.pte")


@pytest.mark.slow
def test_executorch_xnnpack(m32, tmp_path):
    pytest.importorskip("executorch", reason="executorch is not installed")
    out = tmp_path / "m.pte"
    info = export_executorch(m32, out)
    assert out.stat().st_size > 0 and info["target"] == "executorch/xnnpack"
    v = info["validation"]
    if "skipped" in v:
        pytest.skip(v["skipped"])
    assert v["max_abs_diff_vs_eager"] < 1e-3
