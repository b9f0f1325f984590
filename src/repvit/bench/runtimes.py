"""Runtimes the harness can time a model in. Each ``prepare`` returns a zero-argument
callable running one batch-1 inference, plus facts about how it runs.

eager / eager_cl     PyTorch eager fp32 (NCHW / channels_last)
torchscript          TorchScript frozen + optimize_for_inference (oneDNN prepacked convs) fp32
eager_bf16           PyTorch eager with bf16 weights and input (emulated on CPUs without bf16)
compile              torch.compile (inductor, weight freezing) fp32
onnxruntime          ONNX Runtime CPU fp32, all graph optimisations
onnxruntime_nchwc    the same on the graph after repvit.export.ort_layout's SE pass (any model: the pass is a graph
                     rewrite, so a peer's SE blocks get it too)
onnxruntime_int8     ONNX Runtime static INT8 (QDQ, per-channel). RepViT: repvit.export.quantize_onnx on 16 digits
                     calibration images; other models: random calibration. A speed measurement only
openvino             OpenVINO CPU fp32 (if installed)
openvino_int8        OpenVINO CPU INT8 via NNCF post-training quantization (RepViT: 32 digits calibration
                     images; other models: random calibration; speed only)
openvino_bf16        OpenVINO CPU bf16 (only where the CPU has native bf16)
executorch           ExecuTorch program delegated to XNNPACK fp32 (the phone runtime; if executorch is installed)
executorch_int8      ExecuTorch XNNPACK INT8 via PT2E (RepViT: repvit.export.quantize_executorch on 16 digits
                     calibration images; other models: random calibration; speed only)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .machine import native_bf16

__all__ = ["RUNTIMES", "DEFAULT_RUNTIMES", "RuntimeUnavailable", "prepare", "export_onnx"]

RUNTIMES = ("eager", "eager_cl", "torchscript", "eager_bf16", "compile", "onnxruntime", "onnxruntime_nchwc",
            "onnxruntime_int8", "openvino",
            "openvino_int8", "openvino_bf16", "executorch", "executorch_int8")
DEFAULT_RUNTIMES = ("eager", "onnxruntime")
DTYPE = {"eager_bf16": "bf16", "openvino_bf16": "bf16", "onnxruntime_int8": "int8", "openvino_int8": "int8",
         "executorch_int8": "int8"}


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot run here (not installed, unsupported CPU, export failed)."""


# which exporter wrote each fp32 ONNX file of this process, so every runtime that times a file reports it
_EXPORTERS: dict[str, str] = {}


