"""INT8 post-training static quantization with ONNX Runtime (QDQ format).

Re-parameterised depthwise nets are touchy under INT8: folding the 3x3, 1x1 and identity branches
and the BatchNorms into one depthwise kernel gives per-channel weight ranges that differ by orders
of magnitude, so per-tensor weight scales crush the small channels. The standard remedies are
offered as options: per-channel weight scales (default on), and keeping sensitive layers in float
(``keep_float``: the first conv, the depthwise convs, the SE gates, the head).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .calib import load_images, normalise, source_facts
from .common import atomic_output, check_writable, get_preprocessing, model_info, require, write_sidecar
from .onnx_export import count_ops, export_onnx, onnx_opset, ort_session
from .source import to_deploy

__all__ = ["quantize_onnx", "evaluate_onnx", "sensitive_nodes", "KEEP_FLOAT_CHOICES", "prepare_inputs",
           "check_keep_float", "classification_result", "compare_fp32_int8", "load_held_out"]

KEEP_FLOAT_CHOICES = ("stem", "depthwise", "se", "head")
# ops worth running in INT8: the convolutions and the classifier matmul carry ~all the MACs;
# element-wise ops (GELU's Erf chain, residual Add, SE Mul) stay float so no extra rounding is added there
_OPS = ["Conv", "Gemm", "MatMul"]


def check_keep_float(groups: Iterable[str]) -> set[str]:
    """The keep-float groups as a set; a clear error for any name not in ``KEEP_FLOAT_CHOICES``."""
    groups = set(groups)
    bad = groups - set(KEEP_FLOAT_CHOICES)
    if bad:
        raise ValueError(f"unknown keep-float group(s) {sorted(bad)}; choose from {', '.join(KEEP_FLOAT_CHOICES)}")
    return groups


def sensitive_nodes(onnx_model: Any, groups: Iterable[str]) -> list[str]:
    """Names of the nodes in the given groups (see ``KEEP_FLOAT_CHOICES``) of a RepViT ONNX graph."""
    groups = check_keep_float(groups)
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx_model.graph.initializer}
    convs = [n for n in onnx_model.graph.node if n.op_type == "Conv"]
    names: list[str] = []
    if "stem" in groups and convs:
        names.append(convs[0].name)  # the graph is topologically sorted: first conv = stem.conv1
    for n in convs:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = inits.get(n.input[1])
        cin_per_group = numpy_helper.to_array(w).shape[1] if w is not None else None
        if "depthwise" in groups and group > 1 and cin_per_group == 1:
            names.append(n.name)
        # SE convs (on the pooled 1x1 map) keep their module path in the node name: .../se/fc1/Conv
        if "se" in groups and ("/se/" in n.name or ".se." in n.name):
            names.append(n.name)
    if "head" in groups:
        names += [n.name for n in onnx_model.graph.node if n.op_type in ("Gemm", "MatMul")]
    return sorted(set(names))


def prepare_inputs(raw: torch.Tensor, pre: dict[str, Any], bake: str | bool | None) -> np.ndarray:
    """Raw 0..1 images -> what the graph's input expects (normalised float, 0..1 float or uint8).

    ``bake`` as in :func:`repvit.export.export_onnx`: ``True`` means ``"float"`` there, so here too."""
    if bake is True:
        bake = "float"
    if bake == "uint8":
        return (raw * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    if bake == "float":
        return raw.numpy()
    return normalise(raw, pre).numpy()


class _Reader:
    """ORT CalibrationDataReader over an in-memory batch list (duck-typed: get_next/rewind)."""

    def __init__(self, name: str, data: np.ndarray, batch: int) -> None:
        self.name, self.batches = name, [data[i:i + batch] for i in range(0, len(data), batch)]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def evaluate_onnx(path: str | os.PathLike, inputs: np.ndarray, labels: np.ndarray | None, *, batch: int = 64,
                  threads: int | None = None) -> dict[str, Any]:
    """Top-1 accuracy (if labels) and the predictions of an ONNX classifier over ``inputs``."""
    sess = ort_session(path, threads=threads)
    name = sess.get_inputs()[0].name
    static = isinstance(sess.get_inputs()[0].shape[0], int)
    step = sess.get_inputs()[0].shape[0] if static else batch
    logits = np.concatenate([sess.run(None, {name: inputs[i:i + step]})[0] for i in range(0, len(inputs), step)])
    return classification_result(logits, labels)


def load_held_out(eval_data: str | os.PathLike, pre: dict[str, Any], bake: str | bool | None, num_eval: int | None,
                  seed: int, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``--eval`` images as the graph's input, and their labels (None for an unlabelled folder).

    Called before quantizing, so a bad path fails before the slow part; seeded apart from calibration.
    ``num_classes``: the model's class count; a labelled set with another number of classes (class folders, or
    a built-in dataset's classes) is refused, as its top-1 would be meaningless (see :func:`load_images`)."""
    if num_eval is not None and num_eval < 1:
        raise ValueError(f"--num-eval must be at least 1, got {num_eval}")
    raw, labels = load_images(eval_data, pre, split="val", limit=num_eval, seed=seed + 1, num_classes=num_classes)
    return prepare_inputs(raw, pre, bake), (labels.numpy() if labels is not None else None)


