"""Fusion is exact: fused == unfused for every variant, no BN left, idempotent, dtype/device kept.

Parity checks use BatchNorm statistics measured on random images (``randomize_bn(calibrate=...)``) and assert
that the reference outputs depend on the input: a net collapsed to input-independent outputs would make
fused == unfused nearly trivially true."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repvit
from repvit.reparam import ReparameterizationError, leftover_train_modules
from tests.conftest import assert_input_dependent, randomize_bn

ALL = repvit.list_models()


def assert_float32_parity(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fused == unfused up to float32 rounding: with measured (realistic) BatchNorm statistics the rounding of ~50
    layers reaches 4e-5 relative (repvit_m2_3; 5e-4 absolute on logits up to 12), while a fusion error is of order
    1e-2 or more. Exactness itself is checked in float64 below."""
    scale = max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() <= 1e-3 * scale, ((out - ref).abs().max().item(), scale)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 3e-4, rel


@pytest.mark.parametrize("name", ALL)
def test_fused_equals_unfused_float32(name):
    m = randomize_bn(repvit.create_model(name, distillation=True, num_classes=11), calibrate=64).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = m(x)
        fused = repvit.reparameterize(m)
        out = fused(x)
    assert_input_dependent(ref[0], ref[1])
    assert not any(isinstance(mod, _BatchNorm) for mod in fused.modules())
    assert leftover_train_modules(fused) == []
    assert_float32_parity(out, ref)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
def test_fused_equals_unfused_exactly_in_float64(name):
    m = randomize_bn(repvit.create_model(name, distillation=True, num_classes=11), calibrate=48).double().eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        fused = repvit.reparameterize(m)
        out = fused(x)
    assert_input_dependent(ref[0], ref[1])
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-9, rel


def test_reparameterize_leaves_input_unchanged_and_is_idempotent():
    m = randomize_bn(repvit.create_model("repvit_m0_6", distillation=True)).eval()
    before = copy.deepcopy(m.state_dict())
    fused = repvit.reparameterize(m)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(mod, _BatchNorm) for mod in m.modules())
    again = repvit.reparameterize(fused)
    assert again is not fused
    a, b = fused.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fused.deploy and not m.deploy


