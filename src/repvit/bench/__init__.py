"""Latency benchmarks: ``repvit bench`` (runtimes x models, peak, plot) and ``repvit roadmap``."""

from .harness import SCHEMA, run_bench
from .roadmap import run_roadmap
from .timing import latency_stats, measure_interleaved, paired_ratio

__all__ = ["run_bench", "run_roadmap", "measure_interleaved", "latency_stats", "paired_ratio", "SCHEMA"]
