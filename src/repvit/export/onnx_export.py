"""ONNX export of the fused model, checked with the ONNX checker and by ONNX Runtime parity."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import (Preprocess, atomic_output, check_parity, check_writable, get_preprocessing, model_info, require,
                     write_sidecar)
from .source import to_deploy

__all__ = ["export_onnx", "validate_onnx", "ort_session", "count_ops", "onnx_opset", "MIN_OPSET", "DEFAULT_OPSET"]

MIN_OPSET = 17  # LayerNorm/GELU-era opsets; ORT and Core ML converters all accept 17+
DEFAULT_OPSET = 18


def count_ops(model_or_path: Any, op_type: str) -> int:
    """Number of nodes of ``op_type`` in the main graph and any subgraph-free functions."""
    onnx = require("onnx", "ONNX export")
    m = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    n = sum(node.op_type == op_type for node in m.graph.node)
    n += sum(node.op_type == op_type for f in m.functions for node in f.node)
    return n


def onnx_opset(model_or_path: Any) -> int:
    """The default-domain (``ai.onnx``) opset a written ONNX model really imports (exporters and tools may
    differ from the one requested: the dynamo exporter writes 18 when asked for 17)."""
    onnx = require("onnx", "ONNX export")
    m = (onnx.load(str(model_or_path), load_external_data=False) if isinstance(model_or_path, (str, os.PathLike))
         else model_or_path)
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise ValueError(f"{model_or_path} imports no default-domain (ai.onnx) opset")


def ort_session(path: str | os.PathLike, *, threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime CPU session (``threads`` intra-op threads, default: ORT's choice)."""
    ort = require("onnxruntime", "Running ONNX models")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _example_input(pre: dict[str, Any], batch: int, input_type: str | None, seed: int = 0) -> torch.Tensor:
    c, h, w = pre["input_size"]
    g = torch.Generator().manual_seed(seed)
    if input_type == "uint8":
        return torch.randint(0, 256, (batch, c, h, w), generator=g, dtype=torch.uint8)
    if input_type == "float":
        return torch.rand(batch, c, h, w, generator=g)
    return torch.randn(batch, c, h, w, generator=g)


