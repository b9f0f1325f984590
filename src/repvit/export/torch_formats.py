"""PyTorch-native exports: TorchScript, torch.export programs (.pt2) and ExecuTorch (.pte, XNNPACK)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from .common import (Preprocess, atomic_output, check_parity, check_writable, get_preprocessing, installed_version, model_info,
                     write_sidecar)
from .source import to_deploy

__all__ = ["export_torchscript", "export_program", "export_executorch"]


def _prepare(model: nn.Module, input_size, bake: str | None, batch: int) -> tuple[nn.Module, nn.Module, dict, torch.Tensor]:
    if bake not in (None, "float", "uint8"):
        raise ValueError(f"bake_preprocessing must be None, 'float' or 'uint8', got {bake!r}")
    fused = to_deploy(model)
    pre = get_preprocessing(fused, input_size)
    net = Preprocess(fused, pre["mean"], pre["std"], bake).eval() if bake else fused
    c, h, w = pre["input_size"]
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (batch, c, h, w), generator=g, dtype=torch.uint8) if bake == "uint8"
         else torch.rand(batch, c, h, w, generator=g))
    return fused, net, pre, x


def _common(fused: nn.Module, pre: dict, bake: str | None, fmt: str, **extra: Any) -> dict[str, Any]:
    info = model_info(fused, pre)
    info.update({"format": fmt, "input_layout": "NCHW", "preprocessing_baked": bool(bake),
                 "input_dtype": "uint8" if bake == "uint8" else "float32",
                 "input_range": {"uint8": "0..255", "float": "0..1"}.get(bake or "", "normalised ((x/255 - mean) / std)"),
                 **extra})
    return info


def _parity(got: torch.Tensor, want: torch.Tensor, what: str) -> dict[str, float]:
    """``{"max_abs_diff_vs_eager", "tolerance"}``; raises ParityError beyond the fp32 tolerance (common.check_parity)."""
    par = check_parity(got, want, what)
    return {"max_abs_diff_vs_eager": par["max_abs_diff"], "tolerance": par["tolerance"]}


def _dynamic_shapes(dynamic_batch: bool):
    return ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None


@torch.no_grad()
def export_torchscript(
    model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int] | None = None,
    bake_preprocessing: str | None = None, sidecar: bool = True,
) -> dict[str, Any]:
    """Trace the fused model to TorchScript (``torch.jit.load``-able); batch size is free at run time."""
    out = check_writable(path)
    fused, net, pre, x = _prepare(model, input_size, bake_preprocessing, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the most portable format
        traced = torch.jit.trace(net, x)
        with atomic_output(out) as tmp:
            torch.jit.save(traced, str(tmp))
            x2 = torch.cat([x, x.flip(0)]) if x.shape[0] > 1 else x.repeat(2, 1, 1, 1)
            par = _parity(torch.jit.load(str(tmp))(x2), net(x2), "TorchScript export (loaded vs eager)")
    info = _common(fused, pre, bake_preprocessing, "torchscript", target="torch.jit (traced)",
                   validation={**par, "validated_batch": 2})
    if sidecar:
        info["sidecar"] = str(write_sidecar(out, info))
    return info


def _export(net: nn.Module, x: torch.Tensor, dynamic_batch: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(net, (x,), dynamic_shapes=_dynamic_shapes(dynamic_batch), strict=False)


@torch.no_grad()
def export_program(
    model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int] | None = None,
    dynamic_batch: bool = False, bake_preprocessing: str | None = None, sidecar: bool = True,
) -> dict[str, Any]:
    """Save a ``torch.export`` ExportedProgram (``.pt2``; load with ``torch.export.load``)."""
    out = check_writable(path)
    fused, net, pre, x = _prepare(model, input_size, bake_preprocessing, 2 if dynamic_batch else 1)
    ep = _export(net, x, dynamic_batch)
    with atomic_output(out) as tmp:
        torch.export.save(ep, str(tmp))
        par = _parity(torch.export.load(str(tmp)).module()(x), net(x), "torch.export program (loaded vs eager)")
    info = _common(fused, pre, bake_preprocessing, "pt2", target=f"torch.export (torch {torch.__version__})",
                   dynamic_batch=dynamic_batch, validation={**par, "validated_batch": int(x.shape[0])})
    if sidecar:
        info["sidecar"] = str(write_sidecar(out, info))
    return info


@torch.no_grad()
def export_executorch(
    model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int] | None = None,
    bake_preprocessing: str | None = None, sidecar: bool = True, validate: bool = True,
) -> dict[str, Any]:
    """Lower the fused model to an ExecuTorch program (``.pte``) delegated to XNNPACK (fp32, static batch 1)."""
    from .executorch_int8 import xnnpack_program    # lazy: it imports this module
    out = check_writable(path)
    fused, net, pre, x = _prepare(model, input_size, bake_preprocessing, 1)
    prog, _ = xnnpack_program(net, x)
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as f:
            f.write(prog.buffer)
        validation: dict[str, Any] = {}
        if validate:
            validation = _run_pte(tmp, net, x)
    info = _common(fused, pre, bake_preprocessing, "executorch", target="executorch/xnnpack",
                   executorch_version=installed_version("executorch"), validation=validation)
    if sidecar:
        info["sidecar"] = str(write_sidecar(out, info))
    return info


def _run_pte(path: os.PathLike, net: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Run the .pte with the ExecuTorch Python runtime (if its native module is present) against eager; a load or
    run error, or a difference beyond the fp32 tolerance, raises (inside the caller's atomic block)."""
    from .executorch_int8 import _runtime_method
    try:
        method = _runtime_method(path)
    except ImportError as e:  # runtime wheel parts missing: export is still valid, say why it was not run
        return {"skipped": f"executorch runtime unavailable: {e}"}
    got = method.execute([x])[0]
    return {**_parity(got, net(x), "ExecuTorch program (runtime vs eager)"), "validated_batch": 1,
            "runtime": "executorch.runtime"}
