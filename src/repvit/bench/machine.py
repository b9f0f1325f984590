"""Describe the machine, pin threads, and measure its matmul peak (the physical limit)."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Callable, Iterator

import torch

from ..export.common import installed_version
from .timing import measure_interleaved

__all__ = ["pin_threads", "machine_info", "cpu_flags", "matmul_peak", "matmul_candidates", "peak_from_stats",
           "int8_overflow_risk", "resolve_no_vnni"]

_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: keep platform's description
        pass
    return model, flags


def cpu_flags() -> dict[str, bool]:
    """The ISA features that decide which fp32/bf16/int8 kernels are fast."""
    _, flags = _cpuinfo()
    return {f: f in flags for f in _FLAGS}


def native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX); otherwise it is emulated."""
    f = cpu_flags()
    return f["avx512_bf16"] or f["amx_bf16"]


def int8_overflow_risk() -> bool:
    """True on an x86 CPU with AVX2 but no VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8).

    There, INT8 GEMM/conv kernels multiply uint8 activations by int8 weights with ``vpmaddubsw``, which adds
    pairs of products into a saturating int16: 255 * 127 * 2 overflows it. The remedies used here: uint8
    weights for ONNX Runtime (its U8U8 kernels), NNCF's overflow fix on every layer for OpenVINO. Seen here:
    a digits probe at 73 % fp32 fell to 21-34 % INT8 on an AVX2-only AMD EPYC without them, while the same
    code lost < 5 points on a VNNI Xeon.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    f = cpu_flags()
    return f["avx2"] and not (f["avx512_vnni"] or f["avx_vnni"] or f["amx_int8"])


def resolve_no_vnni(flag: bool | None) -> bool:
    """An explicit "the target lacks VNNI" choice, or ``None`` = decide from *this* CPU (:func:`int8_overflow_risk`).

    The one place where the INT8 exporters (ONNX Runtime uint8 weights, NNCF's overflow fix) resolve their
    default, so ``repvit quantize --no-vnni-target auto|yes|no`` means the same for every backend.
    """
    return int8_overflow_risk() if flag is None else bool(flag)


def _thread_ids() -> list[int]:
    """Kernel thread ids of this process (Linux ``/proc/self/task``); ``[0]`` (the calling thread) elsewhere."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except (OSError, ValueError):
        return [0]


def _thread_affinities() -> dict[int, set[int]]:
    """Affinity mask of every thread of the process (threads that exit meanwhile are left out)."""
    masks = {}
    for tid in _thread_ids():
        try:
            masks[tid] = os.sched_getaffinity(tid)
        except (ProcessLookupError, FileNotFoundError):  # the thread has exited
            pass
    return masks


def _set_all_threads(mask, per_thread: dict[int, set[int]] | None = None) -> None:
    """Set the affinity of every thread of the process: ``per_thread[tid]`` where known, else ``mask``.

    ``os.sched_setaffinity(0, ...)`` alone pins only the calling thread: the intra-op pools of torch, ONNX Runtime
    and OpenVINO that already exist would keep running on every CPU. Threads that exit meanwhile are skipped."""
    per_thread = per_thread or {}
    for tid in _thread_ids():  # the calling thread is one of them
        try:
            os.sched_setaffinity(tid, per_thread.get(tid, mask))
        except (ProcessLookupError, FileNotFoundError):  # the thread has exited
            pass


@contextlib.contextmanager
def pin_threads(threads: int | None) -> Iterator[dict]:
    """Use ``threads`` intra-op threads and pin the process - every thread of it, the runtimes' existing
    thread pools included - to that many CPUs while inside; on exit each thread gets back its previous
    affinity (threads started inside get the caller's previous one) and torch its thread count.

    Yields what was set (for the report). ``None`` means one thread per available CPU.
    ONNX Runtime and OpenVINO sessions get the same count from the harness.
    """
    has_aff = hasattr(os, "sched_getaffinity")
    before = os.sched_getaffinity(0) if has_aff else set(range(os.cpu_count() or 1))
    avail = sorted(before)
    n = len(avail) if threads is None else threads
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    if n > len(avail):
        raise ValueError(f"--threads {n} exceeds the {len(avail)} CPUs this process may use")
    cpus, torch_before = avail[:n], torch.get_num_threads()
    masks = _thread_affinities() if has_aff else {}
    try:
        if has_aff:
            _set_all_threads(cpus)
        torch.set_num_threads(n)
        yield {"threads": n, "cpus": cpus, "interop_threads": torch.get_num_interop_threads()}
    finally:
        torch.set_num_threads(torch_before)
        if has_aff:
            _set_all_threads(before, masks)


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # not installed or broken: report as absent
        return None


def machine_info(threads: int) -> dict:
    model, _ = _cpuinfo()
    info = {
        "cpu_model": model, "logical_cpus": os.cpu_count(), "threads": threads,
        "cpu_flags": cpu_flags(), "native_bf16": native_bf16(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "timm": _version("timm"), "onnxruntime": _version("onnxruntime"),
        "openvino": _version("openvino"), "onnx": _version("onnx"), "executorch": installed_version("executorch"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1m_start"] = os.getloadavg()[0]
    return info


def matmul_candidates(dtypes: tuple[str, ...] = ("fp32", "bf16"), n: int = 2048) -> dict[str, Callable[[], object]]:
    """Zero-argument n x n x n matmuls per dtype (fp32, bf16, int8 where torch has a CPU kernel)."""
    fns: dict[str, Callable[[], object]] = {}
    for d in dtypes:
        if d in ("fp32", "bf16"):
            dt = torch.float32 if d == "fp32" else torch.bfloat16
            a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
            fns[d] = lambda a=a, b=b: torch.mm(a, b)
        elif d == "int8" and hasattr(torch, "_int_mm"):
            a, b = torch.randint(-64, 64, (n, n), dtype=torch.int8), torch.randint(-64, 64, (n, n), dtype=torch.int8)
            try:
                torch._int_mm(a, b)
            except RuntimeError:  # no CPU int8 matmul kernel in this build
                continue
            fns[d] = lambda a=a, b=b: torch._int_mm(a, b)
    return fns


def peak_from_stats(stats: dict, n: int) -> dict:
    """GFLOP/s (2 n^3 flops per call) from the median time of each matmul candidate."""
    return {d: {"n": n, "gflops": 2.0 * n ** 3 / (s["median"] * 1e-3) / 1e9, "latency_ms": s} for d, s in stats.items()}


@torch.inference_mode()
def matmul_peak(dtypes: tuple[str, ...] = ("fp32", "bf16"), n: int = 2048, *, iters: int = 5, rounds: int = 3,
                warmup: int = 2) -> dict:
    """Achieved GFLOP/s of an n x n x n matmul per dtype, measured on its own.

    This is the practical compute roof for the runtimes: a model at X GFLOP/s runs at
    X / peak of what this CPU does on the friendliest possible workload. The harness
    interleaves the same matmuls with the models instead, so both see the same machine load.
    """
    stats = measure_interleaved(matmul_candidates(dtypes, n), warmup=warmup, iters=iters, rounds=rounds, rewarm=0)
    return peak_from_stats(stats, n)
