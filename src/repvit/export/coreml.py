"""Core ML export: an ML Program (.mlpackage) whose image input applies the model's normalisation.

Core ML's ``ImageType`` applies ``scale * pixel + bias`` with ONE scale for all channels but a bias
per channel, while RepViT normalises with a per-channel std. We use the mean std in the ImageType
and fold the remaining per-channel factor ``std_mean / std_c`` into the first conv's input-channel
weights (exact: the conv is linear and zero padding stays zero), so the model costs nothing extra.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .common import atomic_output, check_writable, get_preprocessing, model_info, require, write_sidecar
from .source import to_deploy

__all__ = ["export_coreml", "validate_coreml_spec", "coreml_image_params"]


def coreml_image_params(mean: Sequence[float], std: Sequence[float]) -> tuple[float, list[float], list[float]]:
    """(scale, per-channel bias, per-channel factor to fold into the first conv) for 0..255 pixels."""
    s0 = sum(std) / len(std)
    scale = 1.0 / (255.0 * s0)
    bias = [-m / s0 for m in mean]
    fold = [s0 / s for s in std]
    return scale, bias, fold


@torch.no_grad()
def _fold_channel_scale(model: nn.Module, fold: Sequence[float]) -> nn.Module:
    m = copy.deepcopy(model)
    conv = m.stem.conv1
    if not isinstance(conv, nn.Conv2d):
        raise RuntimeError("expected a fused model whose stem.conv1 is a Conv2d")
    conv.weight.mul_(torch.tensor(fold, dtype=conv.weight.dtype).view(1, -1, 1, 1))
    return m


def export_coreml(
    model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int] | None = None, fp16: bool = False,
    class_labels: Sequence[str] | None = None, deployment_target: str = "iOS16", sidecar: bool = True,
) -> dict[str, Any]:
    """Convert ``model`` (fused first) to a Core ML ML Program at ``path`` (``.mlpackage``).

    Input: an RGB (or grayscale for 1-channel models) image named ``image`` of the export size;
    outputs: ``classLabel`` and the ``classLabel_probs`` dict (softmax over the logits). ``fp16``
    selects the compute precision: fp32 by default (as the CLI's ``--fp16`` flag); ``fp16=True`` for what the
    Neural Engine runs. Returns the sidecar dict.
    """
    ct = require("coremltools", "Core ML export")
    out = Path(path)
    if out.suffix != ".mlpackage":
        raise ValueError(f"Core ML ML Programs are saved as a .mlpackage directory; use --out {out.with_suffix('.mlpackage')}")
    check_writable(out)
    target = getattr(ct.target, deployment_target, None)
    if target is None:
        raise ValueError(f"unknown Core ML deployment target {deployment_target!r}; e.g. iOS16, iOS17, macOS13")
    fused = to_deploy(model)
    pre = get_preprocessing(fused, input_size)
    c, h, w = pre["input_size"]
    if c not in (1, 3):
        raise ValueError(f"Core ML image inputs are RGB or grayscale; this model takes {c} channels")
    n = int(fused.num_classes)
    if n <= 0:
        raise ValueError("Core ML classifier export needs a model with a classifier head (num_classes > 0)")
    labels = [str(x) for x in (class_labels or range(n))]
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} class labels for a model with {n} classes")
    seen: dict[str, int] = {}
    dups = [f"{lab!r} (classes {seen[lab]} and {i})" for i, lab in enumerate(labels) if seen.setdefault(lab, i) != i]
    if dups:
        # Core ML's probability output is a dictionary keyed by label: a repeated label would lose a class
        raise ValueError(f"class labels must be unique (Core ML keys its probabilities by label), but "
                         f"{', '.join(dups[:3])}{' ...' if len(dups) > 3 else ''} repeat; make them distinct, e.g. "
                         "'crane (bird)' and 'crane (machine)' in ImageNet's list")

    scale, bias, fold = coreml_image_params(pre["mean"], pre["std"])
    net = nn.Sequential(_fold_channel_scale(fused, fold), nn.Softmax(dim=1)).eval()
    example = torch.rand(1, c, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example)
    image = ct.ImageType(
        name="image", shape=(1, c, h, w), scale=scale, bias=bias if c == 3 else bias[0],
        color_layout=ct.colorlayout.RGB if c == 3 else ct.colorlayout.GRAYSCALE,
    )
    try:
        mlmodel = ct.convert(
            traced, inputs=[image], classifier_config=ct.ClassifierConfig(labels, predicted_feature_name="classLabel"),
            convert_to="mlprogram", minimum_deployment_target=target,
            compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
        )
    except Exception as e:  # converter internals: say which step failed, keep the cause
        raise RuntimeError(f"coremltools {ct.__version__} could not convert the model: {type(e).__name__}: {e}") from e
    mlmodel.short_description = f"RepViT {getattr(fused, 'variant', '')} classifier ({'fp16' if fp16 else 'fp32'})"
    mlmodel.user_defined_metadata["repvit.variant"] = str(getattr(fused, "variant", ""))
    mlmodel.user_defined_metadata["repvit.mean"] = ",".join(map(str, pre["mean"]))
    mlmodel.user_defined_metadata["repvit.std"] = ",".join(map(str, pre["std"]))
    with atomic_output(out) as tmp:
        mlmodel.save(str(tmp))
        spec_info = validate_coreml_spec(tmp, input_size=(h, w), num_classes=n, channels=c)
    info = model_info(fused, pre)
    info.update({
        "format": "coreml", "target": f"mlprogram/{deployment_target}", "precision": "fp16" if fp16 else "fp32",
        "coremltools_version": ct.__version__, "input_name": "image",
        "input": f"{'RGB' if c == 3 else 'grayscale'} image {w}x{h}, pixels 0..255; normalisation inside the model",
        "image_scale": scale, "image_bias": bias, "folded_channel_scale": fold,
        "outputs": spec_info["outputs"], "spec": spec_info,
        "note": "predictions need macOS; on Linux only the spec is validated",
    })
    if sidecar:
        info["sidecar"] = str(write_sidecar(out, info))
    return info


def _class_labels(spec: Any) -> list[str]:
    """Class labels of an ML Program classifier: the ``classes`` argument of its ``classify`` op."""
    for func in spec.mlProgram.functions.values():
        for block in func.block_specializations.values():
            consts = {op.outputs[0].name: op for op in block.operations if op.outputs}
            for op in block.operations:
                if op.type != "classify":
                    continue
                arg = op.inputs["classes"].arguments[0]
                value = arg.value if arg.WhichOneof("binding") == "value" else consts[arg.name].attributes["val"]
                out = []
                for item in value.immediateValue.list.values:
                    t = item.immediateValue.tensor
                    out.append(str(t.strings.values[0]) if t.strings.values else str(t.longInts.values[0]))
                return out
    raise RuntimeError("the ML Program has no classify op: it was not converted as a classifier")


def validate_coreml_spec(path: str | os.PathLike, *, input_size: tuple[int, int], num_classes: int,
                         channels: int = 3) -> dict[str, Any]:
    """Load the saved package's spec (no prediction: that needs macOS) and check inputs, outputs, labels."""
    ct = require("coremltools", "Core ML validation")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise RuntimeError(f"expected an ML Program, got {spec.WhichOneof('Type')}")
    (inp,) = spec.description.input
    if inp.type.WhichOneof("Type") != "imageType":
        raise RuntimeError(f"input {inp.name!r} is not an image")
    img = inp.type.imageType
    h, w = input_size
    if (img.height, img.width) != (h, w):
        raise RuntimeError(f"image input is {img.width}x{img.height}, expected {w}x{h}")
    want_space = "RGB" if channels == 3 else "GRAYSCALE"
    space = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(img.colorSpace)
    if space != want_space:
        raise RuntimeError(f"image colour space is {space}, expected {want_space}")
    labels = _class_labels(spec)
    if len(labels) != num_classes:
        raise RuntimeError(f"spec has {len(labels)} class labels, expected {num_classes}")
    outputs = [o.name for o in spec.description.output]
    label_out, prob_out = spec.description.predictedFeatureName, spec.description.predictedProbabilitiesName
    if label_out not in outputs or prob_out not in outputs:
        raise RuntimeError(f"classifier outputs missing (outputs: {outputs})")
    return {"type": "mlProgram", "spec_version": int(spec.specificationVersion), "input": inp.name,
            "input_shape": [1, channels, h, w], "color_space": space, "outputs": outputs,
            "num_class_labels": len(labels), "first_labels": labels[:3],
            "label_output": label_out, "probabilities_output": prob_out}
