"""INT8 for phones: PyTorch's PT2E post-training quantization lowered to an ExecuTorch program on XNNPACK.

The flow is the one ExecuTorch documents for XNNPACK: ``torch.export`` the fused model, annotate it with
``XNNPACKQuantizer`` (int8 symmetric weights, per channel by default; int8 asymmetric activations), calibrate
on real images (``prepare_pt2e`` observers), ``convert_pt2e`` to a Q/DQ graph, export again and lower with the
XNNPACK partitioner, which turns every Q/DQ-wrapped conv/linear into an XNNPACK INT8 kernel. The ``.pte`` runs on
Android/iOS through the ExecuTorch runtime (and here through ``executorch.runtime``, which the held-out check
uses). Static batch 1, as XNNPACK programs are shape-specialised.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .calib import load_images, source_facts
from .common import atomic_output, check_writable, installed_version, require, write_sidecar
from .quantize import check_keep_float, classification_result, compare_fp32_int8, load_held_out, prepare_inputs
from .torch_formats import _common, _export, _prepare

__all__ = ["quantize_executorch", "xnnpack_program", "keep_float_module_names", "evaluate_pte", "executorch_threads"]


def executorch_threads(n: int | None = None) -> int | None:
    """Set (``n``) and return the ExecuTorch runtime's XNNPACK thread-pool size (None if it cannot be read)."""
    try:
        from executorch.extension.pybindings import portable_lib as pl
        if n is not None:
            pl._unsafe_reset_threadpool(int(n))
        return int(pl._threadpool_get_thread_count())
    except Exception:   # noqa: BLE001 - a runtime build without these hooks: thread count unknown
        return None


def keep_float_module_names(net: nn.Module, groups: Sequence[str]) -> list[str]:
    """Qualified names (in ``net``, which may wrap the model for baked preprocessing) of the convs/linears of the
    keep-float groups: ``stem`` (the first conv), ``depthwise`` (every depthwise conv: the re-parameterised token
    mixers and the downsampling ones), ``se`` (the squeeze-excite 1x1 convs), ``head`` (the classifier)."""
    groups = check_keep_float(groups)
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    names: list[str] = []
    if "stem" in groups and layers:
        names.append(layers[0][0])
    for n, m in layers:
        if "depthwise" in groups and isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            names.append(n)
        if "se" in groups and ".se." in f".{n}.":
            names.append(n)
        if "head" in groups and isinstance(m, nn.Linear):
            names.append(n)
    return sorted(set(names))


def _runtime_method(path: str | os.PathLike) -> Any:
    from executorch.runtime import Runtime
    return Runtime.get().load_program(str(path)).load_method("forward")


