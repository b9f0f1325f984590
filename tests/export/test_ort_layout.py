"""The ONNX Runtime NCHWc pass for SE blocks: same function, the pattern rewritten, ORT's layout reorders gone."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from repvit.export import export_onnx
from repvit.export.onnx_export import count_ops, ort_session

from .conftest import small_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def _ort_optimized_ops(path, tmp_path) -> collections.Counter:
    """Op types of the graph ONNX Runtime actually runs on this CPU (all optimisations, NCHWc included)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / (path.stem + ".ort.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_pass_keeps_the_function_and_rewrites_every_se(tmp_path, dynamic_batch):
    model = small_model("repvit_m0_6", num_classes=7)
    n_se = sum(type(m).__name__ == "SqueezeExcite" for m in model.modules())
    plain, fast = tmp_path / "plain.onnx", tmp_path / "nchwc.onnx"
    export_onnx(model, plain, input_size=(64, 64), dynamic_batch=dynamic_batch, sidecar=False)
    info = export_onnx(model, fast, input_size=(64, 64), dynamic_batch=dynamic_batch, ort_nchwc=True)
    # every SE's squeeze and excite rewritten; nothing else (the head's pooling drops the dims: not a squeeze)
    assert n_se > 0 and info["ort_nchwc"] == {"pools": n_se, "gates": n_se}
    assert count_ops(plain, "ReduceMean") == n_se + 1 and count_ops(fast, "ReduceMean") == 1
    assert count_ops(fast, "GlobalAveragePool") == n_se and count_ops(fast, "Resize") == n_se
    assert count_ops(fast, "BatchNormalization") == 0
    x = torch.randn(3 if dynamic_batch else 1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x).numpy()
    s = ort_session(fast)
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)
    assert info["validation"]["max_abs_diff_vs_torch"] < 1e-3


def test_ort_runs_the_rewritten_graph_without_layout_reorders(tmp_path):
    """The point of the pass: in the graph ORT optimises for this CPU, the SE blocks no longer force blocked
    <-> plain layout conversions. A few stay: the one before the classifier's pooling, and a squeeze whose
    channels (or reduced channels) are not a multiple of the CPU's block (M0.6's first stage: 40 -> 8 with
    16-channel AVX-512 blocks)."""
    model = small_model("repvit_m0_6", num_classes=7)
    plain, fast = tmp_path / "plain.onnx", tmp_path / "nchwc.onnx"
    export_onnx(model, plain, input_size=(64, 64), sidecar=False, validate=False)
    export_onnx(model, fast, input_size=(64, 64), sidecar=False, validate=False, ort_nchwc=True)
    before, after = _ort_optimized_ops(plain, tmp_path), _ort_optimized_ops(fast, tmp_path)
    reorders = lambda c: c["ReorderInput"] + c["ReorderOutput"]  # noqa: E731
    if reorders(before) == 0:
        pytest.skip("ONNX Runtime uses no NCHWc layout on this CPU (needs AVX2 or newer): nothing to remove")
    n_se = sum(type(m).__name__ == "SqueezeExcite" for m in model.modules())
    assert reorders(before) >= 4 * n_se            # squeeze out/in, excite out/in per SE block at least
    assert reorders(after) * 4 <= reorders(before), (before, after)
    assert after["Upsample"] == n_se               # ORT runs the gate's Resize in the blocked layout


def test_pass_leaves_a_graph_without_the_pattern_alone(tmp_path):
    from onnx import TensorProto, helper

    from repvit.export.ort_layout import nchwc_friendly_se
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    g = helper.make_graph([helper.make_node("ReduceMean", ["x", "axes"], ["m"]),   # over channels: not a squeeze
                           helper.make_node("Mul", ["x", "m"], ["y"])],            # gate (1, 1, 5, 5): not an SE
                          "g", [x], [y], [axes])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    before = m.SerializeToString()
    m, counts = nchwc_friendly_se(m)
    assert counts == {"pools": 0, "gates": 0} and m.SerializeToString() == before


def test_cli_flag_only_for_onnx(tmp_path, capsys):
    from repvit.cli import main
    rc = main(["export", "repvit_m0_6", "--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--ort-nchwc"])
    assert rc != 0 and "--ort-nchwc do not apply to --format torchscript" in capsys.readouterr().err
