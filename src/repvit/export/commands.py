"""``repvit export`` and ``repvit quantize``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FORMATS = ("onnx", "coreml", "torchscript", "pt2", "executorch")
_SUFFIX = {"onnx": ".onnx", "coreml": ".mlpackage", "torchscript": ".pt", "pt2": ".pt2", "executorch": ".pte"}


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="checkpoint file (any supported format, train or deploy form) or a variant name "
                        "such as repvit_m0_9 (random weights, for latency work)")
    p.add_argument("--out", required=True, metavar="PATH", help="output file (.mlpackage directory for Core ML)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="input height and width (default: the model's preprocessing, 224x224 for ImageNet)")
    p.add_argument("--model", metavar="VARIANT", help="variant of the checkpoint, when the file cannot tell "
                   "(official/timm files); a checkpoint of another variant is an error")
    p.add_argument("--num-classes", type=int, help="classifier size for a variant-name SOURCE (default 1000)")
    p.add_argument("--in-chans", type=int, help="input channels for a variant-name SOURCE (default 3)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--bake-preprocessing", choices=("float", "uint8"),
                   help="graph input is raw pixels (float 0..1 or uint8 0..255, NCHW) and the graph normalises "
                        "with the model's mean/std (ONNX, TorchScript, pt2, ExecuTorch)")
    p.add_argument("--json", action="store_true", help="print the sidecar as JSON")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a fused model to ONNX, Core ML, TorchScript, torch.export or ExecuTorch",
                       description="Export the fused (deploy) model. Writes the artefact and a JSON sidecar "
                                   "(PATH.json) with variant, form, input size, preprocessing, opset/target, sha256.")
    _source_args(p)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis (ONNX, pt2)")
    p.add_argument("--fp16", action="store_true", help="Core ML: fp16 compute precision (default fp32)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (17 or newer; default 18)")
    p.add_argument("--slim", action="store_true", help="ONNX: simplify the graph (onnxslim, else ORT basic optimisation)")
    p.add_argument("--ort-nchwc", action="store_true",
                   help="ONNX: rewrite the SE blocks so ONNX Runtime's CPU blocked layout covers the whole network "
                        "(same function; faster in ONNX Runtime on CPU, see docs/export.md)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default=None,
                   help="ONNX exporter: torchscript (fast, default) or dynamo (torch.export based)")
    p.add_argument("--labels", metavar="FILE", help="Core ML: text file with one class label per line")
    p.set_defaults(func=_export)

    q = sub.add_parser("quantize", help="INT8 post-training static quantization (ONNX Runtime QDQ, OpenVINO/NNCF or "
                                        "ExecuTorch/XNNPACK)",
                       description="Quantize the fused model to INT8, calibrated on real images, and optionally "
                                   "report the accuracy change on a held-out set. Backends: onnxruntime (a QDQ "
                                   ".onnx file), openvino (NNCF, an OpenVINO IR .xml + .bin: the fastest on x86 "
                                   "CPUs with VNNI) and executorch (PT2E + XNNPACK, a .pte program for Android/iOS). "
                                   "The backend follows the --out suffix unless given.")
    _source_args(q)
    q.add_argument("--calib", required=True, metavar="NAME_OR_PATH",
                   help="calibration images: a folder, or fashion-mnist / digits (their train split)")
    q.add_argument("--num-calib", type=int, default=256, help="calibration images (default 256)")
    q.add_argument("--eval", dest="eval_data", metavar="NAME_OR_PATH",
                   help="held-out set to compare fp32 and INT8 top-1 on (fashion-mnist/digits val split, or a "
                        "folder with class sub-folders)")
    q.add_argument("--num-eval", type=int, default=None, help="held-out images for --eval (default 2000)")
    q.add_argument("--backend", choices=("onnxruntime", "openvino", "executorch"),
                   help="default: openvino for an .xml output, executorch for .pte, onnxruntime otherwise")
    q.add_argument("--preset", choices=("performance", "mixed"), default="performance",
                   help="openvino: symmetric (performance) or asymmetric (mixed) activations")
    q.add_argument("--per-tensor", action="store_true",
                   help="onnxruntime/executorch: per-tensor weight scales (default: per-channel)")
    q.add_argument("--keep-float", nargs="+", choices=("none", "stem", "depthwise", "se", "head"),
                   help="layer groups left in float (remedies for sensitive layers; default none)")
    q.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="onnxruntime: activation calibration method")
    q.add_argument("--opset", type=int, default=20,
                   help="onnxruntime: ONNX opset (default 20: GELU as one node, faster INT8)")
    q.add_argument("--no-vnni-target", choices=("auto", "yes", "no"), default="auto",
                   help="quantize for an x86 CPU without VNNI (AVX2 only), whose int8 kernels saturate an int16: "
                        "uint8 weights (onnxruntime) / NNCF overflow fix on every layer (openvino); "
                        "auto = when this CPU lacks VNNI")
    q.set_defaults(func=_quantize)


def _check_source_flags(args: argparse.Namespace) -> None:
    """--num-classes/--in-chans build a variant-name SOURCE; a checkpoint brings its own, so refuse them there."""
    from .source import is_checkpoint_path
    given = [f for f, v in (("--num-classes", args.num_classes), ("--in-chans", args.in_chans)) if v is not None]
    if given and is_checkpoint_path(args.source):
        raise ValueError(f"{', '.join(given)} apply to a variant-name SOURCE only; the checkpoint {args.source} "
                         "brings its own classifier size and input channels")


def _load(args: argparse.Namespace):
    from .source import load_source
    return load_source(args.source, model=args.model, use_ema=True if args.ema else None,
                       num_classes=args.num_classes, in_chans=args.in_chans)


def _print(info: dict[str, Any], args: argparse.Namespace, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print("\n".join(lines))


def _check_not_source(args: argparse.Namespace, out: Path) -> None:
    src = Path(args.source).expanduser()
    if src.is_file() and out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the SOURCE checkpoint itself; the export would replace it: choose another "
                         "output path")


# format-specific options: which formats each applies to, and whether the command line set it (defaults are None
# where the option has a value, so an explicit default is refused too)
_FORMAT_FLAGS = {
    "--fp16": (("coreml",), lambda a: a.fp16),
    "--opset": (("onnx",), lambda a: a.opset is not None),
    "--slim": (("onnx",), lambda a: a.slim),
    "--ort-nchwc": (("onnx",), lambda a: a.ort_nchwc),
    "--exporter": (("onnx",), lambda a: a.exporter is not None),
    "--labels": (("coreml",), lambda a: a.labels is not None),
}


def _export(args: argparse.Namespace) -> int:
    from .common import check_writable

    out = Path(args.out)
    if args.format == "coreml" and out.suffix != ".mlpackage":
        raise ValueError(f"Core ML output must end in .mlpackage (e.g. --out {out.with_suffix('.mlpackage')})")
    check_writable(out)  # before the (slow) model loading
    _check_not_source(args, out)
    bad = [flag for flag, (formats, used) in _FORMAT_FLAGS.items() if used(args) and args.format not in formats]
    if bad:
        where = ", ".join(sorted({f for flag in bad for f in _FORMAT_FLAGS[flag][0]}))
        raise ValueError(f"{', '.join(bad)} do not apply to --format {args.format} (only to {where})")
    _check_source_flags(args)
    if args.dynamic_batch and args.format not in ("onnx", "pt2"):
        raise ValueError(f"--dynamic-batch is supported for onnx and pt2, not {args.format} "
                         "(TorchScript traces accept any batch; ExecuTorch and Core ML programs are static)")
    if args.bake_preprocessing and args.format == "coreml":
        raise ValueError("Core ML always takes an image and normalises inside the model; drop --bake-preprocessing")
    model = _load(args)
    size = tuple(args.input_size) if args.input_size else None
    bake = args.bake_preprocessing
    if args.format == "onnx":
        from .onnx_export import DEFAULT_OPSET, export_onnx
        info = export_onnx(model, out, input_size=size, dynamic_batch=args.dynamic_batch,
                           opset=DEFAULT_OPSET if args.opset is None else args.opset,
                           bake_preprocessing=bake, slim=args.slim, exporter=args.exporter or "torchscript",
                           ort_nchwc=args.ort_nchwc)
        v = info["validation"]
        detail = (f"opset {info['opset']}, ONNX checker passed, {v['batchnorm_nodes']} BatchNormalization nodes, "
                  f"max |ORT - PyTorch| = {v['max_abs_diff_vs_torch']:.3g}")
        if info["ort_nchwc"] is not None:
            detail += (f"; ORT NCHWc pass: {info['ort_nchwc']['pools']} pools -> GlobalAveragePool, "
                       f"{info['ort_nchwc']['gates']} SE gates resized")
    elif args.format == "coreml":
        from .coreml import export_coreml
        labels = None
        if args.labels:
            if not Path(args.labels).is_file():
                raise FileNotFoundError(f"labels file not found: {args.labels}")
            labels = [ln.strip() for ln in Path(args.labels).read_text().splitlines() if ln.strip()]
        info = export_coreml(model, out, input_size=size, fp16=args.fp16, class_labels=labels)
        detail = f"ML Program ({info['precision']}), spec validated: {info['spec']['num_class_labels']} class labels"
    elif args.format == "torchscript":
        from .torch_formats import export_torchscript
        info = export_torchscript(model, out, input_size=size, bake_preprocessing=bake)
        detail = f"max |loaded - eager| = {info['validation']['max_abs_diff_vs_eager']:.3g}"
    elif args.format == "pt2":
        from .torch_formats import export_program
        info = export_program(model, out, input_size=size, dynamic_batch=args.dynamic_batch, bake_preprocessing=bake)
        detail = f"max |loaded - eager| = {info['validation']['max_abs_diff_vs_eager']:.3g}"
    else:
        from .torch_formats import export_executorch
        info = export_executorch(model, out, input_size=size, bake_preprocessing=bake)
        v = info["validation"]
        detail = (f"max |ExecuTorch - eager| = {v['max_abs_diff_vs_eager']:.3g}" if "max_abs_diff_vs_eager" in v
                  else v.get("skipped", ""))
    c, h, w = info["input_size"]
    _print(info, args, [f"wrote {out} ({args.format}, {info['variant']}, input {c}x{h}x{w}); {detail}",
                        f"sidecar: {info['sidecar']}"])
    return 0


# backends that write their own file type: output suffix and what such a file is
_BACKEND_FILES = {"openvino": (".xml", "OpenVINO IR"), "executorch": (".pte", "an ExecuTorch program")}
# backend-specific options: which backends each applies to, and whether the command line set it
_BACKEND_FLAGS = {
    "--per-tensor": (("onnxruntime", "executorch"), lambda a: a.per_tensor),
    "--method": (("onnxruntime",), lambda a: a.method != "minmax"),
    "--opset": (("onnxruntime",), lambda a: a.opset != 20),
    "--preset": (("openvino",), lambda a: a.preset != "performance"),
    "--no-vnni-target": (("onnxruntime", "openvino"), lambda a: a.no_vnni_target != "auto"),
}


def _check_backend(args: argparse.Namespace, out: Path) -> str:
    """The backend (given, or from the --out suffix), after refusing options and suffixes that do not fit it."""
    if args.num_eval is not None and not args.eval_data:
        raise ValueError("--num-eval sets how many held-out images --eval uses; add --eval NAME_OR_PATH (or drop it)")
    if args.num_eval is None:
        args.num_eval = 2000
    backend = args.backend or next((b for b, (suf, _) in _BACKEND_FILES.items() if out.suffix == suf), "onnxruntime")
    bad = [flag for flag, (backends, used) in _BACKEND_FLAGS.items() if used(args) and backend not in backends]
    if bad:
        where = ", ".join(sorted({b for f in bad for b in _BACKEND_FLAGS[f][0]}))
        raise ValueError(f"{', '.join(bad)} do not apply to --backend {backend} (only to {where})")
    for name, (suffix, what) in _BACKEND_FILES.items():
        if backend == name and out.suffix != suffix:
            raise ValueError(f"the {name} backend writes {what}: --out must end in {suffix} "
                             f"(e.g. {out.with_suffix(suffix)})")
        if backend != name and out.suffix == suffix:
            raise ValueError(f"a {suffix} output is {what}; use --backend {name} or an .onnx path")
    return backend


def _quantize(args: argparse.Namespace) -> int:
    from .common import check_writable

    out = Path(args.out)
    backend = _check_backend(args, out)
    _check_source_flags(args)
    check_writable(out)
    _check_not_source(args, out)
    if args.keep_float is None:
        keep_float = []
    elif "none" in args.keep_float:
        if len(args.keep_float) > 1:
            raise ValueError("--keep-float none cannot be combined with other groups")
        keep_float = []
    else:
        keep_float = args.keep_float
    model = _load(args)
    size = tuple(args.input_size) if args.input_size else None
    no_vnni = {"auto": None, "yes": True, "no": False}[args.no_vnni_target]
    if backend == "executorch":
        from .executorch_int8 import quantize_executorch
        info = quantize_executorch(model, out, calib=args.calib, input_size=size, num_calib=args.num_calib,
                                   per_channel=not args.per_tensor, keep_float=keep_float,
                                   bake_preprocessing=args.bake_preprocessing, eval_data=args.eval_data,
                                   num_eval=args.num_eval)
        q = info["quantization"]
        lines = [f"wrote {out} (ExecuTorch XNNPACK INT8, {q['weights']} weights, calibrated on "
                 f"{q['calibration']['images']} images of {q['calibration']['source']}; "
                 f"conv/linear layers: {info['layers']['int8']} int8, {info['layers']['float']} float)"]
        v = info.get("validation", {})
        if "max_abs_diff_vs_pt2e" in v:
            lines.append(f"ExecuTorch runtime vs the PT2E reference: max |diff| {v['max_abs_diff_vs_pt2e']:.3g}")
        elif "skipped" in v:
            lines.append(f"not run: {v['skipped']}")
        if "latency_ms_batch1" in info:
            lat = info["latency_ms_batch1"]
            lines.append(f"batch-1 latency in the ExecuTorch runtime on this CPU ({lat['threads']} threads, "
                         f"indicative): fp32 {lat['fp32']:.3f} ms, INT8 {lat['int8']:.3f} ms ({lat['speedup']:.2f}x)")
    elif backend == "openvino":
        from .openvino_int8 import quantize_openvino
        info = quantize_openvino(model, out, calib=args.calib, input_size=size, num_calib=args.num_calib,
                                 keep_float=keep_float, preset=args.preset,
                                 bake_preprocessing=args.bake_preprocessing, eval_data=args.eval_data,
                                 num_eval=args.num_eval, overflow_fix=no_vnni)
        q = info["quantization"]
        prims = ", ".join(f"{n} {p}" for p, n in sorted(info["int8_primitives"].items()))
        lines = [f"wrote {out} + {info['weights_file']} (OpenVINO IR, NNCF {q['preset']} preset, calibrated on "
                 f"{q['calibration']['images']} images of {q['calibration']['source']}; conv/matmul primitives: "
                 f"{prims})"]
    else:
        from .quantize import quantize_onnx
        info = quantize_onnx(
            model, out, calib=args.calib, input_size=size, num_calib=args.num_calib, per_channel=not args.per_tensor,
            keep_float=keep_float, method=args.method, bake_preprocessing=args.bake_preprocessing,
            eval_data=args.eval_data, num_eval=args.num_eval, opset=args.opset, u8_weights=no_vnni,
        )
        q = info["quantization"]
        lines = [f"wrote {out} (INT8 QDQ, {q['weights']} weights, {q['activations']} activations, "
                 f"calibrated on {q['calibration']['images']} images of {q['calibration']['source']}; "
                 f"{q['kept_float_nodes']} nodes kept float)"]
    if "eval" in info:
        e = info["eval"]
        if "top1_fp32" in e:
            lines.append(f"held-out {e['source']} ({e['images']} images): top-1 fp32 {e['top1_fp32']:.2f}%, "
                         f"INT8 {e['top1_int8']:.2f}% (change {0.0 - e['top1_drop']:+.2f} points), "
                         f"prediction agreement {e['agreement_pct']:.1f}%")
        else:
            lines.append(f"held-out {e['source']}: prediction agreement with fp32 {e['agreement_pct']:.1f}%")
        if e.get("overlaps_calibration"):
            lines.append("warning: the held-out folder overlaps the calibration folder (the same folder, or one "
                         "inside the other), so these numbers are optimistic; pass --eval a folder of other images")
    lines.append(f"sidecar: {info['sidecar']}")
    _print(info, args, lines)
    return 0