@torch.no_grad()
def validate_onnx(path: str | os.PathLike, reference: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """ONNX checker (full, with shape inference) + ORT vs PyTorch on ``example``; returns the numbers.

    Raises :class:`repvit.export.common.ParityError` when ORT and PyTorch differ beyond
    ``PARITY_ATOL + PARITY_RTOL * max|PyTorch|`` (see :func:`repvit.export.common.check_parity`)."""
    onnx = require("onnx", "ONNX export")
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort_session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
    want = reference(example).float().numpy()
    if got.shape != want.shape:
        raise RuntimeError(f"ONNX Runtime output shape {got.shape} differs from PyTorch {want.shape}")
    par = check_parity(got, want, "ONNX export (ONNX Runtime vs PyTorch)")
    return {"checker": "passed", "ort_version": require("onnxruntime", "").__version__,
            "max_abs_diff_vs_torch": par["max_abs_diff"], "tolerance": par["tolerance"],
            "validated_batch": int(example.shape[0]),
            "batchnorm_nodes": count_ops(path, "BatchNormalization"),
            "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean())}


def _slim(path: Path) -> str:
    """Shrink the graph in place: onnxslim if installed, else ORT offline basic optimisation."""
    try:
        import onnxslim  # noqa: F401
    except Exception:
        ort = require("onnxruntime", "ONNX graph optimisation")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # portable (no CPU-only fusions)
        so.optimized_model_filepath = str(path) + ".opt.onnx"
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        os.replace(so.optimized_model_filepath, path)
        return "onnxruntime-basic"
    import onnx
    import onnxslim

    slim = onnxslim.slim(onnx.load(str(path)))
    onnx.save(slim, str(path))
    return f"onnxslim-{onnxslim.__version__}"


def export_onnx(
    model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int] | None = None,
    dynamic_batch: bool = False, opset: int = DEFAULT_OPSET, bake_preprocessing: str | bool | None = None,
    slim: bool = False, exporter: str = "torchscript", validate: bool = True, sidecar: bool = True,
    batch_size: int = 1, ort_nchwc: bool = False,
) -> dict[str, Any]:
    """Export ``model`` (fused first) to ONNX at ``path``; returns the sidecar dict.

    ``input_size``: (H, W), default from ``model.preprocessing``. ``dynamic_batch``: batch axis is
    symbolic. ``bake_preprocessing``: ``None``/``False`` -> input is the normalised float tensor;
    ``"float"`` (or ``True``) -> input float32 0..1; ``"uint8"`` -> input uint8 0..255; in both
    cases the graph normalises with the model's mean/std. Input layout is always NCHW.
    ``exporter``: ``"torchscript"`` (fast, default) or ``"dynamo"`` (torch.export based, slower).
    ``ort_nchwc``: rewrite the squeeze-excite blocks so that ONNX Runtime's CPU blocked layout covers the whole
    network (:mod:`repvit.export.ort_layout`; same function, for ORT on CPU).
    """
    require("onnx", "ONNX export")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    if bake_preprocessing is True:
        bake_preprocessing = "float"
    bake = bake_preprocessing or None
    if bake not in (None, "float", "uint8"):
        raise ValueError(f"bake_preprocessing must be None, 'float' or 'uint8', got {bake_preprocessing!r}")
    out = check_writable(path)
    fused = to_deploy(model)
    pre = get_preprocessing(fused, input_size)
    net: nn.Module = Preprocess(fused, pre["mean"], pre["std"], bake).eval() if bake else fused
    example = _example_input(pre, batch_size, bake)

    with atomic_output(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw: dict[str, Any] = dict(input_names=["input"], output_names=["logits"], opset_version=opset)
        if exporter == "dynamo":
            kw["dynamo"] = True
            kw["external_data"] = False
            if dynamic_batch:
                kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        else:
            kw["dynamo"] = False
            if dynamic_batch:
                kw["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
        with contextlib.redirect_stdout(sys.stderr):    # the dynamo exporter prints progress: keep --json clean
            torch.onnx.export(net, (example,), str(tmp), **kw)
        slimmer = _slim(tmp) if slim else None
        nchwc = None
        if ort_nchwc:
            import onnx

            from .ort_layout import nchwc_friendly_se
            rewritten, nchwc = nchwc_friendly_se(onnx.load(str(tmp)))
            onnx.save(rewritten, str(tmp))
        n_bn = count_ops(tmp, "BatchNormalization")
        if n_bn:
            raise RuntimeError(f"exported graph still has {n_bn} BatchNormalization nodes; the model was not fused")
        info = model_info(fused, pre)
        written_opset = onnx_opset(tmp)  # what the file imports, which may differ from the request
        if validate:
            # check a batch of 2 when the batch is dynamic: proves the symbolic axis really works
            info["validation"] = validate_onnx(tmp, net, _example_input(pre, 2 if dynamic_batch else batch_size, bake, 1))
    info.update({
        "format": "onnx", "opset": written_opset, "opset_requested": opset, "exporter": exporter, "dynamic_batch": dynamic_batch,
        "input_name": "input", "output_name": "logits", "input_layout": "NCHW",
        "input_dtype": "uint8" if bake == "uint8" else "float32",
        "input_range": {"uint8": "0..255", "float": "0..1"}.get(bake, "normalised ((x/255 - mean) / std)"),
        "preprocessing_baked": bool(bake), "slimmed_with": slimmer, "ort_nchwc": nchwc,
        "batch": "dynamic" if dynamic_batch else batch_size,
    })
    if sidecar:
        info["sidecar"] = str(write_sidecar(out, info))
    return info