def classification_result(logits: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """``{"n", "pred", "logits"[, "top1"]}`` of a classifier's logits (top-1 in percent when labelled)."""
    pred = logits.argmax(1)
    out: dict[str, Any] = {"n": int(len(pred)), "pred": pred, "logits": logits}
    if labels is not None:
        out["top1"] = float((pred == np.asarray(labels)).mean() * 100.0)
    return out


def compare_fp32_int8(a: dict[str, Any], b: dict[str, Any], source: Any, labelled: bool,
                      calib: Any = None) -> dict[str, Any]:
    """The held-out comparison stored in a sidecar: agreement, and top-1 of both and the drop if labelled."""
    res: dict[str, Any] = {**source_facts(source, "val", calib), "images": a["n"],
                           "agreement_pct": float((a["pred"] == b["pred"]).mean() * 100.0)}
    if labelled:
        res.update({"top1_fp32": a["top1"], "top1_int8": b["top1"], "top1_drop": a["top1"] - b["top1"]})
    return res


def quantize_onnx(
    model: nn.Module, path: str | os.PathLike, *, calib: str | os.PathLike, input_size: tuple[int, int] | None = None,
    num_calib: int = 256, per_channel: bool = True, keep_float: Sequence[str] = (), method: str = "minmax",
    symmetric_activations: bool = False, bake_preprocessing: str | None = None, eval_data: str | os.PathLike | None = None,
    num_eval: int | None = 2000, opset: int = 20, seed: int = 0, sidecar: bool = True, u8_weights: bool | None = None,
) -> dict[str, Any]:
    """Post-training static INT8 quantization (ONNX Runtime, QDQ) of the fused ``model`` to ``path``.

    ``calib``: folder of images or ``fashion-mnist``/``digits`` (its train split; ``num_calib`` images).
    ``per_channel``: per-output-channel weight scales (strongly advised for re-parameterised nets).
    ``keep_float``: groups left in float (``stem``, ``depthwise``, ``se``, ``head``).
    ``method``: ``minmax``, ``entropy`` or ``percentile`` activation calibration.
    ``eval_data``: optional held-out set (``fashion-mnist``/``digits`` val split, or a class folder):
    top-1 of fp32 and INT8 and their agreement go into the returned dict and the sidecar.
    Activations are uint8 (asymmetric) and weights int8, ONNX Runtime's fast path on x86 (VNNI).
    ``u8_weights``: uint8 (asymmetric) weights, so ONNX Runtime runs its U8U8 kernels, which x86 CPUs without
    VNNI need: their uint8 x int8 kernels saturate an int16 and accuracy collapses (ORT's other remedy, 7-bit
    ``reduce_range`` weights, lost 5.8 points on the digits probe vs 39.6 without and < 5 with U8U8).
    ``None`` (default) turns it on when *this* CPU lacks VNNI (:func:`repvit.bench.machine.int8_overflow_risk`);
    pass ``True`` when quantizing for such a target elsewhere.
    ``opset`` defaults to 20, where GELU is one ``Gelu`` node: at 18 it is a five-op Erf chain that
    stays float between QuantizeLinear/DequantizeLinear pairs and eats most of the INT8 gain.
    """
    ort = require("onnxruntime", "INT8 quantization")
    onnx = require("onnx", "INT8 quantization")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(methods)}")
    if num_calib < 1:
        raise ValueError("num_calib must be at least 1")
    out = check_writable(path)
    from ..bench.machine import resolve_no_vnni      # lazy: importing repvit.bench loads the harness
    u8_weights = resolve_no_vnni(u8_weights)
    fused = to_deploy(model)
    pre = get_preprocessing(fused, input_size)
    raw, _ = load_images(calib, pre, split="train", limit=num_calib, seed=seed)
    calib_in = prepare_inputs(raw, pre, bake_preprocessing)
    held_out = None if eval_data is None else load_held_out(eval_data, pre, bake_preprocessing, num_eval, seed,
                                                            fused.num_classes)

    with tempfile.TemporaryDirectory(prefix="repvit-int8-") as td:
        fp32 = Path(td) / "fp32.onnx"
        export_onnx(fused, fp32, input_size=input_size, dynamic_batch=True, opset=opset,
                    bake_preprocessing=bake_preprocessing, sidecar=False)
        prep = Path(td) / "prep.onnx"
        # shape inference + ORT's float graph clean-up, as ORT recommends before static quantization
        quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
        graph = onnx.load(str(prep))
        exclude = sensitive_nodes(graph, keep_float)
        with atomic_output(out) as tmp:
            quantize_static(
                str(prep), str(tmp), _Reader(graph.graph.input[0].name, calib_in, 32),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=_OPS, per_channel=per_channel,
                activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                weight_type=QuantType.QUInt8 if u8_weights else QuantType.QInt8, nodes_to_exclude=exclude,
                calibrate_method=methods[method],
                extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": not u8_weights},
            )
            onnx.checker.check_model(str(tmp))
            n_q = count_ops(tmp, "QuantizeLinear")
            written_opset = onnx_opset(tmp)  # the quantizer may raise the opset: record what the file imports
            result: dict[str, Any] = {"quantized_activation_points": n_q}
            if held_out is not None:
                x, y = held_out
                result["eval"] = compare_fp32_int8(evaluate_onnx(fp32, x, y), evaluate_onnx(tmp, x, y), eval_data,
                                                   y is not None, calib)
            fp32_size = fp32.stat().st_size
            int8_size = tmp.stat().st_size

    info = model_info(fused, pre)
    info.update({
        "format": "onnx-int8", "opset": written_opset, "opset_requested": opset,
        "target": f"onnxruntime {ort.__version__} QDQ static INT8",
        "quantization": {
            "format": "QDQ",
            "weights": ("uint8 asymmetric " if u8_weights else "int8 symmetric ")
                       + ("per-channel" if per_channel else "per-tensor"),
            "u8_weights": bool(u8_weights),
            "activations": "int8 symmetric" if symmetric_activations else "uint8 asymmetric",
            "op_types": _OPS, "calibration": {**source_facts(calib, "train"), "images": int(len(calib_in)),
                                              "method": method},
            "kept_float": list(keep_float), "kept_float_nodes": len(exclude),
        },
        "dynamic_batch": True, "input_name": "input", "output_name": "logits", "input_layout": "NCHW",
        "preprocessing_baked": bool(bake_preprocessing),
        "input_dtype": "uint8" if bake_preprocessing == "uint8" else "float32",
        "size_bytes": {"fp32": fp32_size, "int8": int8_size}, **result,
    })
    if sidecar:
        info["sidecar"] = str(write_sidecar(out, info))
    return info