def test_deploy_form_constructed_directly_loads_fused_weights_strictly():
    m = randomize_bn(repvit.create_model("repvit_m1_1", distillation=True), calibrate=64).eval()
    fused = repvit.reparameterize(m)
    direct = repvit.create_model("repvit_m1_1", deploy=True)
    direct.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        assert_float32_parity(direct.eval()(x), ref)
    assert_input_dependent(ref[0], ref[1])
    assert [type(a) for a in direct.modules()] == [type(b) for b in fused.modules()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtype_preserved(dtype):
    m = randomize_bn(repvit.create_model("repvit_m0_6", num_classes=5)).eval()
    fused = repvit.reparameterize(m.to(dtype))
    assert {p.dtype for p in fused.parameters()} == {dtype}


def test_features_only_backbone_fuses():
    m = randomize_bn(repvit.create_model("repvit_m0_9", features_only=True), calibrate=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        out = repvit.reparameterize(m)(x)
    assert len(out) == len(ref) == 4
    for a, b in zip(out, ref):
        assert_float32_parity(a, b)
        assert_input_dependent(b[0], b[1])


def test_unfusable_batchnorm_raises_instead_of_being_dropped():
    m = repvit.create_model("repvit_m0_6", num_classes=3)
    # a user-added BatchNorm that no fuse() covers: the official helper would swap it for
    # Identity and silently change outputs; we must refuse
    m.stages[1].blocks[0].se = nn.Sequential(nn.BatchNorm2d(80))
    with pytest.raises(ReparameterizationError, match=r"stages\.1\.blocks\.0\.se\.0 \(BatchNorm2d\)"):
        repvit.reparameterize(m)


def test_fusion_uses_running_stats_not_batch_stats():
    m = randomize_bn(repvit.create_model("repvit_m0_6", num_classes=3), calibrate=64)
    m.train()  # reparameterize must still produce the eval-mode function
    x = torch.randn(2, 3, 64, 64)
    fused = repvit.reparameterize(m)
    with torch.no_grad():
        ref = m.eval()(x)
        assert_float32_parity(fused(x), ref)
    assert_input_dependent(ref[0], ref[1])


@pytest.mark.parametrize("name", ALL)
def test_fused_model_exports(name):
    fused = repvit.reparameterize(randomize_bn(repvit.create_model(name, num_classes=10)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = fused(x)
        scripted = torch.jit.script(fused)
        torch.testing.assert_close(scripted(x), ref)
    if name in ("repvit_m0_9", "repvit_m1"):  # torch.export is slower: two representative variants
        prog = torch.export.export(fused, (x,))
        with torch.no_grad():
            torch.testing.assert_close(prog.module()(x), ref)


def _sync_bn_model() -> nn.Module:
    m = randomize_bn(repvit.create_model("repvit_m0_6", distillation=True, num_classes=7), seed=3, calibrate=48)
    m = m.double()
    return nn.SyncBatchNorm.convert_sync_batchnorm(m).eval()


def test_syncbatchnorm_model_fuses_exactly():
    """After convert_sync_batchnorm (DDP training) every norm is a SyncBatchNorm, which is not a BatchNorm2d
    subclass: fusion must fold them all (the token mixer's outer norm included), not skip any."""
    s = _sync_bn_model()
    assert isinstance(s.stages[0].blocks[0].token_mixer.bn, nn.SyncBatchNorm)
    assert isinstance(s.head.head.bn, nn.SyncBatchNorm)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        ref = s(x)  # SyncBatchNorm in eval mode runs on CPU without a process group
        fused = repvit.reparameterize(s)
        out = fused(x)
    assert_input_dependent(ref[0], ref[1])
    assert not any(isinstance(mod, _BatchNorm) for mod in fused.modules())
    assert repvit.reparam.is_deploy_form(fused)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-9, rel


def test_leftover_syncbatchnorm_is_reported():
    m = repvit.create_model("repvit_m0_6", num_classes=3)
    m.stages[1].blocks[0].se = nn.Sequential(nn.SyncBatchNorm(80))
    with pytest.raises(ReparameterizationError, match=r"stages\.1\.blocks\.0\.se\.0 \(SyncBatchNorm\)"):
        repvit.reparameterize(m)


@pytest.mark.parametrize("where", ["token_mixer.bn", "token_mixer.conv.bn", "channel_mixer.conv1.bn"])
def test_unexpected_norm_type_raises_instead_of_being_skipped(where):
    m = repvit.create_model("repvit_m0_6", num_classes=3)
    block = m.stages[0].blocks[0]
    parent, attr = block.get_submodule(where.rsplit(".", 1)[0]), where.rsplit(".", 1)[1]
    width = getattr(parent, attr).num_features
    setattr(parent, attr, nn.GroupNorm(1, width))
    owner = "token_mixer" if where.startswith("token_mixer") else where.rsplit(".", 1)[0]
    with pytest.raises(ReparameterizationError, match=rf"stages\.0\.blocks\.0\.{owner} .*cannot fold GroupNorm"):
        repvit.reparameterize(m)


@pytest.mark.parametrize("name", ["repvit_m0_6", "repvit_m1"])  # current and legacy token mixer
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fusion_rounds_once(name, dtype):
    """bf16/fp16 fused weights are the float64 fold of the same weights rounded once, not a sum of
    already-rounded partial folds."""
    m = randomize_bn(repvit.create_model(name, distillation=True, num_classes=5), seed=4).to(dtype)
    fused = repvit.reparameterize(m).state_dict()
    exact = repvit.reparameterize(copy.deepcopy(m).double()).state_dict()  # low-precision values are exact in f64
    assert fused.keys() == exact.keys()
    bad = [k for k in fused if not torch.equal(fused[k], exact[k].to(dtype))]
    assert not bad, bad[:5]


def test_train_form_model_scripts():
    model = repvit.create_model("repvit_m0_6", num_classes=4).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
