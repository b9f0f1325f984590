"""INT8 post-training quantization of RepViT: accuracy change and speed-up vs fp32, side by side.

For each dataset (Fashion-MNIST, scikit-learn digits) a small RepViT is trained on CPU with a minimal
loop (cached as a repvit checkpoint, so reruns skip it), then exported to fp32 ONNX and quantized
with several recipes: ONNX Runtime QDQ (per-tensor / per-channel weights, sensitive layers kept in
float), OpenVINO via NNCF (everything NNCF quantizes, the default, and depthwise kept float) and ExecuTorch
(PT2E + XNNPACK, per-channel / per-tensor; batch 1 only), each against the fp32 model in the same runtime;
plus OpenVINO bf16 where the CPU has native bf16. Accuracy is
measured on the held-out split; latency is measured interleaved (every repeat runs every model in
turn) and reported as median and spread, with speed-ups as ratios to the best fp32 runtime.

    python benchmarks/int8_accuracy.py                       # both datasets, defaults below
    python benchmarks/int8_accuracy.py --datasets digits --train-seconds 60 --repeats 5
    # a model trained elsewhere, e.g. RepViT-M0.9 (EMA) from benchmarks/fashion_mnist.py's main comparison
    python benchmarks/int8_accuracy.py --datasets fashion-mnist \
        --checkpoint fashion-mnist=benchmarks/results/main_2threads/repvit_m0_9_ema.safetensors

Writes benchmarks/results/int8_accuracy.json and .md (or --out-dir).

The cached model (``--ckpt-dir``/``<dataset>_<variant>_<img>.safetensors``) records how it was trained (dataset,
variant, input size, seed, --train-seconds, the loop's result; metadata ``int8_bench_train``). A rerun reuses it only
when the requested settings are the same (else it stops: pass --retrain, or the cached run's settings), logs the reuse
and reports the record as ``train`` with ``cached: true``. --train-more continues it (same dataset, variant, input
size and seed; its own --train-seconds budget) and appends the session to ``train.more``; a later plain rerun with
the first run's --train-seconds reuses that model.

--checkpoint files must record their preprocessing: 1 input channel, the dataset's mean/std (that of its training
images) and, when --img is given, that input size; otherwise the run stops before any work. A ``best.safetensors``
of ``repvit train`` (metadata ``train_best``) was chosen on the validation split, which is the held-out split
measured here: the run warns and records ``checkpoint_selected_on_test_split``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout without an install
import repvit
from repvit.bench.machine import native_bf16
from repvit.export.calib import _builtin_arrays, _to_model_input, load_images
from repvit.export.common import atomic_write_text, installed_version
from repvit.export.onnx_export import export_onnx, ort_session
from repvit.export.quantize import evaluate_onnx, prepare_inputs, quantize_onnx
from repvit.export.source import to_deploy
from repvit.weights.api import model_from_checkpoint

try:  # OpenVINO + NNCF rows are added when both are installed (pip install 'repvit[bench]')
    from repvit.export.openvino_int8 import evaluate_openvino, openvino_session, quantize_openvino
    import nncf  # noqa: F401
    HAVE_OPENVINO = True
except Exception:  # noqa: BLE001 - any import failure just drops the OpenVINO rows
    HAVE_OPENVINO = False

try:  # ExecuTorch (XNNPACK) rows when executorch is installed (pip install 'repvit[executorch]'); batch 1 only
    from repvit.export.executorch_int8 import _runtime_method, evaluate_pte, executorch_threads, quantize_executorch
    from repvit.export.torch_formats import export_executorch
    import executorch.runtime  # noqa: F401
    HAVE_EXECUTORCH = True
except Exception:  # noqa: BLE001 - any import failure just drops the ExecuTorch rows
    HAVE_EXECUTORCH = False

TRAIN_META_KEY = "int8_bench_train"   # cached checkpoint metadata: how train_model trained it (see training_request)
REQUEST_KEYS = ("dataset", "variant", "img", "seed", "train_seconds")   # settings a cached model must match

# recipes compared: name -> quantize_onnx keyword arguments
RECIPES = {
    "int8 per-tensor": dict(per_channel=False),
    "int8 per-channel": dict(per_channel=True),
    "int8 per-channel, stem+head float": dict(per_channel=True, keep_float=("stem", "head")),
    "int8 per-channel, depthwise float": dict(per_channel=True, keep_float=("depthwise",)),
}
# OpenVINO (NNCF) recipes: name -> quantize_openvino keyword arguments
OV_RECIPES = {
    "openvino int8 (NNCF)": dict(keep_float=()),
    "openvino int8 (NNCF, depthwise float)": dict(keep_float=("depthwise",)),
}
# ExecuTorch (PT2E + XNNPACKQuantizer, lowered to XNNPACK) recipes: name -> quantize_executorch keyword arguments
ET_RECIPES = {
    "executorch int8 (PT2E per-channel)": dict(per_channel=True),
    "executorch int8 (PT2E per-tensor)": dict(per_channel=False),
}


def _norm_stats(x_u8: torch.Tensor) -> tuple[float, float]:
    """Mean and std of uint8 training images scaled to [0, 1] (the normalisation saved with the checkpoint)."""
    x = x_u8.float()
    return float(x.mean() / 255), float(x.std() / 255)


def dataset_stats(dataset: str) -> tuple[float, float]:
    """The normalisation of a built-in dataset's training images, rounded as saved (4 decimals)."""
    x_np, _ = _builtin_arrays(dataset, "train")
    mean, std = _norm_stats(torch.from_numpy(np.ascontiguousarray(x_np)))
    return round(mean, 4), round(std, 4)