def evaluate_pte(path: str | os.PathLike, inputs: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Top-1 (if labels) and predictions of a batch-1 ExecuTorch classifier, one image per call."""
    method = _runtime_method(path)
    x = torch.from_numpy(np.ascontiguousarray(inputs))
    logits = np.concatenate([method.execute([x[i:i + 1]])[0].float().numpy() for i in range(len(x))])
    return classification_result(logits, labels)


def _evaluate_eager(net: nn.Module, inputs: np.ndarray, labels: np.ndarray | None, batch: int = 1) -> dict[str, Any]:
    x = torch.from_numpy(np.ascontiguousarray(inputs))
    with torch.no_grad():
        logits = np.concatenate([net(x[i:i + batch]).float().numpy() for i in range(0, len(x), batch)])
    return classification_result(logits, labels)


def _require_executorch() -> None:
    for mod in ("executorch", "executorch.exir", "executorch.backends.xnnpack.partition.xnnpack_partitioner",
                "executorch.backends.xnnpack.quantizer.xnnpack_quantizer"):
        require(mod, "ExecuTorch (XNNPACK) export")


@torch.no_grad()
def xnnpack_program(net: nn.Module, example: torch.Tensor, *, calib: torch.Tensor | None = None,
                    per_channel: bool = True, keep_float_modules: Sequence[str] = ()) -> tuple[Any, Any]:
    """Lower ``net`` (any exportable module, specialised to ``example``'s shape) to an ExecuTorch XNNPACK program.

    With ``calib`` (N x ... model inputs, run one at a time): PT2E INT8 first (``XNNPACKQuantizer``, int8
    symmetric weights, per channel unless ``per_channel=False``; ``keep_float_modules`` left in fp32).
    Returns ``(program, converted)``: ``program.buffer`` is the ``.pte``; ``converted`` the PT2E reference graph
    (None for fp32)."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer as xq
    from executorch.exir import to_edge_transform_and_lower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = None
        target = net
        if calib is not None:
            try:   # PT2E moved from torch.ao to torchao (which executorch installs); take either
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            except ImportError:
                from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
            quantizer = xq.XNNPACKQuantizer().set_global(
                xq.get_symmetric_quantization_config(is_per_channel=per_channel))
            if keep_float_modules:  # XNNPACKQuantizer cannot un-set a module's config; a node filter skips them
                filters = [xq.get_module_name_filter(name) for name in keep_float_modules]
                quantizer.set_filter_function(lambda node: not any(f(node) for f in filters))
            prepared = prepare_pt2e(_export(net, example, False).module(), quantizer)
            for i in range(len(calib)):        # batch 1, the shape the program is specialised to
                prepared(calib[i:i + 1])
            converted = target = convert_pt2e(prepared)
        prog = to_edge_transform_and_lower(_export(target, example, False),
                                           partitioner=[XnnpackPartitioner()]).to_executorch()
    return prog, converted


def _layer_precisions(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many convolutions/linears of the converted PT2E graph take int8 weights (a dequantize feeding their
    weight input) and how many stay float."""
    counts = {"int8": 0, "float": 0}
    for n in gm.graph.nodes:
        if n.op == "call_function" and any(k in str(n.target) for k in ("aten.conv2d", "aten.linear")):
            w = n.args[1] if len(n.args) > 1 else None
            int8 = isinstance(w, torch.fx.Node) and "dequantize" in str(w.target)
            counts["int8" if int8 else "float"] += 1
    return counts


def _interleaved_ms(fns: dict[str, Any], x: torch.Tensor, rounds: int = 7, iters: int = 5) -> dict[str, float]:
    """Median ms per call of each function, timed in alternating rounds (so drift hits all of them alike)."""
    for fn in fns.values():
        for _ in range(3):
            fn(x)
    per_round: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[k](x)
            per_round[k].append((time.perf_counter() - t0) / iters * 1e3)
    return {k: float(np.median(v)) for k, v in per_round.items()}


@torch.no_grad()
def quantize_executorch(
    model: nn.Module, path: str | os.PathLike, *, calib: str | os.PathLike, input_size: tuple[int, int] | None = None,
    num_calib: int = 256, per_channel: bool = True, keep_float: Sequence[str] = (),
    bake_preprocessing: str | None = None, eval_data: str | os.PathLike | None = None, num_eval: int | None = 2000,
    seed: int = 0, sidecar: bool = True, measure_latency: bool = True,
) -> dict[str, Any]:
    """PT2E static INT8 quantization of the fused ``model``, lowered to an ExecuTorch XNNPACK program at ``path``.

    ``calib``: folder of images or ``fashion-mnist``/``digits`` (train split; ``num_calib`` images).
    ``per_channel``: per-output-channel weight scales (the remedy for re-parameterised depthwise kernels, whose
    channels differ in range by orders of magnitude). ``keep_float``: groups left in fp32 (``stem``,
    ``depthwise``, ``se``, ``head``); XNNPACK runs them in fp32 between the INT8 parts.
    ``eval_data``: optional held-out set; fp32 (eager, fused) and INT8 (the ``.pte`` in the ExecuTorch runtime)
    top-1 and their agreement go into the returned dict and the sidecar.
    ``measure_latency``: batch-1 median of the fp32 and INT8 ``.pte`` programs in the ExecuTorch runtime on
    this CPU (an indication only; phones are what XNNPACK is tuned for; use ``repvit bench`` for comparisons).
    """
    if num_calib < 1:
        raise ValueError("num_calib must be at least 1")
    _require_executorch()
    out = check_writable(path)
    fused, net, pre, x0 = _prepare(model, input_size, bake_preprocessing, 1)
    raw, _ = load_images(calib, pre, split="train", limit=num_calib, seed=seed)
    calib_in = torch.from_numpy(np.ascontiguousarray(prepare_inputs(raw, pre, bake_preprocessing)))
    held_out = (None if eval_data is None
                else load_held_out(eval_data, pre, bake_preprocessing, num_eval, seed, fused.num_classes))
    kept = keep_float_module_names(net, keep_float)
    prog, converted = xnnpack_program(net, x0, calib=calib_in, per_channel=per_channel, keep_float_modules=kept)
    result: dict[str, Any] = {"layers": _layer_precisions(converted)}
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as f:
            f.write(prog.buffer)
        try:
            method = _runtime_method(tmp)
        except ImportError as e:  # runtime wheel parts missing: the program is still valid; say why it was not run
            if held_out is not None:  # ... unless the held-out comparison was asked for: that needs the runtime
                raise RuntimeError(f"the held-out evaluation (--eval) runs the .pte in the ExecuTorch runtime, which "
                                  f"cannot load here ({e}); install the runtime (pip install 'repvit[executorch]') "
                                  "or drop --eval") from e
            result["validation"] = {"skipped": f"executorch runtime unavailable: {e}"}
            method = None
        # any other error loading or running the program (a broken .pte) propagates: atomic_output publishes nothing
        if method is not None:
            got = method.execute([x0])[0]
            result["validation"] = {"runtime": "executorch.runtime", "validated_batch": 1,
                                    "max_abs_diff_vs_pt2e": float((got - converted(x0)).abs().max()),
                                    "max_abs_diff_vs_fp32": float((got - net(x0)).abs().max())}
            if held_out is not None:
                xe, ye = held_out
                result["eval"] = compare_fp32_int8(_evaluate_eager(net, xe, ye), evaluate_pte(tmp, xe, ye),
                                                   eval_data, ye is not None, calib)
                result["eval"]["fp32_runtime"] = "PyTorch eager (fused)"
            if measure_latency:
                fp32_prog, _ = xnnpack_program(net, x0)
                fp32_path = out.with_name(f".{out.name}.fp32.tmp")
                try:
                    fp32_path.write_bytes(fp32_prog.buffer)
                    fp32_method = _runtime_method(fp32_path)
                    ms = _interleaved_ms({"fp32": lambda t: fp32_method.execute([t]),
                                          "int8": lambda t: method.execute([t])}, x0)
                    ms_fp32, ms_int8 = ms["fp32"], ms["int8"]
                finally:
                    fp32_path.unlink(missing_ok=True)
                result["latency_ms_batch1"] = {"fp32": round(ms_fp32, 3), "int8": round(ms_int8, 3),
                                               "speedup": round(ms_fp32 / ms_int8, 3),
                                               "threads": executorch_threads(),
                                               "note": "this CPU, 7 alternating rounds, median; indicative"}
        size = tmp.stat().st_size
    info = _common(fused, pre, bake_preprocessing, "executorch-int8", target="executorch/xnnpack INT8",
                   executorch_version=installed_version("executorch"), batch=1, dynamic_batch=False)
    info.update({
        "quantization": {
            "tool": "PT2E (XNNPACKQuantizer)",
            "weights": "int8 symmetric " + ("per-channel" if per_channel else "per-tensor"),
            "activations": "int8 asymmetric",
            "calibration": {**source_facts(calib, "train"), "images": int(len(calib_in))},
            "kept_float": list(keep_float), "kept_float_modules": kept,
        },
        "size_bytes": size, **result,
    })
    if sidecar:
        info["sidecar"] = str(write_sidecar(out, info))
    return info
