"""INT8 post-training static quantization for OpenVINO (NNCF), the fastest INT8 path on x86 CPUs here.

ONNX Runtime's QDQ graph (``quantize.py``) keeps GELU, the residual adds and the SE gates in float, so
every block pays a dequantize/quantize round trip and INT8 gains little at batch 1. NNCF places the
FakeQuantize nodes where OpenVINO's CPU plugin can fuse them into its VNNI kernels (convolutions with
their bias/activation/residual post-ops), so the 1x1 convolutions that carry most of RepViT's MACs run
in u8/s8 end to end. The artefact is an OpenVINO IR (``model.xml`` + ``model.bin``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from .calib import load_images, source_facts
from .common import check_writable, get_preprocessing, model_info, require, sha256_of, sidecar_path, write_sidecar
from .onnx_export import export_onnx
from .quantize import check_keep_float, classification_result, compare_fp32_int8, load_held_out, prepare_inputs
from .source import to_deploy

__all__ = ["quantize_openvino", "nncf_quantize", "openvino_session", "evaluate_openvino", "precision_summary",
           "inference_precision", "PRESETS", "DEFAULT_KEEP_FLOAT"]

PRESETS = ("performance", "mixed")
# Everything NNCF would quantize, depthwise convolutions included, by default: on the static batch-1 IR
# written here the INT8 model tracks fp32 closely (logit cosine 0.9997 on RepViT-M0.9 with random BN
# statistics). Why static: OpenVINO 2026.4's CPU plugin returns wrong INT8 results for a *dynamic*-batch
# IR run at batch 1 (cosine 0.67 on the same model; batch >= 2 and static batch 1 are right), which
# looked like the classic "re-parameterised depthwise kernels break INT8" problem but is not.
DEFAULT_KEEP_FLOAT: tuple[str, ...] = ()


def _ignored_scope(ov_model: Any, groups: Sequence[str]) -> Any:
    """NNCF IgnoredScope for the keep-float groups of a RepViT graph (names follow the module paths)."""
    import nncf

    groups = check_keep_float(groups)
    names: list[str] = []
    types: list[str] = []
    patterns: list[str] = []
    if "stem" in groups:
        first = next((op for op in ov_model.get_ordered_ops() if op.get_type_name() == "Convolution"), None)
        if first is not None:
            names.append(first.get_friendly_name())
    if "depthwise" in groups:
        types.append("GroupConvolution")   # OpenVINO's form of a depthwise conv
    if "se" in groups:
        patterns.append(r".*/se/.*")
    if "head" in groups:
        types.append("MatMul")
    return nncf.IgnoredScope(names=names, types=types, patterns=patterns, validate=False)


def nncf_quantize(onnx_path: str | os.PathLike, out_xml: str | os.PathLike, calib: np.ndarray, *,
                  preset: str = "performance", keep_float: Sequence[str] = (), fast_bias_correction: bool = True,
                  overflow_fix: bool | None = None) -> Path:
    """Quantize an fp32 ONNX file with NNCF on ``calib`` (N x C x H x W, one sample per step) to OpenVINO IR.

    Writes ``out_xml`` and its ``.bin`` via a temporary directory next to them (see :func:`_publish_ir`: a
    visible ``.xml`` is never paired with another run's ``.bin``).
    ``overflow_fix``: NNCF's int16-saturation fix on every layer, which x86 CPUs without VNNI need; ``None``
    (default) turns it on when this CPU lacks VNNI (otherwise NNCF fixes only the first layer).
    """
    ov = require("openvino", "OpenVINO INT8 quantization")
    nncf = require("nncf", "OpenVINO INT8 quantization")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if len(calib) < 1:
        raise ValueError("need at least one calibration image")
    from ..bench.machine import resolve_no_vnni      # lazy: importing repvit.bench loads the harness
    overflow_fix = resolve_no_vnni(overflow_fix)
    out_xml = Path(out_xml)
    if out_xml.suffix != ".xml":
        raise ValueError(f"OpenVINO IR output must end in .xml (the weights go next to it in .bin), got {out_xml}")
    model = ov.Core().read_model(str(onnx_path))
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    logging.getLogger("nncf").setLevel(logging.WARNING)
    # NNCF draws progress bars on stdout; keep stdout for results (``repvit quantize --json`` prints JSON there)
    with contextlib.redirect_stdout(sys.stderr):
        q = nncf.quantize(
            model, dataset, subset_size=len(calib), fast_bias_correction=fast_bias_correction,
            preset=nncf.QuantizationPreset.PERFORMANCE if preset == "performance" else nncf.QuantizationPreset.MIXED,
            ignored_scope=_ignored_scope(model, keep_float) if keep_float else None,
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                overflow_fix=nncf.OverflowFix.ENABLE if overflow_fix else nncf.OverflowFix.FIRST_LAYER),
        )
    parent = out_xml.parent if str(out_xml.parent) else Path(".")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out_xml.name}.", dir=parent))
    try:
        tmp = tmpdir / out_xml.name
        ov.save_model(q, str(tmp), compress_to_fp16=False)
        _publish_ir(tmp, out_xml)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out_xml


def _publish_ir(src_xml: Path, dst_xml: Path) -> None:
    """Move an IR (``src_xml`` and its ``.bin``, both already on the target's filesystem) into place.

    Two files cannot be swapped in one atomic step, so: remove the old ``.xml`` first, then move the new
    ``.bin``, then the new ``.xml`` last. A crash part-way leaves no ``.xml`` at all (the IR is missing, the
    previous one gone) - never a new ``.bin`` read through an old ``.xml`` or the reverse."""
    for f in (src_xml, src_xml.with_suffix(".bin")):  # on disk before the renames
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    # the old sidecar goes first (as atomic_output does for the one-file formats): it describes the old model,
    # and a publish without a sidecar, or a failure before the new one is written, must not leave it claiming this
    sidecar_path(dst_xml).unlink(missing_ok=True)
    dst_xml.unlink(missing_ok=True)
    os.replace(src_xml.with_suffix(".bin"), dst_xml.with_suffix(".bin"))
    os.replace(src_xml, dst_xml)


def openvino_session(path: str | os.PathLike, *, threads: int | None = None, latency: bool = True,
                     batch: int | None = None, precision: str | None = None) -> Any:
    """Compile an ONNX or IR model for the CPU; returns the compiled model.

    ``precision``: OpenVINO's ``INFERENCE_PRECISION_HINT`` (``f32``, ``bf16``), if given.
    ``batch``: reshape the input to a static batch first (our INT8 IRs are batch 1; static shapes are
    also what OpenVINO runs fastest and, for INT8, correctly - see ``DEFAULT_KEEP_FLOAT``).
    """
    ov = require("openvino", "running an OpenVINO model")
    cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY" if latency else "THROUGHPUT"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    core = ov.Core()
    model = core.read_model(str(path))
    if batch is not None:
        shape = model.input(0).get_partial_shape()
        model.reshape([int(batch), *[d.get_length() for d in list(shape)[1:]]])
    return core.compile_model(model, "CPU", cfg)


def inference_precision(compiled: Any) -> str:
    """The ``INFERENCE_PRECISION_HINT`` a compiled model really runs with (``f32``, ``bf16``, ``f16``): the CPU
    plugin defaults to bf16 on CPUs with AMX/AVX512-BF16 unless ``f32`` is asked for."""
    v = compiled.get_property("INFERENCE_PRECISION_HINT")
    return v.to_string() if hasattr(v, "to_string") else str(v)


def evaluate_openvino(path: str | os.PathLike, inputs: np.ndarray, labels: np.ndarray | None, *,
                      threads: int | None = None, precision: str | None = None) -> dict[str, Any]:
    """Top-1 (if labels) and predictions of an OpenVINO classifier, one image per request (``precision`` as in
    :func:`openvino_session`, e.g. ``f32`` or ``bf16``; ``None`` = the plugin's default, bf16 on AMX CPUs).
    The result's ``inference_precision`` is the hint the model was compiled with."""
    compiled = openvino_session(path, threads=threads, batch=1, precision=precision)
    req = compiled.create_infer_request()
    logits = np.concatenate([np.asarray(req.infer({0: inputs[i:i + 1]})[0]) for i in range(len(inputs))])
    return {**classification_result(logits, labels), "inference_precision": inference_precision(compiled)}


def precision_summary(compiled: Any) -> dict[str, int]:
    """How many convolution/matmul primitives of a compiled model run in each precision."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("Convolution", "FullyConnected", "MatMul"):
            key = info["runtimePrecision"].astype(str)
            counts[key] = counts.get(key, 0) + 1
    return counts


def quantize_openvino(
    model: nn.Module, path: str | os.PathLike, *, calib: str | os.PathLike, input_size: tuple[int, int] | None = None,
    num_calib: int = 256, keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT, preset: str = "performance",
    bake_preprocessing: str | None = None, eval_data: str | os.PathLike | None = None, num_eval: int | None = 2000,
    seed: int = 0, sidecar: bool = True, threads: int | None = None, overflow_fix: bool | None = None,
) -> dict[str, Any]:
    """Post-training static INT8 quantization of the fused ``model`` to OpenVINO IR at ``path`` (``.xml``).

    ``calib``: folder of images or ``fashion-mnist``/``digits`` (train split; ``num_calib`` images).
    ``keep_float``: groups left in float (``stem``, ``depthwise``, ``se``, ``head``); default none.
    ``preset``: ``performance`` (symmetric activations, fastest) or ``mixed`` (asymmetric activations).
    ``eval_data``: optional held-out set; fp32 (OpenVINO, same runtime, ``INFERENCE_PRECISION_HINT`` f32) and INT8
    top-1 and their agreement go into the returned dict and the sidecar, with the precision hint each ran with
    (the INT8 model's non-INT8 layers run at the plugin default, bf16 on AMX/AVX512-BF16 CPUs).
    The IR has a static batch of 1 (see ``DEFAULT_KEEP_FLOAT`` for why); for batched serving reshape it
    statically (``model.reshape([N, C, H, W])``) before compiling.
    ``overflow_fix``: see :func:`nncf_quantize` (default: on when this x86 CPU lacks VNNI).
    """
    ov = require("openvino", "OpenVINO INT8 quantization")
    nncf = require("nncf", "OpenVINO INT8 quantization")
    if num_calib < 1:
        raise ValueError("num_calib must be at least 1")
    out = check_writable(path)
    if out.suffix != ".xml":
        raise ValueError(f"OpenVINO IR output must end in .xml (weights go to .bin next to it), got {out}")
    from ..bench.machine import resolve_no_vnni      # lazy: importing repvit.bench loads the harness
    overflow_fix = resolve_no_vnni(overflow_fix)
    fused = to_deploy(model)
    pre = get_preprocessing(fused, input_size)
    raw, _ = load_images(calib, pre, split="train", limit=num_calib, seed=seed)
    calib_in = prepare_inputs(raw, pre, bake_preprocessing)
    if eval_data is not None:        # a bad --eval path fails before the (slow) quantization, not after it
        x, y = load_held_out(eval_data, pre, bake_preprocessing, num_eval, seed, fused.num_classes)
    # the IR is written and checked in a staging folder next to ``out`` and moved into place only when
    # everything succeeded: an error leaves neither a new IR nor a half-replaced old one behind
    parent = out.parent if str(out.parent) else Path(".")
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        with tempfile.TemporaryDirectory(prefix="repvit-ov-int8-") as td:
            fp32 = Path(td) / "fp32.onnx"
            export_onnx(fused, fp32, input_size=input_size, dynamic_batch=False, opset=20,
                        bake_preprocessing=bake_preprocessing, sidecar=False)
            staged = nncf_quantize(fp32, stage / out.name, calib_in, preset=preset, keep_float=keep_float,
                                   overflow_fix=overflow_fix)
            compiled = openvino_session(staged, threads=threads)
            result: dict[str, Any] = {"int8_primitives": precision_summary(compiled),
                                      "int8_inference_precision": inference_precision(compiled)}
            if eval_data is not None:
                # the fp32 reference must really be f32: the CPU plugin would run it in bf16 on AMX/AVX512-BF16
                # CPUs, and top1_fp32/top1_drop would then describe bf16
                a = evaluate_openvino(fp32, x, y, threads=threads, precision="f32")
                b = evaluate_openvino(staged, x, y, threads=threads)
                result["eval"] = compare_fp32_int8(a, b, eval_data, y is not None, calib)
                result["eval"].update({"fp32_inference_precision": a["inference_precision"],
                                       "int8_inference_precision": b["inference_precision"]})
        _publish_ir(staged, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    info = model_info(fused, pre)
    info.update({
        "format": "openvino-int8", "target": f"OpenVINO {ov.__version__} CPU, NNCF {nncf.__version__} PTQ",
        "quantization": {
            "tool": "nncf", "preset": preset, "weights": "int8 symmetric per-channel",
            "activations": "int8 symmetric" if preset == "performance" else "uint8 asymmetric",
            "calibration": {**source_facts(calib, "train"), "images": int(len(calib_in))},
            "kept_float": list(keep_float),
            "overflow_fix": "all layers (for x86 CPUs without VNNI)" if overflow_fix else "first layer",
        },
        "dynamic_batch": False, "batch": 1, "input_layout": "NCHW", "preprocessing_baked": bool(bake_preprocessing),
        "input_dtype": "uint8" if bake_preprocessing == "uint8" else "float32",
        "weights_file": out.with_suffix(".bin").name, "weights_sha256": sha256_of(out.with_suffix(".bin")),
        **result,
    })
    if sidecar:
        info["sidecar"] = str(write_sidecar(out, info))
    return info
