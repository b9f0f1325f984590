"""ExecuTorch INT8 (PT2E + XNNPACK): accuracy on the digits probe, keep-float groups, flag checks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import repvit
from repvit.cli import main as cli_main
from repvit.export.common import Preprocess
from repvit.export.executorch_int8 import keep_float_module_names
from repvit.export.source import to_deploy

from .test_quantize import MAX_DROP, digits_ckpt, quantize_cli_within_bound  # noqa: F401  (the digits probe fixture)


def test_keep_float_groups_name_the_right_layers():
    fused = to_deploy(repvit.create_model("repvit_m0_6", num_classes=10)).eval()
    convs = {n: m for n, m in fused.named_modules() if isinstance(m, nn.Conv2d)}
    dw = keep_float_module_names(fused, ["depthwise"])
    assert dw and all(convs[n].groups == convs[n].in_channels > 1 for n in dw)
    assert len(dw) == sum(1 for m in convs.values() if m.groups > 1)
    assert keep_float_module_names(fused, ["stem"]) == ["stem.conv1"]
    assert keep_float_module_names(fused, ["head"]) == ["head.head"]
    se = keep_float_module_names(fused, ["se"])
    assert se and all(".se." in n for n in se) and len(se) == sum(1 for n in convs if ".se." in n)
    # baked preprocessing wraps the model: the names follow the wrapper's paths
    wrapped = Preprocess(fused, [0.5], [0.5], "uint8")
    assert keep_float_module_names(wrapped, ["stem", "head"]) == ["model.head.head", "model.stem.conv1"]
    with pytest.raises(ValueError, match="unknown"):
        keep_float_module_names(fused, ["bogus"])


def test_cli_rejects_other_backends_flags_and_suffixes(tmp_path, capsys):
    base = ["quantize", "repvit_m0_6", "--calib", "digits"]
    assert cli_main(base + ["--out", str(tmp_path / "q.pte"), "--method", "entropy"]) == 2
    assert "--method do not apply to --backend executorch" in capsys.readouterr().err
    assert cli_main(base + ["--out", str(tmp_path / "q.onnx"), "--backend", "executorch"]) == 2
    assert "must end in .pte" in capsys.readouterr().err
    assert cli_main(base + ["--out", str(tmp_path / "q.pte"), "--backend", "onnxruntime"]) == 2
    assert "ExecuTorch program" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_executorch_int8_keeps_accuracy_and_runs(digits_ckpt, tmp_path, capsys):  # noqa: F811
    """The .pte runs in the ExecuTorch runtime, agrees with its PT2E reference, and stays within the stated
    accuracy bound on the whole held-out digits split; --keep-float depthwise leaves exactly those layers float."""
    pytest.importorskip("executorch.runtime", reason="executorch is not installed (pip install 'repvit[executorch]')")
    ckpt, fused = digits_ckpt
    out = tmp_path / "q.pte"
    info = quantize_cli_within_bound(ckpt, out, 64, capsys, extra=["--keep-float", "depthwise"])
    assert out.is_file() and info["format"] == "executorch-int8" and info["size_bytes"] == out.stat().st_size
    n_dw = sum(1 for m in fused.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    n_layers = sum(1 for m in fused.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert info["layers"] == {"int8": n_layers - n_dw, "float": n_dw}
    v = info["validation"]
    assert v["runtime"] == "executorch.runtime"
    # the runtime ran an INT8 program (not fp32), in the same range as PT2E's simulation of it; no tighter bound:
    # XNNPACK's integer kernels round differently from the fp32 simulation, and the probe's random deep features
    # with a fitted linear head amplify any difference (accuracy above is the real check)
    with torch.no_grad():
        scale = fused(torch.randn(1, 1, 32, 32)).abs().max().item()
    assert 0 < v["max_abs_diff_vs_fp32"] < scale and v["max_abs_diff_vs_pt2e"] < scale, v
    assert info["latency_ms_batch1"]["int8"] > 0
    side = json.loads((tmp_path / "q.pte.json").read_text())
    assert side["quantization"]["kept_float"] == ["depthwise"] and side["quantization"]["calibration"]["images"] == 64


@pytest.mark.parametrize("failure", ["broken program", "loader error", "runtime missing"])
def test_broken_program_is_not_published(tmp_path, monkeypatch, failure):
    """Only a missing runtime (ImportError) lets the .pte be written unchecked; a program the runtime cannot load
    (here: a real ExecuTorch runtime given junk bytes, or a loader raising RuntimeError) aborts before publishing.
    The (slow) lowering is faked: it returns junk bytes and a trivial PT2E graph."""
    pytest.importorskip("executorch.runtime", reason="executorch is not installed (pip install 'repvit[executorch]')")
    import repvit.export.executorch_int8 as ei

    from .conftest import small_model

    monkeypatch.setattr(ei, "xnnpack_program", lambda *a, **k: (
        type("Prog", (), {"buffer": b"not an ExecuTorch program" * 4})(), torch.fx.symbolic_trace(nn.Identity())))
    if failure == "loader error":
        def loader(path):
            raise RuntimeError("Failed to load program")
        monkeypatch.setattr(ei, "_runtime_method", loader)
    elif failure == "runtime missing":
        def loader(path):
            raise ImportError("No module named 'executorch.extension.pybindings._portable_lib'")
        monkeypatch.setattr(ei, "_runtime_method", loader)
    model = small_model(in_chans=1, size=32, num_classes=10)
    model.preprocessing = {"input_size": [1, 32, 32], "mean": [0.3], "std": [0.35], "interpolation": "bilinear",
                           "crop_pct": 1.0}
    out = tmp_path / "q.pte"
    kw = dict(calib="digits", num_calib=2, measure_latency=False)
    if failure == "runtime missing":
        # asked for the held-out comparison, which needs the runtime: an error, nothing published
        with pytest.raises(RuntimeError, match="--eval"):
            ei.quantize_executorch(model, out, eval_data="digits", num_eval=4, **kw)
        assert not list(tmp_path.iterdir())
        info = ei.quantize_executorch(model, out, **kw)
        assert out.is_file() and "executorch runtime unavailable" in info["validation"]["skipped"]
        return
    with pytest.raises(RuntimeError, match="load"):
        ei.quantize_executorch(model, out, **kw)
    assert not list(tmp_path.iterdir())
