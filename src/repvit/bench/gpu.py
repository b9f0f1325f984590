"""GPU throughput mode, as the official speed_gpu.py measures it: large batch, fused model,
channels_last, AMP (fp16 autocast), images per second. Needs a CUDA GPU."""

from __future__ import annotations

import time
from typing import Any

import torch

from .peers import build_fused, resolve_models

__all__ = ["gpu_throughput"]


@torch.inference_mode()
def gpu_throughput(models: list[str] | None = None, *, batch: int = 256, input_size: int = 224,
                   warmup: int = 20, iters: int = 30) -> list[dict[str, Any]]:
    """Images/s per model on ``cuda:0`` (``warmup`` untimed then ``iters`` timed batches, both recorded per row);
    raises RuntimeError without a GPU."""
    if batch < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"batch and iters must be >= 1 and warmup >= 0, got batch {batch}, iters {iters}, "
                         f"warmup {warmup}")
    if not torch.cuda.is_available():
        raise RuntimeError("--gpu needs a CUDA GPU and a CUDA build of torch; none is visible here")
    dev = torch.device("cuda:0")
    out = []
    for e in resolve_models(models):
        model, how = build_fused(e)
        model = model.to(dev).to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, input_size, input_size, device=dev).to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16):
            for _ in range(warmup):
                model(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                model(x)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        out.append({"model": e.key, "display": e.display, "fused": how, "batch": batch, "amp": "fp16",
                    "channels_last": True, "warmup": warmup, "iters": iters,
                    "images_per_s": batch * iters / dt, "device": torch.cuda.get_device_name(dev)})
        del model, x
        torch.cuda.empty_cache()
    return out