def train_model(dataset: str, variant: str, img: int, seconds: float, ckpt: Path, seed: int = 0,
                resume: bool = False, metadata=None) -> dict:
    """Minimal CPU training loop (AdamW, cosine over a time-estimated step budget, label smoothing).

    ``resume``: start from the weights already in ``ckpt`` (a second budget on a slow machine).
    ``metadata``: given the returned facts, extra metadata to store in ``ckpt``."""
    torch.manual_seed(seed)
    x_np, y_np = _builtin_arrays(dataset, "train")
    x_u8 = torch.from_numpy(np.ascontiguousarray(x_np))
    y_all = torch.from_numpy(np.asarray(y_np, dtype=np.int64))
    # normalisation statistics of the training images, saved with the checkpoint's preprocessing
    mean, std = _norm_stats(x_u8)
    model = (repvit.create_model(variant, checkpoint=ckpt) if resume and ckpt.exists()
             else repvit.create_model(variant, num_classes=int(y_all.max()) + 1, in_chans=1))
    model.preprocessing = {"input_size": [1, img, img], "mean": [round(mean, 4)], "std": [round(std, 4)],
                           "interpolation": "bilinear", "crop_pct": 1.0}
    pre = model.preprocessing
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.025)
    bs, pad = 96, max(2, img // 16)

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _to_model_input(x_u8[idx].float().div(255)[:, None], 1, img, img)
        # random-shift augmentation (pad + crop), the same shift for the whole batch is enough here
        x = F.pad(x, (pad,) * 4)
        dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        x = x[:, :, dy:dy + img, dx:dx + img]
        return (x - pre["mean"][0]) / pre["std"][0], y_all[idx]

    model.train()
    t0, step, total = time.perf_counter(), 0, None
    perm, pos, losses = torch.randperm(len(y_all)), 0, []
    while True:
        if pos + bs > len(perm):
            perm, pos = torch.randperm(len(y_all)), 0
        x, y = batch(perm[pos:pos + bs])
        pos += bs
        if total is not None:
            for g in opt.param_groups:  # warm-up 3% then cosine to 2% of the peak
                frac = step / total
                g["lr"] = 2e-3 * (frac / 0.03 if frac < 0.03 else 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step == 10 and total is None:  # budget the schedule from the measured step time
            total = max(20, int(seconds / ((time.perf_counter() - t0) / 10)))
        if total is not None and step >= total:
            break
    elapsed = time.perf_counter() - t0
    # precise BatchNorm: after a short run the running statistics lag far behind the fast-moving
    # weights (eval accuracy near chance); re-estimate them on clean training images
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        for i in range(0, 2048, 128):
            idx = perm[i:i + 128]
            x = _to_model_input(x_u8[idx].float().div(255)[:, None], 1, img, img)
            model((x - pre["mean"][0]) / pre["std"][0])
        for m in bns:
            m.momentum = 0.1
    model.eval()
    info = {"steps": step, "batch": bs, "seconds": round(elapsed, 1), "epochs": round(step * bs / len(y_all), 2),
            "final_loss": round(statistics.mean(losses[-20:]), 4)}
    repvit.save_checkpoint(model, ckpt, metadata=metadata(info) if metadata else None)
    return info


def training_request(ds: str, args) -> dict:
    """The training settings a run asks of the cached model for ``ds``."""
    return {"dataset": ds, "variant": args.variant, "img": args.img, "seed": args.seed,
            "train_seconds": args.train_seconds_digits if ds == "digits" else args.train_seconds}


def read_train_record(ckpt: Path) -> dict | None:
    """The training record train_model stored in a cached checkpoint (None: none, e.g. an older cache file)."""
    from safetensors import safe_open
    with safe_open(str(ckpt), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get(TRAIN_META_KEY)
    try:
        rec = json.loads(raw) if raw else None
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def cache_path(ds: str, args) -> Path:
    return Path(args.ckpt_dir) / f"{ds}_{args.variant}_{args.img}.safetensors"


def check_cached(ds: str, args) -> dict | None:
    """The cached model's training record, if the run will use or continue it; raises ValueError when that model
    was trained with settings other than the requested ones (or records none). None: the run trains anew."""
    ckpt = cache_path(ds, args)
    if not ckpt.exists() or args.retrain:
        return None
    rec = read_train_record(ckpt)
    if rec is None:
        raise ValueError(f"cached checkpoint {ckpt} records no training settings (written before they were recorded): "
                         f"pass --retrain to train it anew, or --checkpoint {ds}={ckpt} to benchmark it as an "
                         "external checkpoint")
    want = training_request(ds, args)
    # --train-more gives the cached model another budget of --train-seconds: only what it continues must match
    keys = [k for k in REQUEST_KEYS if not (args.train_more and k == "train_seconds")]
    diff = [f"{k} {rec.get(k)!r} (requested {want[k]!r})" for k in keys if rec.get(k) != want[k]]
    if diff:
        raise ValueError(f"cached checkpoint {ckpt} was trained with other settings: {'; '.join(diff)}. Pass "
                         "--retrain to train it anew with the requested ones, rerun with the cached run's settings, "
                         "or choose another --ckpt-dir")
    return rec


def prepare_cached(ds: str, args) -> tuple[Path, dict, bool]:
    """(checkpoint, training record, reused) of the model trained and cached by this script for ``ds``: reused
    when the requested settings match its record (check_cached), trained (further, with --train-more) otherwise."""
    ckpt = cache_path(ds, args)
    rec = check_cached(ds, args)
    if rec is not None and not args.train_more:
        print(f"[{ds}] reusing cached {ckpt} (trained: {json.dumps(rec)}); --retrain trains it anew", flush=True)
        return ckpt, rec, True
    want = training_request(ds, args)
    more = rec is not None        # --train-more on a matching cached model
    print(f"[{ds}] training {args.variant} at {args.img}x{args.img}{' further' if more else ''} ...", flush=True)

    def record(info: dict) -> dict:
        nonlocal rec
        if more:
            rec = {**rec, "more": [*rec.get("more", []), {"train_seconds": want["train_seconds"], **info}]}
        else:
            rec = {**want, **info}
        return {TRAIN_META_KEY: rec}
    info = train_model(ds, args.variant, args.img, want["train_seconds"], ckpt, seed=args.seed, resume=more,
                       metadata=record)
    print(f"[{ds}] trained: {info}", flush=True)
    return ckpt, rec, False


def check_external(ds: str, path: Path, img: int | None) -> dict:
    """Facts about a --checkpoint file after checking its recorded preprocessing against ``ds``: 1 input channel,
    the mean/std of the dataset's training images and, when ``img`` is given, that input size (ValueError
    otherwise). A ``train_best`` record (picked on the validation split, the held-out split measured here) is
    warned about and recorded."""
    from repvit.weights.io import read_checkpoint
    if not path.is_file():
        raise ValueError(f"--checkpoint {ds}={path}: no such file")
    meta = read_checkpoint(path).metadata
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        raise ValueError(f"--checkpoint {ds}={path} records no preprocessing (input size, mean/std), so this script "
                         "would feed it 224x224 images normalised with the generic defaults; use a repvit checkpoint "
                         "saved with its data's preprocessing (repvit train, benchmarks/fashion_mnist.py)")
    diffs = []
    size = [int(v) for v in pre.get("input_size") or []]
    if size and size[0] != 1:
        diffs.append(f"{size[0]} input channels (the {ds} images have 1)")
    if img is not None and size and size[1:] != [img, img]:
        diffs.append(f"input size {'x'.join(map(str, size[1:]))} (--img {img})")
    for key, want in zip(("mean", "std"), dataset_stats(ds)):
        got = pre.get(key)
        if not got or len(got) != 1 or abs(float(got[0]) - want) > 1e-3:
            diffs.append(f"{key} {got} (the {ds} training images: [{want}])")
    if diffs:
        raise ValueError(f"--checkpoint {ds}={path} was trained with other inputs than this run's {ds} data: it "
                         f"records {'; '.join(diffs)}")
    facts: dict = {"preprocessing_checked": True}
    best = meta.get("train_best")
    if best:
        print(f"[{ds}] warning: {path} carries a train_best record ({best}): it was selected as the best epoch on "
              f"the validation split, the held-out {ds} split measured here, so its accuracy is optimistic",
              flush=True)
        facts.update(checkpoint_selected_on_test_split=True, checkpoint_train_best=best)
    return facts


def _machine() -> str:
    """CPU model, core count and the ISA extensions that decide INT8/bf16 kernels (VNNI, BF16, AMX)."""
    from repvit.bench.machine import cpu_flags, _cpuinfo
    flags = [k for k, v in cpu_flags().items() if v]
    return f"{_cpuinfo()[0] or platform.machine()}, {os.cpu_count()} CPUs; ISA: {', '.join(flags) or 'unknown'}"


def time_interleaved(runners: dict, repeats: int, iters: int) -> dict:
    """Per runner: median / min / max milliseconds per call over ``repeats`` interleaved rounds."""
    for fn in runners.values():  # warm-up
        for _ in range(3):
            fn()
    samples = {k: [] for k in runners}
    names = list(runners)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:   # order rotated: nobody always goes first
            fn = runners[k]
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[k].append((time.perf_counter() - t) / iters * 1000)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in samples.items()}


def bench_dataset(ds: str, args, workdir: Path) -> dict:
    facts: dict = {}
    if ds in args.checkpoint:             # trained elsewhere: use as is (variant and input size from the file)
        ckpt, train_info, cached = args.checkpoint[ds], None, False
        facts = (getattr(args, "external_facts", {}).get(ds)
                 or check_external(ds, ckpt, args.img if getattr(args, "img_given", True) else None))
    else:
        ckpt, train_info, cached = prepare_cached(ds, args)
    model = model_from_checkpoint(ckpt)   # variant (and input size) from the file, cached or given
    fused = to_deploy(model)
    pre = fused.preprocessing
    raw, labels = load_images(ds, pre, split="val", limit=args.num_eval, seed=1)
    x = prepare_inputs(raw, pre, None)
    y = labels.numpy()

    fp32 = workdir / f"{ds}_fp32.onnx"
    export_onnx(fused, fp32, dynamic_batch=True, sidecar=False, opset=args.opset)
    with torch.no_grad():
        torch_pred = torch.cat([fused(torch.from_numpy(x[i:i + 256])) for i in range(0, len(x), 256)]).argmax(1).numpy()
    rows = {"torch fp32 (fused)": {"top1": float((torch_pred == y).mean() * 100)}}
    ref = evaluate_onnx(fp32, x, y)
    rows["onnxruntime fp32"] = {"top1": ref["top1"]}
    paths = {"onnxruntime fp32": fp32}
    ov_paths = {}
    if HAVE_OPENVINO:
        # f32 explicitly: OpenVINO's default inference precision is bf16 on CPUs with AVX512-BF16/AMX
        ov_ref = evaluate_openvino(fp32, x, y, threads=args.threads, precision="f32")
        rows["openvino fp32"] = {"top1": ov_ref["top1"]}
        ov_paths["openvino fp32"] = fp32
        if native_bf16():   # bf16 only where the CPU has it (AVX512-BF16/AMX); elsewhere OpenVINO would run f32
            res = evaluate_openvino(fp32, x, y, threads=args.threads, precision="bf16")
            rows["openvino bf16"] = {"top1": res["top1"], "top1_drop": ov_ref["top1"] - res["top1"],
                                     "agreement_pct": float((res["pred"] == ov_ref["pred"]).mean() * 100)}
            ov_paths["openvino bf16"] = fp32
            print(f"[{ds}] openvino bf16: top1 {res['top1']:.2f} (OpenVINO fp32 {ov_ref['top1']:.2f})", flush=True)
        for name, kw in OV_RECIPES.items():
            p = workdir / f"{ds}_ov_{len(ov_paths)}.xml"
            t = time.perf_counter()
            info = quantize_openvino(model, p, calib=ds, num_calib=min(args.num_calib, 300), sidecar=False, **kw)
            res = evaluate_openvino(p, x, y, threads=args.threads)
            rows[name] = {"top1": res["top1"], "agreement_pct": float((res["pred"] == ov_ref["pred"]).mean() * 100),
                          "top1_drop": ov_ref["top1"] - res["top1"], "quantize_s": round(time.perf_counter() - t, 1),
                          "int8_primitives": info["int8_primitives"], "quantization": info["quantization"],
                          # the plugin's default for the float layers: bf16 on AVX512-BF16/AMX CPUs, f32 elsewhere
                          "inference_precision": res["inference_precision"]}
            ov_paths[name] = p
            print(f"[{ds}] {name}: top1 {res['top1']:.2f} (OpenVINO fp32 {ov_ref['top1']:.2f})", flush=True)
    et_paths = {}
    if HAVE_EXECUTORCH:
        etf = workdir / f"{ds}_fp32.pte"
        export_executorch(model, etf, sidecar=False)
        et_ref = evaluate_pte(etf, x, y)
        rows["executorch fp32 (XNNPACK)"] = {"top1": et_ref["top1"]}
        et_paths["executorch fp32 (XNNPACK)"] = etf
        for name, kw in ET_RECIPES.items():
            p = workdir / f"{ds}_et_{len(et_paths)}.pte"
            t = time.perf_counter()
            info = quantize_executorch(model, p, calib=ds, num_calib=min(args.num_calib, 300), sidecar=False,
                                       measure_latency=False, **kw)
            res = evaluate_pte(p, x, y)
            rows[name] = {"top1": res["top1"], "agreement_pct": float((res["pred"] == et_ref["pred"]).mean() * 100),
                          "top1_drop": et_ref["top1"] - res["top1"], "quantize_s": round(time.perf_counter() - t, 1),
                          "size_mb": round(p.stat().st_size / 1e6, 2), "fp32_size_mb": round(etf.stat().st_size / 1e6, 2),
                          "quantization": info.get("quantization")}
            et_paths[name] = p
            print(f"[{ds}] {name}: top1 {res['top1']:.2f} (ExecuTorch fp32 {et_ref['top1']:.2f})", flush=True)
    for name, kw in RECIPES.items():
        p = workdir / f"{ds}_{name.replace(' ', '_').replace(',', '').replace('+', '_')}.onnx"
        t = time.perf_counter()
        info = quantize_onnx(model, p, calib=ds, num_calib=args.num_calib, sidecar=False, opset=args.opset, **kw)
        res = evaluate_onnx(p, x, y)
        rows[name] = {"top1": res["top1"], "agreement_pct": float((res["pred"] == ref["pred"]).mean() * 100),
                      "top1_drop": ref["top1"] - res["top1"], "quantize_s": round(time.perf_counter() - t, 1),
                      "size_mb": round(p.stat().st_size / 1e6, 2), "fp32_size_mb": round(fp32.stat().st_size / 1e6, 2),
                      "kept_float_nodes": info["quantization"]["kept_float_nodes"], "quantization": info["quantization"]}
        paths[name] = p
        print(f"[{ds}] {name}: top1 {res['top1']:.2f} (fp32 {ref['top1']:.2f})", flush=True)

    speed = {}
    torch.set_num_threads(args.threads)
    for b in args.batches:
        xb = x[:b] if len(x) >= b else np.repeat(x, math.ceil(b / len(x)), 0)[:b]
        tb = torch.from_numpy(xb)
        runners = {"torch fp32 (fused)": (lambda tb=tb: fused(tb))}
        for name, p in paths.items():
            s = ort_session(p, threads=args.threads)
            iname = s.get_inputs()[0].name
            runners[name] = (lambda s=s, iname=iname, xb=xb: s.run(None, {iname: xb}))
        for name, p in ov_paths.items():
            # fp32/bf16 rows request their precision; INT8 rows run at OpenVINO's default (as deployed)
            prec = "bf16" if name.endswith("bf16") else "f32" if name == "openvino fp32" else None
            req = openvino_session(p, threads=args.threads, batch=b, precision=prec).create_infer_request()
            runners[name] = (lambda req=req, xb=xb: req.infer({0: xb}))
        if b == 1 and et_paths:      # ExecuTorch XNNPACK programs are specialised to batch 1
            executorch_threads(args.threads)
            for name, p in et_paths.items():
                m = _runtime_method(p)
                runners[name] = (lambda m=m, tb=tb: m.execute([tb]))
        with torch.no_grad():
            t = time_interleaved(runners, args.repeats, max(1, args.iters // b))
        best_fp32 = min(v["median_ms"] for k, v in t.items() if "fp32" in k)
        for k in t:
            t[k]["speedup_vs_best_fp32"] = best_fp32 / t[k]["median_ms"]
        speed[f"batch{b}"] = t
        print(f"[{ds}] batch {b}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in t.items()), flush=True)
    return {"checkpoint": str(ckpt), "variant": getattr(fused, "variant", args.variant),
            "train": train_info, "cached": cached, **facts, "eval_images": int(len(x)), "accuracy": rows,
            "speed": speed, "preprocessing": pre}


def speed_by_size(args, workdir: Path) -> dict:
    """fp32 vs INT8 (per-channel) latency of the Fashion-MNIST model at larger inputs (speed only)."""
    ds = args.datasets[0] if args.datasets else "fashion-mnist"
    ckpt = cache_path(ds, args)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt} not found: run the accuracy benchmark first")
    print(f"[speed] cached {ckpt} (trained: {json.dumps(read_train_record(ckpt))})", flush=True)
    out = {}
    torch.set_num_threads(args.threads)
    for size in args.speed_sizes:
        model = repvit.create_model(args.variant, checkpoint=ckpt)
        model.preprocessing = dict(model.preprocessing, input_size=[1, size, size])
        fused = to_deploy(model)
        fp32, int8 = workdir / f"s{size}_fp32.onnx", workdir / f"s{size}_int8.onnx"
        export_onnx(fused, fp32, dynamic_batch=True, sidecar=False, opset=args.opset)
        quantize_onnx(model, int8, calib=ds, num_calib=64, sidecar=False, opset=args.opset)
        x = prepare_inputs(load_images(ds, fused.preprocessing, split="val", limit=1, seed=1)[0], fused.preprocessing, None)
        runners = {"torch fp32 (fused)": (lambda t=torch.from_numpy(x): fused(t))}
        for name, p in (("onnxruntime fp32", fp32), ("int8 per-channel", int8)):
            sess = ort_session(p, threads=args.threads)
            runners[name] = (lambda sess=sess: sess.run(None, {"input": x}))
        with torch.no_grad():
            t = time_interleaved(runners, args.repeats, max(1, args.iters // 8))
        best = min(t["torch fp32 (fused)"]["median_ms"], t["onnxruntime fp32"]["median_ms"])
        for k in t:
            t[k]["speedup_vs_best_fp32"] = best / t[k]["median_ms"]
        out[f"{size}x{size}"] = t
        print(f"[speed {size}] " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in t.items()), flush=True)
    return out


def speed_markdown(res: dict) -> str:
    lines = [f"# fp32 vs INT8 latency by input size - {res['variant']} (Fashion-MNIST weights), batch 1, "
             f"{res['threads']} thread(s), {res['repeats']} interleaved repeats (median [min-max])", "",
             "| input | " + " | ".join(next(iter(res["sizes"].values()))) + " | INT8 speed-up vs best fp32 |",
             "|---" * (2 + len(next(iter(res["sizes"].values())))) + "|"]
    for size, t in res["sizes"].items():
        lines.append(f"| {size} | " + " | ".join(f"{v['median_ms']:.2f} [{v['min_ms']:.2f}-{v['max_ms']:.2f}] ms"
                                               for v in t.values())
                     + f" | {t['int8 per-channel']['speedup_vs_best_fp32']:.2f}x |")
    return "\n".join(lines) + "\n"


def to_markdown(res: dict) -> str:
    variants = ", ".join(sorted({r.get("variant", res["variant"]) for r in res["datasets"].values()})) or res["variant"]
    lines = [f"# INT8 (ONNX Runtime QDQ static, OpenVINO NNCF, ExecuTorch XNNPACK) and bf16 vs fp32 - {variants}",
             "", "INT8 rows compare with the fp32 model in the same runtime (drop and agreement); speed-ups are "
             "against the best fp32 runtime.", "",
             f"Machine: {res['machine']}; {res['threads']} threads; {res['repeats']} interleaved repeats "
             "(median, [min-max]); speed-up = best fp32 median / median.", ""]
    for ds, r in res["datasets"].items():
        size = "x".join(str(v) for v in r["preprocessing"]["input_size"][1:])
        lines += [f"## {ds} ({r['eval_images']} held-out images, {size} input, checkpoint {r['checkpoint']})", ""]
        bkeys = list(r["speed"])
        lines.append("| model | top-1 % | drop (pts) | agree % | " + " | ".join(f"{b} ms" for b in bkeys)
                     + " | " + " | ".join(f"{b} speed-up" for b in bkeys) + " |")
        lines.append("|---" * (4 + 2 * len(bkeys)) + "|")
        for name, a in r["accuracy"].items():
            cells = [name, f"{a['top1']:.2f}", f"{a.get('top1_drop', 0.0):+.2f}" if "top1_drop" in a else "-",
                     f"{a['agreement_pct']:.1f}" if "agreement_pct" in a else "-"]
            for b in bkeys:
                s = r["speed"][b].get(name)
                cells.append(f"{s['median_ms']:.2f} [{s['min_ms']:.2f}-{s['max_ms']:.2f}]" if s else "-")
            for b in bkeys:
                s = r["speed"][b].get(name)
                cells.append(f"{s['speedup_vs_best_fp32']:.2f}x" if s else "-")
            lines.append("| " + " | ".join(cells) + " |")
        if r["train"]:
            lines += ["", f"Training{' (cached checkpoint, trained by an earlier run)' if r.get('cached') else ''}: "
                          f"{r['train']}"]
        if r.get("checkpoint_selected_on_test_split"):
            lines += ["", f"Note: the checkpoint was selected on this held-out split ({r['checkpoint_train_best']})."]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["fashion-mnist", "digits"])
    ap.add_argument("--variant", default="repvit_m0_9")
    ap.add_argument("--img", type=int, default=None,
                    help="input size of the trained model (default 64); with --checkpoint, the file's input size "
                         "is used and must equal --img when given")
    ap.add_argument("--seed", type=int, default=0, help="seed of the training run (recorded with the cached model)")
    ap.add_argument("--train-seconds", type=float, default=600, help="training budget for fashion-mnist")
    ap.add_argument("--train-seconds-digits", type=float, default=180, help="training budget for digits")
    ap.add_argument("--retrain", action="store_true", help="train from scratch even if a checkpoint is cached")
    ap.add_argument("--train-more", action="store_true", help="continue training the cached checkpoint")
    ap.add_argument("--ckpt-dir", default=os.path.expanduser("~/.cache/repvit/int8_bench"))
    ap.add_argument("--checkpoint", action="append", default=[], metavar="DATASET=PATH",
                    help="use this trained repvit checkpoint for DATASET instead of training/caching one "
                         "(repeatable); its variant and input size come from the file")
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--num-eval", type=int, default=None, help="held-out images (default: the whole split)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for training and timing (default 1: robust on a shared machine)")
    ap.add_argument("--opset", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=64, help="images per timing sample (calls = iters / batch)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing int8_accuracy.json in --out-dir (the committed results by default)")
    ap.add_argument("--speed-sizes", type=int, nargs="+",
                    help="only measure fp32 vs INT8 latency of the cached model at these input sizes "
                         "(writes int8_speed_by_size.json/.md)")
    args = ap.parse_args(argv)
    try:
        args.checkpoint = {k: Path(v).expanduser() for k, v in (c.split("=", 1) for c in args.checkpoint)}
    except ValueError:
        ap.error("--checkpoint takes DATASET=PATH, e.g. fashion-mnist=run/best.safetensors")
    if args.retrain and args.train_more:
        ap.error("--retrain (from scratch) and --train-more (continue the cached model) exclude each other")
    args.img_given, args.img = args.img is not None, args.img or 64
    args.external_facts = {}
    if not args.speed_sizes:
        try:   # before any work: a mismatched external or cached checkpoint stops the run now
            for ds in args.datasets:
                if ds in args.checkpoint:
                    args.external_facts[ds] = check_external(ds, args.checkpoint[ds],
                                                             args.img if args.img_given else None)
                else:
                    check_cached(ds, args)
        except ValueError as e:
            ap.error(str(e))
    torch.set_num_threads(args.threads)
    Path(args.ckpt_dir).mkdir(parents=True, exist_ok=True)
    out = Path(args.out_dir)
    target = out / ("int8_speed_by_size.json" if args.speed_sizes else "int8_accuracy.json")   # what this mode writes
    if target.exists() and not args.overwrite:
        ap.error(f"{target} exists (committed results by default): pass another --out-dir, or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    res = {"variant": args.variant, "img": args.img, "threads": args.threads, "repeats": args.repeats,
           "machine": _machine(),
           "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
           "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                        "openvino": __import__("openvino").__version__ if HAVE_OPENVINO else None,
                        "executorch": installed_version("executorch") if HAVE_EXECUTORCH else None},
           "datasets": {}}
    if args.speed_sizes:
        with tempfile.TemporaryDirectory(prefix="repvit-int8-speed-") as td:
            sres = {k: res[k] for k in ("variant", "threads", "repeats", "machine", "command", "versions")}
            sres["sizes"] = speed_by_size(args, Path(td))
        atomic_write_text(out / "int8_speed_by_size.json", json.dumps(sres, indent=2) + "\n")
        atomic_write_text(out / "int8_speed_by_size.md", speed_markdown(sres))
        print(speed_markdown(sres))
        return 0
    with tempfile.TemporaryDirectory(prefix="repvit-int8-bench-") as td:
        for ds in args.datasets:
            res["datasets"][ds] = bench_dataset(ds, args, Path(td))
            # written after every dataset: a later one failing does not lose the finished ones
            atomic_write_text(out / "int8_accuracy.json", json.dumps(res, indent=2) + "\n")
            atomic_write_text(out / "int8_accuracy.md", to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
