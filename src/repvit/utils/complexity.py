"""Parameter and MAC counting with the fvcore convention.

fvcore (the counter behind the published numbers) counts one MAC per multiply-add in
convolutions and linear layers (bias excluded) and one per input element of
``adaptive_avg_pool2d`` (the official head pools that way). Element-wise ops, the SE's
``mean`` and activations are not counted. We count the same things with forward hooks,
so our figures equal the reference numbers exactly without depending on fvcore.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int] = (224, 224), *, in_chans: int | None = None) -> int:
    """MACs of one forward pass at batch 1 (fvcore convention, see module docstring)."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    pooled = 0

    def pool_hook(m, inp, out):
        nonlocal pooled
        pooled = out.numel()

    hooks = []
    stages = getattr(model, "stages", None)
    pool_input = getattr(model, "pool_input_module", None)   # a head that pools something else (MobileNetV3's)
    if callable(pool_input):
        hooks.append(pool_input().register_forward_hook(pool_hook))
    elif stages is not None and getattr(model, "num_classes", 0) > 0:
        hooks.append(stages[-1].register_forward_hook(pool_hook))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    ref = next(model.parameters())
    c = in_chans or getattr(model, "in_chans", 3)
    try:
        model(torch.zeros(1, c, *input_size, device=ref.device, dtype=ref.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # the classifier's global average pool (fvcore counts adaptive_avg_pool2d inputs)
    return total + pooled
