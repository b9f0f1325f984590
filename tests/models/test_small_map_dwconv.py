"""The small-map depthwise path (a training-speed fix for 1x1 / 2x2 maps) must be the same function as the conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import repvit.models.repvit as rv
from repvit.models import build_model


@pytest.mark.parametrize("h,w,k,stride", [(1, 1, 3, 1), (2, 2, 3, 1), (2, 2, 3, 2), (1, 2, 3, 1),
                                          (3, 3, 3, 2), (4, 4, 3, 2), (2, 2, 5, 1), (2, 2, 1, 1)])
def test_matches_conv2d_values_and_gradients(h, w, k, stride):
    g = torch.Generator().manual_seed(h * 100 + w * 10 + k + stride)
    x = torch.randn(3, 5, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(5, 1, k, k, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    ref = F.conv2d(x, weight, bias, stride, k // 2, groups=5)
    out = rv.small_map_depthwise_conv(x, weight, bias, stride, k // 2)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(out, (x, weight, bias), grad_out),
                    torch.autograd.grad(ref, (x, weight, bias), grad_out)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _spy(monkeypatch) -> list:
    calls = []
    real = rv.small_map_depthwise_conv

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)
    monkeypatch.setattr(rv, "small_map_depthwise_conv", spy)
    return calls


def test_used_only_when_a_backward_can_follow_on_tiny_maps(monkeypatch):
    calls = _spy(monkeypatch)
    monkeypatch.setattr(rv, "SMALL_MAP_PIXELS", 4)      # the AVX2 default (AVX-512 hosts use 1)
    conv = rv.DepthwiseConv2d(8, 8, 3, 1, 1, groups=8, bias=False)
    conv(torch.randn(2, 8, 2, 2))                       # weights require grad -> small-map path
    assert len(calls) == 1
    conv(torch.randn(2, 8, 4, 4))                       # 16 pixels > SMALL_MAP_PIXELS -> plain conv
    with torch.no_grad():
        conv(torch.randn(2, 8, 2, 2))                   # inference -> plain conv
    conv(torch.randn(2, 8, 2, 2, device="meta"))       # not a CPU tensor -> plain conv
    torch.jit.trace(conv.eval().requires_grad_(False), torch.randn(1, 8, 2, 2))   # tracing -> plain conv
    assert len(calls) == 1


def test_model_training_step_matches_plain_conv(monkeypatch):
    """A whole RepViT step at 32x32 (stages 3-4 on 2x2 / 1x1) gives the same loss and gradients either way."""
    torch.manual_seed(0)
    model = build_model("repvit_m0_6", num_classes=10, in_chans=1).double()
    x, y = torch.randn(4, 1, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    calls = _spy(monkeypatch)

    def grads(pixels: int):
        monkeypatch.setattr(rv, "SMALL_MAP_PIXELS", pixels)
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_plain, g_plain = grads(0)
    assert not calls
    loss_small, g_small = grads(4)
    assert calls, "the 2x2 / 1x1 stages should have taken the small-map path"
    torch.testing.assert_close(loss_small, loss_plain, rtol=0, atol=1e-12)
    for a, b in zip(g_small, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_state_dict_keys_and_deploy_form_unchanged():
    model = build_model("repvit_m0_6")
    assert any(isinstance(m, rv.DepthwiseConv2d) for m in model.modules())
    fused = build_model("repvit_m0_6", deploy=True)
    assert not any(isinstance(m, rv.DepthwiseConv2d) for m in fused.modules())
    assert all(not k.endswith(("weight_orig", "idx")) for k in model.state_dict())


@pytest.mark.parametrize("capability,env,expected", [("AVX2", "", 4), ("DEFAULT", "", 4), ("AVX512", "", 1),
                                                     ("AVX512", "4", 4), ("AVX2", "0", 0)])
def test_threshold_follows_the_dispatched_kernels_unless_overridden(monkeypatch, capability, env, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setenv("REPVIT_SMALL_MAP_PIXELS", env)
    assert rv._default_small_map_pixels() == expected


def test_bad_threshold_override_is_an_error(monkeypatch):
    monkeypatch.setenv("REPVIT_SMALL_MAP_PIXELS", "two")
    with pytest.raises(ValueError, match="REPVIT_SMALL_MAP_PIXELS must be a non-negative integer"):
        rv._default_small_map_pixels()
