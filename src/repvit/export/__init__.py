"""Export of fused RepViT models (ONNX, Core ML, TorchScript, torch.export, ExecuTorch) and INT8 quantization.

Every exporter fuses the model first (``repvit.reparameterize``), validates the result and writes a
JSON sidecar (``PATH.json``: variant, form, input size, preprocessing, opset/target, sha256).
Optional runtimes (onnx, onnxruntime, coremltools, executorch) are imported only when used; a
missing one raises a RuntimeError naming the package to install.
"""

from .common import get_preprocessing, sha256_of, sidecar_path
from .coreml import export_coreml, validate_coreml_spec
from .onnx_export import export_onnx, validate_onnx
from .quantize import evaluate_onnx, quantize_onnx
from .source import load_source, to_deploy
from .torch_formats import export_executorch, export_program, export_torchscript

__all__ = ["load_source", "to_deploy", "export_onnx", "validate_onnx", "export_coreml", "validate_coreml_spec",
           "export_torchscript", "export_program", "export_executorch", "quantize_onnx", "evaluate_onnx",
           "get_preprocessing", "sha256_of", "sidecar_path"]