def check_runtimes(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in RUNTIMES]
    if bad:
        raise ValueError(f"unknown runtime(s) {', '.join(bad)}; choose from {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


@torch.no_grad()
def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Export to ONNX (fixed batch-1 shape: the harness times exactly that).

    Prefers the package's exporter (``repvit.export``) when it exists, else torch.onnx.export
    (TorchScript exporter first: fast and robust for CNNs; the dynamo exporter as fallback).
    Returns which exporter wrote the file.
    """
    path = Path(path)
    try:
        from ..export.onnx_export import export_onnx as pkg_export
    except ImportError:  # export capability not installed / not there yet
        pkg_export = None
    from ..models import RepViT
    if pkg_export is not None and isinstance(model, RepViT):
        try:
            pkg_export(model, path, input_size=tuple(example.shape[-2:]), validate=False, sidecar=False)
            return "repvit.export (torchscript, opset 18)"
        except Exception:  # their exporter refused this model: fall back to the plain export below
            pass
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(path), input_names=["input"], opset_version=18,
                                  dynamo=dynamo, **({} if dynamo else {"do_constant_folding": True}))
            return f"torch.onnx.export ({'dynamo' if dynamo else 'torchscript'}, opset 18)"
        except Exception as e:  # try the other exporter before giving up
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(e).__name__}: {str(e)[:200]}")
    raise RuntimeUnavailable("ONNX export failed (" + "; ".join(errors) + ")")


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _quantize_int8(fp32: Path, out: Path, example: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Random(CalibrationDataReader):
        def __init__(self, n: int = 4) -> None:
            rng = np.random.default_rng(0)
            self.items = iter([{"input": rng.standard_normal(example.shape).astype(np.float32)} for _ in range(n)])

        def get_next(self):
            return next(self.items, None)

    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    except Exception:  # pre-processing is an optimisation; quantise the raw graph instead
        pre = fp32
    # U8 activations / S8 weights: the VNNI-friendly combination on x86
    quantize_static(str(pre), str(out), _Random(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _quantize_pkg(model: nn.Module, out: Path, example: torch.Tensor) -> str | None:
    """Quantise our RepViT with the package's INT8 path (``repvit.export.quantize``: opset 20 with a
    single Gelu node, which keeps more of the graph in int8); None if unavailable for this model."""
    from ..models import RepViT
    if not isinstance(model, RepViT):
        return None
    try:
        from ..export.quantize import quantize_onnx
        quantize_onnx(model, out, calib="digits", num_calib=16, input_size=tuple(example.shape[-2:]),
                      eval_data=None, sidecar=False)
        return "repvit.export.quantize_onnx (QDQ, opset 20, 16 digits calibration images; speed only)"
    except Exception:  # not there / refused: fall back to the plain quantiser
        if out.exists():
            out.unlink()
        return None


def prepare(runtime: str, model: nn.Module, example: torch.Tensor, workdir: Path, threads: int,
            tag: str = "model") -> tuple[Callable[[], object], dict]:
    """Return (run_once, facts) for ``model`` in ``runtime``; raises RuntimeUnavailable."""
    check_runtimes([runtime])     # a misspelt name must not run its prefix's runtime under another label
    workdir = Path(workdir)
    facts = {"dtype": DTYPE.get(runtime, "fp32")}
    if runtime in ("eager", "eager_cl"):
        m, x = model, example
        if runtime == "eager_cl":
            import copy
            m = copy.deepcopy(model).to(memory_format=torch.channels_last)  # leave the shared model as is
            x = example.contiguous(memory_format=torch.channels_last)
        return _torch_runner(m, x), facts
    if runtime == "torchscript":
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model.eval(), example)))
                m(example)
        except Exception as e:
            raise RuntimeUnavailable(f"TorchScript trace/freeze failed: {type(e).__name__}: {str(e)[:200]}") from e
        return _torch_runner(m, example), facts
    if runtime == "eager_bf16":
        import copy
        m = copy.deepcopy(model).to(torch.bfloat16)
        facts["native_bf16"] = native_bf16()
        if not facts["native_bf16"]:
            facts["note"] = "CPU has no AVX512-BF16/AMX: bf16 is emulated"
        return _torch_runner(m, example.to(torch.bfloat16)), facts
    if runtime == "compile":
        import torch._inductor.config as icfg
        m = torch.compile(model, dynamic=False)
        run = _torch_runner(m, example)
        try:
            # compile now (a failure is "unavailable", not a mid-timing crash), with weights folded into the graph /
            # pre-packed (inference only); the process-wide flag is restored afterwards
            with icfg.patch(freezing=True):
                run()
        except Exception as e:
            raise RuntimeUnavailable(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}") from e
        return run, facts
    if runtime.startswith("executorch"):
        return _executorch(model, example, workdir / f"{tag}.{runtime}.pte", threads, int8=runtime.endswith("int8"),
                           facts=facts)
    if runtime.startswith("onnxruntime") or runtime.startswith("openvino"):
        onnx_path = workdir / f"{tag}.onnx"
        if not onnx_path.exists():
            _EXPORTERS[str(onnx_path)] = export_onnx(model, example, onnx_path)
        if not runtime.endswith("_int8"):      # the rows that time this fp32 file (int8 rows: see their note)
            facts["exporter"] = _EXPORTERS.get(str(onnx_path))
        xn = example.numpy()
        if runtime.startswith("onnxruntime"):
            try:
                import onnxruntime  # noqa: F401
            except ImportError as e:
                raise RuntimeUnavailable("onnxruntime is not installed (pip install 'repvit[export]')") from e
            path = onnx_path
            if runtime == "onnxruntime_nchwc":
                path = workdir / f"{tag}.nchwc.onnx"
                import onnx

                from ..export.ort_layout import nchwc_friendly_se
                rewritten, counts = nchwc_friendly_se(onnx.load(str(onnx_path)))
                onnx.save(rewritten, str(path))
                facts["note"] = (f"SE pass: {counts['pools']} pools -> GlobalAveragePool, {counts['gates']} gates "
                                 "resized")
                facts["exporter"] = f"{facts.get('exporter')} + repvit.export.ort_layout"
            if runtime == "onnxruntime_int8":
                path = workdir / f"{tag}.int8.onnx"
                if not path.exists():
                    facts["note"] = _quantize_pkg(model, path, example)
                    if facts["note"] is None:
                        try:
                            _quantize_int8(onnx_path, path, xn)
                        except Exception as e:
                            raise RuntimeUnavailable(
                                f"INT8 quantisation failed: {type(e).__name__}: {str(e)[:200]}") from e
                        facts["note"] = "static QDQ int8 (opset 18 graph), random calibration (speed only)"
            facts["model_file"] = path.name
            sess = _ort_session(path, threads)
            feed = {sess.get_inputs()[0].name: xn}
            return (lambda: sess.run(None, feed)), facts
        if runtime == "openvino_int8":
            onnx_path = _openvino_int8(model, onnx_path, workdir / f"{tag}.ov_int8.xml", example, facts)
        facts["model_file"] = Path(onnx_path).name
        return _openvino(onnx_path, xn, threads, bf16=runtime == "openvino_bf16", facts=facts)
    raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


def _openvino_int8(model: nn.Module, onnx_path: Path, out: Path, example: torch.Tensor, facts: dict) -> Path:
    """NNCF INT8 IR of ``model``: our quantizer for RepViT (real calibration images), plain NNCF on random calibration data for any other model (a speed measurement only)."""
    from ..models import RepViT
    if out.exists():
        return out
    try:
        if isinstance(model, RepViT):
            from ..export.openvino_int8 import quantize_openvino
            quantize_openvino(model, out, calib="digits", num_calib=32, input_size=tuple(example.shape[-2:]),
                              sidecar=False)
            facts["note"] = "NNCF INT8, 32 digits calibration images; speed only"
        else:
            from ..export.openvino_int8 import nncf_quantize
            rng = np.random.default_rng(0)
            nncf_quantize(onnx_path, out, rng.standard_normal((8, *example.shape[1:])).astype(np.float32))
            facts["note"] = "NNCF INT8 (all layers NNCF picks), random calibration; speed only"
    except RuntimeError as e:
        raise RuntimeUnavailable(str(e)) from e
    except Exception as e:
        raise RuntimeUnavailable(f"NNCF INT8 quantisation failed: {type(e).__name__}: {str(e)[:200]}") from e
    return out


def _executorch(model: nn.Module, example: torch.Tensor, out: Path, threads: int, *, int8: bool, facts: dict):
    """An ExecuTorch XNNPACK program of ``model`` run by the ExecuTorch runtime (batch 1, the example's shape)."""
    try:
        from ..export.executorch_int8 import _runtime_method, executorch_threads, quantize_executorch, xnnpack_program
        import executorch.runtime  # noqa: F401  (the runtime must load, not just the exporter)
    except Exception as e:
        raise RuntimeUnavailable(f"executorch is not usable here ({type(e).__name__}: {str(e)[:120]}); "
                                 "pip install 'repvit[executorch]'") from e
    from ..models import RepViT
    if not out.exists():
        try:
            if int8 and isinstance(model, RepViT):
                quantize_executorch(model, out, calib="digits", num_calib=16, input_size=tuple(example.shape[-2:]),
                                    sidecar=False, measure_latency=False)
                facts["note"] = "PT2E XNNPACK INT8, 16 digits calibration images; speed only"
            else:
                calib = torch.randn((4, *example.shape[1:]), generator=torch.Generator().manual_seed(0)) if int8 else None
                prog, _ = xnnpack_program(model.eval(), example, calib=calib)
                out.write_bytes(prog.buffer)
                if int8:
                    facts["note"] = "PT2E XNNPACK INT8, random calibration; speed only"
        except RuntimeError as e:
            raise RuntimeUnavailable(f"ExecuTorch lowering failed: {str(e)[:200]}") from e
        except Exception as e:
            raise RuntimeUnavailable(f"ExecuTorch lowering failed: {type(e).__name__}: {str(e)[:200]}") from e
    facts["threads_runtime"] = executorch_threads(threads)   # the process-wide XNNPACK pool, as the harness asks
    facts["model_file"] = out.name
    method = _runtime_method(out)
    return (lambda: method.execute([example])), facts


def _torch_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)
    return run


def _openvino(onnx_path: Path, xn: np.ndarray, threads: int, *, bf16: bool, facts: dict):
    try:
        import openvino  # noqa: F401  (availability check; openvino_session compiles)
    except ImportError as e:
        raise RuntimeUnavailable("openvino is not installed (pip install openvino)") from e
    if bf16 and not native_bf16():
        raise RuntimeUnavailable("no native bf16 on this CPU (AVX512-BF16/AMX): OpenVINO would silently run f32")
    from ..export.openvino_int8 import inference_precision, openvino_session
    compiled = openvino_session(onnx_path, threads=threads, precision="bf16" if bf16 else "f32")
    facts["precision"] = inference_precision(compiled)
    req = compiled.create_infer_request()
    return (lambda: req.infer({0: xn})), facts
