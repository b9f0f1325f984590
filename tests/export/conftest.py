"""Shared fixtures for the export tests: small models with non-trivial weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repvit


def randomise_bn(model: nn.Module, seed: int = 0, size: int = 64) -> nn.Module:
    """Make a random model behave like a trained one for export tests: random BN affine parameters
    (fresh BNs fold to near-identity, hiding fusion bugs) and running statistics measured on random
    images (stale statistics make the deep net collapse to input-independent logits, which would make
    every parity check vacuous). Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(torch.randn(8, model.in_chans, size, size, generator=g))
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def small_model(name: str = "repvit_m0_6", *, num_classes: int = 10, in_chans: int = 3, size: int = 64,
                seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = randomise_bn(repvit.create_model(name, num_classes=num_classes, in_chans=in_chans), seed, size)
    m.preprocessing = dict(m.preprocessing, input_size=[in_chans, size, size])
    return m


@pytest.fixture(scope="session")
def m06() -> nn.Module:
    """Train-form repvit_m0_6, 10 classes, 64x64 preprocessing, random BN statistics."""
    return small_model()
