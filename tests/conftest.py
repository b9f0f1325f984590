import os

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

# Small test inputs gain nothing from intra-op threads, and on a shared 2-core machine
# oversubscribed OpenMP threads spin and slow everything down by 10x or more.
torch.set_num_threads(int(os.environ.get("REPVIT_TEST_THREADS", "1")))


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (so fusion is really tested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(n, generator=g) * 0.3 + 1.0)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
