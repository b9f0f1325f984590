"""``repvit roadmap``: params, MACs and measured latency of each roadmap step (fused)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..models.roadmap import ROADMAP_SOURCE, ROADMAP_STEPS, build_roadmap_model, config_dict, roadmap_configs
from ..reparam import reparameterize
from ..utils.complexity import count_macs, count_params
from .machine import machine_info, pin_threads
from .runtimes import RuntimeUnavailable, check_runtimes, prepare
from .timing import check_counts, measure_interleaved

__all__ = ["run_roadmap"]


def run_roadmap(
    *, runtime: str = "eager", threads: int | None = None, input_size: int = 224, warmup: int = 5,
    iters: int = 10, rounds: int = 3, measure: bool = True, log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Return (steps, meta). Each step: index, step, params, macs (fused, fvcore convention),
    latency_ms (median) / latency_p90_ms / latency (full stats), published_latency_ms (iPhone 12),
    published_top1, published_source, config. ``measure=False`` skips timing (latency fields are None)."""
    check_runtimes([runtime])
    check_counts(warmup=warmup, iters=iters, rounds=rounds)
    if input_size < 32:
        raise ValueError("input_size must be >= 32 pixels")
    with pin_threads(threads) as pinned:
        return _run_pinned(pinned, runtime=runtime, input_size=input_size, warmup=warmup, iters=iters,
                           rounds=rounds, measure=measure, log=log)


def _run_pinned(pinned: dict, *, runtime: str, input_size: int, warmup: int, iters: int, rounds: int,
                measure: bool, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    meta = {**machine_info(pinned["threads"]), "cpus": pinned["cpus"], "runtime": runtime,
            "input_size": input_size, "warmup": warmup, "iters": iters, "rounds": rounds}
    example = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    steps, runners = [], {}
    with tempfile.TemporaryDirectory(prefix="repvit-roadmap-") as tmp:
        for i, ((label, cfg), (_, _, top1, lat)) in enumerate(zip(roadmap_configs(), ROADMAP_STEPS)):
            fused = reparameterize(build_roadmap_model(i).eval())
            steps.append({"index": i, "step": label, "params": count_params(fused),
                          "macs": count_macs(fused, (input_size, input_size)),
                          "published_latency_ms": lat, "published_top1": top1, "published_source": ROADMAP_SOURCE,
                          "latency_ms": None, "latency_p90_ms": None, "config": config_dict(cfg)})
            if measure:
                try:
                    runners[i] = prepare(runtime, fused, example, Path(tmp), pinned["threads"], tag=f"step{i}")[0]
                except RuntimeUnavailable as e:
                    raise RuntimeError(f"runtime {runtime} unavailable for the roadmap: {e}") from e
        if measure:
            log(f"timing {len(runners)} roadmap steps interleaved ({runtime}, {rounds} rounds x {iters} iterations)")
            stats = measure_interleaved({str(k): v for k, v in runners.items()}, warmup=warmup, iters=iters,
                                        rounds=rounds)
            for s in steps:
                st = stats[str(s["index"])]
                s.update(latency_ms=st["median"], latency_p90_ms=st["p90"], latency=st)
    if hasattr(os, "getloadavg"):
        meta["load_avg_1m_end"] = os.getloadavg()[0]
    return steps, meta
