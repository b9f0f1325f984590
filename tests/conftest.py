import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

# Small test inputs gain nothing from intra-op threads, and on a shared 2-core machine
# oversubscribed OpenMP threads spin and slow everything down by 10x or more.
torch.set_num_threads(int(os.environ.get("REPVIT_TEST_THREADS", "1")))


def randomize_bn(model: torch.nn.Module, seed: int = 0, calibrate: int | None = None) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (so fusion is really tested).

    ``calibrate=SIZE``: the running statistics are then measured on random SIZE x SIZE images instead (the affine
    parameters stay random). With arbitrary statistics a deep random net collapses to nearly input-independent
    outputs, under which a parity check of two forms of the model proves little; measured ones keep the outputs
    input-dependent. The model's train/eval mode is kept."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.randn(n, generator=g) * 0.3 + 1.0)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        if calibrate:
            was_training = model.training
            chans = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
            for m in bns:
                m.reset_running_stats()
                m.momentum = None                      # cumulative average over the calibration batches
            model.train()
            for _ in range(2):
                model(torch.randn(8, chans, calibrate, calibrate, generator=g))
            for m in bns:
                m.momentum = 0.1
            model.train(was_training)
    return model


def assert_input_dependent(a: torch.Tensor, b: torch.Tensor, rel: float = 0.05) -> None:
    """Outputs of a model for two different inputs differ clearly (by ``rel`` of their largest magnitude): a parity
    check between two forms of a model whose outputs ignore the input would be vacuous."""
    gap, scale = (a - b).abs().max().item(), max(a.abs().max().item(), b.abs().max().item())
    assert gap > rel * scale, f"outputs barely depend on the input: max gap {gap:.3g} vs magnitude {scale:.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` executed as a fresh module (the benchmark scripts are not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
