"""Shared fixtures for the export tests: small models with non-trivial weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repvit


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters (fresh BNs fold to near-identity,
    which would hide fusion/export bugs) and return the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def small_model(name: str = "repvit_m0_6", *, num_classes: int = 10, in_chans: int = 3, size: int = 64,
                seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = randomise_bn(repvit.create_model(name, num_classes=num_classes, in_chans=in_chans), seed)
    m.preprocessing = dict(m.preprocessing, input_size=[in_chans, size, size])
    return m


@pytest.fixture(scope="session")
def m06() -> nn.Module:
    """Train-form repvit_m0_6, 10 classes, 64x64 preprocessing, random BN statistics."""
    return small_model()
