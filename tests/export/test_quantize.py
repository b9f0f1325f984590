"""INT8 quantization: runs, keeps accuracy on a small trained model, sensitive-layer selection, calibration input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import repvit
from repvit.bench import machine
from repvit.bench.machine import int8_overflow_risk
from repvit.cli import main as cli_main
from repvit.export import evaluate_onnx, quantize_onnx, sidecar_path
from repvit.export.calib import load_images, normalise
from repvit.export.onnx_export import count_ops
from repvit.export.quantize import sensitive_nodes
from repvit.export.source import to_deploy

from .conftest import small_model

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("sklearn", reason="scikit-learn (digits dataset) is not installed")

# stated bound: INT8 may lose at most this many top-1 points against fp32 on the digits probe model
MAX_DROP = 5.0


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> tuple:
    """A small *trained* digits classifier, fast: random RepViT-M0.6 features + a least-squares-free
    logistic-regression head fitted with LBFGS (seconds on CPU, unlike end-to-end training)."""
    model = small_model(in_chans=1, size=32, num_classes=10, seed=0)
    model.preprocessing = pre = {"input_size": [1, 32, 32], "mean": [0.3], "std": [0.35],
                                 "interpolation": "bilinear", "crop_pct": 1.0}
    xtr, ytr = load_images("digits", pre, split="train")
    fused = to_deploy(model)
    with torch.no_grad():
        feats = fused.forward_head(fused.forward_features(normalise(xtr, pre)), pre_logits=True)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    head = nn.Linear(feats.shape[1], 10)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    z = (feats - mu) / sd

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(z), ytr) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the feature standardisation into the deployed Linear
        lin = fused.head.head
        lin.weight.copy_(head.weight / sd)
        lin.bias.copy_(head.bias - (head.weight * mu / sd).sum(1))
    path = tmp_path_factory.mktemp("digits") / "digits_probe.safetensors"
    repvit.save_checkpoint(fused, path)
    return path, fused


def quantize_cli_within_bound(ckpt, out, num_calib: int, capsys, extra: list[str] | None = None) -> dict:
    """``repvit quantize CKPT --calib digits --eval digits --out OUT --json``; checks the stated accuracy
    bound on the whole held-out digits split and returns the sidecar dict the CLI printed."""
    rc = cli_main(["quantize", str(ckpt), "--calib", "digits", "--num-calib", str(num_calib), "--eval", "digits",
                   "--out", str(out), "--json", *(extra or [])])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    e = info["eval"]
    assert e["images"] == 359  # the whole held-out digits split
    assert e["top1_fp32"] > 60.0, "the probe model is not trained; the accuracy bound would be meaningless"
    assert e["top1_drop"] <= MAX_DROP, json.dumps(e)
    # a linear probe on random features has small margins, so some near-ties flip under INT8
    assert e["agreement_pct"] >= 75.0, json.dumps(e)
    return info


def test_quantize_cli_keeps_accuracy(digits_ckpt, tmp_path, capsys):
    ckpt, fused = digits_ckpt
    out = tmp_path / "int8.onnx"
    info = quantize_cli_within_bound(ckpt, out, 128, capsys)
    # the reported accuracies, recomputed here: fp32 by the fused PyTorch model, INT8 by a plain ONNX Runtime
    # session on the written file, both on the whole held-out split (not the numbers the exporter measured itself)
    import onnxruntime as ort
    xv, yv = load_images("digits", fused.preprocessing, split="val")
    xn = normalise(xv, fused.preprocessing)
    with torch.no_grad():
        top1_fp32 = (fused(xn).argmax(1) == yv).float().mean().item() * 100
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: xn.numpy()})[0]
    top1_int8 = float((logits.argmax(1) == yv.numpy()).mean() * 100)
    assert len(yv) == info["eval"]["images"] == 359
    assert info["eval"]["top1_fp32"] == pytest.approx(top1_fp32, abs=1e-4)
    assert info["eval"]["top1_int8"] == pytest.approx(top1_int8, abs=1e-4)
    assert top1_fp32 - top1_int8 <= MAX_DROP
    assert count_ops(out, "QuantizeLinear") > 50 and count_ops(out, "BatchNormalization") == 0
    side = json.loads(sidecar_path(out).read_text())
    assert side["format"] == "onnx-int8" and side["variant"] == "repvit_m0_6"
    u8 = int8_overflow_risk()       # x86 without VNNI: uint8 weights (ORT's U8U8 kernels), see quantize_onnx
    assert side["quantization"]["u8_weights"] is u8
    assert side["quantization"]["weights"] == ("uint8 asymmetric" if u8 else "int8 symmetric") + " per-channel"
    assert side["quantization"]["calibration"]["images"] == 128
    # the INT8 file really is smaller and runs on a dynamic batch
    raw, labels = load_images("digits", fused.preprocessing, split="val", limit=7, seed=3)
    res = evaluate_onnx(out, normalise(raw, fused.preprocessing).numpy(), labels.numpy(), batch=3)
    assert res["logits"].shape == (7, 10)
    assert side["size_bytes"]["int8"] < side["size_bytes"]["fp32"] / 2


def test_sensitive_node_groups(tmp_path):
    onnx = pytest.importorskip("onnx")
    from repvit.export import export_onnx

    model = to_deploy(small_model(size=32))
    export_onnx(model, tmp_path / "m.onnx", sidecar=False, validate=False)
    g = onnx.load(str(tmp_path / "m.onnx"))
    n_dw = sum(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.modules())
    assert len(sensitive_nodes(g, ["depthwise"])) == n_dw > 0
    assert sensitive_nodes(g, ["stem"]) == ["/stem/conv1/Conv"]
    assert len(sensitive_nodes(g, ["head"])) == 1
    n_se = sum(1 for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and ".se." in name)
    assert len(sensitive_nodes(g, ["se"])) == n_se > 0
    with pytest.raises(ValueError, match="keep-float"):
        sensitive_nodes(g, ["everything"])


def test_folder_calibration_and_keep_float(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    folder = tmp_path / "imgs"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            arr = np.random.RandomState(i).randint(0, 255, (40, 50, 3), dtype=np.uint8)
            pil.fromarray(arr).save(folder / cls / f"{i}.png")
    pre = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
           "crop_pct": 1.0}
    x, y = load_images(folder, pre)
    assert x.shape == (6, 3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    model = small_model(size=32, num_classes=2)  # as many classes as the folder (checked for --eval)
    out = tmp_path / "q.onnx"
    info = quantize_onnx(model, out, calib=folder, keep_float=["stem", "head"], per_channel=False,
                         bake_preprocessing="uint8", eval_data=folder)
    assert info["quantization"]["kept_float_nodes"] == 2
    assert info["quantization"]["weights"].endswith(" per-tensor")
    assert info["input_dtype"] == "uint8" and "agreement_pct" in info["eval"]
    # a folder is read whole (no split), and using it for both calibration and evaluation is flagged
    assert info["eval"]["split"] is None and info["quantization"]["calibration"]["split"] is None
    assert info["eval"]["overlaps_calibration"] is True
    assert count_ops(out, "Gemm") == 1  # the head stayed float (no QGemm-able QDQ around it)


def test_folder_images_for_a_grey_model_skip_hidden_folders(tmp_path):
    """A 1-channel model reads a folder as grey images (one mean/std value, not three), and a hidden folder such as
    .ipynb_checkpoints is neither a class nor a source of images (as in training's folder reader)."""
    pil = pytest.importorskip("PIL.Image")
    folder = tmp_path / "imgs"
    for cls in (".ipynb_checkpoints", "a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(2):
            arr = np.random.RandomState(i).randint(0, 255, (30, 30, 3), dtype=np.uint8)
            pil.fromarray(arr).save(folder / cls / f"{i}.png")
    pre = {"input_size": [1, 24, 24], "mean": [0.5], "std": [0.5], "interpolation": "bilinear", "crop_pct": 1.0}
    x, y = load_images(folder, pre)
    assert x.shape == (4, 1, 24, 24) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.tolist() == [0, 0, 1, 1]


def test_prepare_inputs_true_means_float_as_in_export():
    """bake_preprocessing=True exports a 0..1 float input (export_onnx); the calibration/eval feed must match."""
    from repvit.export.quantize import prepare_inputs
    raw = torch.rand(2, 3, 8, 8)
    pre = {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert np.array_equal(prepare_inputs(raw, pre, True), prepare_inputs(raw, pre, "float"))
    assert np.array_equal(prepare_inputs(raw, pre, "float"), raw.numpy())
    assert np.allclose(prepare_inputs(raw, pre, None), ((raw - 0.5) / 0.25).numpy())


def test_calibration_errors(tmp_path, m06):
    pre = m06.preprocessing
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_images(tmp_path / "nowhere", pre)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_images(tmp_path / "empty", pre)
    with pytest.raises(ValueError, match="method"):
        quantize_onnx(m06, tmp_path / "q.onnx", calib="digits", method="magic")


def test_missing_held_out_set_is_not_called_a_calibration_source(tmp_path, m06):
    from repvit.export.quantize import load_held_out
    with pytest.raises(FileNotFoundError, match="neither an existing folder") as err:
        load_held_out(tmp_path / "no_such_folder", m06.preprocessing, None, 4, 0)
    assert "calibration" not in str(err.value) and "held-out set (--eval)" in str(err.value), str(err.value)


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["export", "repvit_m0_7", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "unknown RepViT variant" in capsys.readouterr().err
    assert cli_main(["export", "repvit_m0_6", "--format", "onnx", "--out", str(tmp_path / "x" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["export", "repvit_m0_6", "--format", "coreml", "--out", str(tmp_path / "m.onnx")]) == 2
    assert ".mlpackage" in capsys.readouterr().err
    assert cli_main(["quantize", "repvit_m0_6", "--calib", str(tmp_path / "none"), "--out", str(tmp_path / "q.onnx")]) == 2
    assert "calibration source" in capsys.readouterr().err


def test_cli_export_onnx(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = cli_main(["export", "repvit_m0_6", "--format", "onnx", "--out", str(out), "--input-size", "64", "64",
                   "--dynamic-batch", "--num-classes", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "0 BatchNormalization nodes" in text and "max |ORT - PyTorch|" in text
    side = json.loads(sidecar_path(out).read_text())
    assert side["input_size"] == [3, 64, 64] and side["dynamic_batch"] and side["num_classes"] == 5


def test_grey_builtin_calibration_feeds_an_rgb_model():
    """Digits are grey; an ImageNet-style 3-channel model gets them replicated to RGB (a broadcast view
    that must not be written in place - this used to raise for every RGB model calibrated on digits)."""
    pre = {"input_size": [3, 24, 24], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
           "crop_pct": 1.0}
    x, y = load_images("digits", pre, split="train", limit=5)
    assert x.shape == (5, 3, 24, 24) and y.shape == (5,)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


@pytest.mark.parametrize("flags,arch,risk", [
    ({"avx2"}, "x86_64", True),                         # AVX2 only (e.g. AMD EPYC Zen 2/3): vpmaddubsw saturates
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),
    ({"avx2", "avx_vnni"}, "x86_64", False),
    ({"avx2"}, "aarch64", False),
    (set(), "x86_64", False),                           # no AVX2: not the vpmaddubsw kernels either
])
def test_int8_overflow_risk_follows_the_cpu_flags(monkeypatch, flags, arch, risk):
    monkeypatch.setattr(machine, "cpu_flags", lambda: {f: f in flags for f in machine._FLAGS})
    monkeypatch.setattr(machine.platform, "machine", lambda: arch)
    assert int8_overflow_risk() is risk


@pytest.mark.parametrize("cpu_risk", [False, True])
def test_resolve_no_vnni_explicit_choice_wins_none_follows_the_cpu(monkeypatch, cpu_risk):
    """The exporters' shared default: ``None`` asks this CPU, ``True``/``False`` are kept whatever the CPU."""
    monkeypatch.setattr(machine, "int8_overflow_risk", lambda: cpu_risk)
    assert machine.resolve_no_vnni(None) is cpu_risk
    assert machine.resolve_no_vnni(True) is True
    assert machine.resolve_no_vnni(False) is False


@pytest.mark.parametrize("u8", [False, True])
def test_u8_weights_choice_is_applied_and_recorded(tmp_path, u8):
    onnx = pytest.importorskip("onnx")
    info = quantize_onnx(small_model(size=32), tmp_path / "q.onnx", calib="digits", num_calib=8, u8_weights=u8,
                         input_size=(32, 32))
    assert info["quantization"]["u8_weights"] is u8
    g = onnx.load(str(tmp_path / "q.onnx"))
    # the sidecar's opset is the one the INT8 file imports (the quantizer may change it), not just the request
    assert info["opset"] == next(o.version for o in g.opset_import if o.domain in ("", "ai.onnx"))
    assert info["opset_requested"] == 20
    inits = {i.name: i.data_type for i in g.graph.initializer}
    weight_q = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and inits[n.input[0]] in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
    assert weight_q, "no quantized weights found"
    want = onnx.TensorProto.UINT8 if u8 else onnx.TensorProto.INT8
    assert {inits[n.input[0]] for n in weight_q} == {want}


def test_cli_no_vnni_target_overrides_the_cpu(digits_ckpt, tmp_path, capsys):
    """``--no-vnni-target yes|no`` decides the weight type whatever this CPU is."""
    m06_ckpt, _ = digits_ckpt
    for choice, u8 in (("yes", True), ("no", False)):
        out = tmp_path / f"q_{choice}.onnx"
        rc = cli_main(["quantize", str(m06_ckpt), "--calib", "digits", "--num-calib", "8", "--input-size", "32", "32",
                       "--no-vnni-target", choice, "--out", str(out), "--json"])
        assert rc == 0
        info = json.loads(capsys.readouterr().out)
        assert info["quantization"]["u8_weights"] is u8


def _class_folder(root, classes, n=1):
    from PIL import Image
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.random.RandomState(i).randint(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png")
    return root


def test_eval_labels_must_match_the_models_classes(tmp_path):
    """Labels are class indices: a held-out set with another number of classes than the model is refused (before
    the slow quantization, so nothing is written), for a folder and for a built-in dataset."""
    pytest.importorskip("PIL.Image")
    folder = _class_folder(tmp_path / "val", ["cat", "dog", "fox"])
    pre = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
           "crop_pct": 1.0}
    with pytest.raises(ValueError, match=r"has 3 classes \(sub-folders cat, dog, fox\) but the model has 10"):
        load_images(folder, pre, split="val", num_classes=10)
    assert load_images(folder, pre, split="val", num_classes=3)[1].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="digits has 10 classes .* but the model has 1000"):
        load_images("digits", pre, split="val", limit=2, num_classes=1000)
    model = small_model(size=32)  # 10 classes
    out = tmp_path / "q.onnx"
    with pytest.raises(ValueError, match="but the model has 10"):
        quantize_onnx(model, out, calib="digits", num_calib=2, eval_data=folder)
    assert not out.exists() and not sidecar_path(out).exists()


def test_num_eval_must_be_positive(tmp_path, capsys):
    for n in ("0", "-3"):
        rc = cli_main(["quantize", "repvit_m0_6", "--num-classes", "10", "--input-size", "32", "32", "--calib", "digits",
                       "--num-calib", "2", "--eval", "digits", "--num-eval", n, "--out", str(tmp_path / "q.onnx")])
        err = capsys.readouterr().err
        assert rc == 2 and "--num-eval must be at least 1" in err, err
    with pytest.raises(ValueError, match="at least 1"):
        load_images("digits", {"input_size": [1, 8, 8], "mean": [0.5], "std": [0.5]}, limit=0)
    assert not list(tmp_path.iterdir())


def test_eval_folder_inside_the_calibration_folder_is_flagged(tmp_path):
    from repvit.export.calib import source_facts

    calib = tmp_path / "images"
    (calib / "val").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    assert source_facts(calib / "val", "val", calib)["overlaps_calibration"] is True   # eval inside calibration
    assert source_facts(calib, "val", calib / "val")["overlaps_calibration"] is True   # calibration inside eval
    assert source_facts(calib, "val", calib)["overlaps_calibration"] is True
    assert "overlaps_calibration" not in source_facts(tmp_path / "other", "val", calib)
    assert "overlaps_calibration" not in source_facts(calib / "val", "val", "digits")
