"""Latency measurement: warm-up, interleaved rounds, robust statistics.

Candidates are timed round-robin (every candidate runs a few iterations, then the next)
so that slow drifts of a shared machine (other jobs, thermal state) hit all of them
alike; comparisons are then made as ratios of per-round medians.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import numpy as np

__all__ = ["latency_stats", "measure_interleaved", "paired_ratio"]


def latency_stats(samples_s: list[float], round_medians_s: list[float] | None = None) -> dict:
    """Summary of per-iteration times (seconds in, milliseconds out)."""
    if not samples_s:
        raise ValueError("no timing samples: iterations must be >= 1")
    ms = np.asarray(samples_s) * 1e3
    p10, p50, p90 = np.percentile(ms, [10, 50, 90])
    out = {
        "median": float(p50), "p10": float(p10), "p90": float(p90),
        "mean": float(ms.mean()), "std": float(ms.std()), "min": float(ms.min()), "max": float(ms.max()),
        # relative spread: (p90 - p10) / median, a unitless noise figure
        "spread": float((p90 - p10) / p50) if p50 > 0 else 0.0,
        "n": int(ms.size),
    }
    if round_medians_s is not None:
        out["round_medians"] = [float(r * 1e3) for r in round_medians_s]
    return out


def check_counts(*, warmup: int, iters: int, rounds: int) -> None:
    """The run's timing counts, checked before anything is prepared (preparing runtimes can take minutes)."""
    if iters < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"need --iters >= 1, --rounds >= 1 and --warmup >= 0; got {iters}, {rounds}, {warmup}")


def measure_interleaved(
    candidates: Mapping[str, Callable[[], object]], *, warmup: int = 10, iters: int = 10, rounds: int = 5,
    rewarm: int = 2, clock: Callable[[], float] = time.perf_counter,
    overrides: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, dict]:
    """Time each zero-argument callable; returns ``{name: latency_stats(...)}``.

    ``warmup`` untimed calls per candidate first, then ``rounds`` rounds (order reversed every
    other round); in each round every candidate gets ``rewarm`` untimed calls (to refill caches another candidate evicted) and
    ``iters`` timed ones. ``overrides`` maps a name to its own ``(iters, rewarm)`` (for
    expensive reference candidates such as the matmul peak).
    """
    check_counts(warmup=warmup, iters=iters, rounds=rounds)
    if rewarm < 0:
        raise ValueError(f"need rewarm >= 0, got {rewarm}")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    per_round: dict[str, list[float]] = {k: [] for k in candidates}
    overrides = overrides or {}
    names = list(candidates)
    for r in range(rounds):
        # alternate the order so no candidate always follows the same neighbour (cache / turbo bias)
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = candidates[name]
            n_iter, n_rewarm = overrides.get(name, (iters, rewarm))
            for _ in range(n_rewarm):
                fn()
            times = []
            for _ in range(n_iter):
                t0 = clock()
                fn()
                times.append(clock() - t0)
            samples[name].extend(times)
            per_round[name].append(statistics.median(times))
    return {k: latency_stats(samples[k], per_round[k]) for k in candidates}


def paired_ratio(a: dict, b: dict) -> dict:
    """Ratio a/b of two interleaved measurements: median and range of the per-round ratios
    (rounds ran side by side, so each pair saw the same machine state)."""
    ra, rb = a.get("round_medians"), b.get("round_medians")
    if not ra or not rb or len(ra) != len(rb):
        r = a["median"] / b["median"]
        return {"ratio": r, "min": r, "max": r, "rounds": 0}
    ratios = [x / y for x, y in zip(ra, rb)]
    return {"ratio": float(statistics.median(ratios)), "min": float(min(ratios)), "max": float(max(ratios)),
            "rounds": len(ratios)}
