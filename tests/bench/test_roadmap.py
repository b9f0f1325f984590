"""Roadmap models: every step builds, runs and fuses; the last step is RepViT-M0.9 exactly."""

from dataclasses import fields, replace

import pytest
import torch

from repvit import reparameterize
from repvit.models import build_model
from repvit.models.roadmap import ROADMAP_STEPS, RoadmapConfig, build_roadmap_model, roadmap_configs
from repvit.utils.complexity import count_macs, count_params
from tests.conftest import assert_input_dependent, randomize_bn


def test_last_step_is_repvit_m0_9_params_and_macs():
    ours = build_roadmap_model(len(ROADMAP_STEPS) - 1).eval()
    ref = build_model("repvit_m0_9").eval()
    assert count_params(ours) == count_params(ref)
    f_ours, f_ref = reparameterize(ours), reparameterize(ref)
    assert count_params(f_ours) == count_params(f_ref)
    assert count_macs(f_ours) == count_macs(f_ref)


def test_last_step_loads_m0_9_weights_and_matches_outputs():
    ours = build_roadmap_model(len(ROADMAP_STEPS) - 1).eval()
    # random BatchNorm affine parameters (statistics measured on random images): at init each channel mixer's
    # (FFN) last BatchNorm has weight 0, so every FFN branch would output 0 and a wrongly wired FFN could not show
    ref = randomize_bn(build_model("repvit_m0_9"), seed=7, calibrate=64).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical module tree and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours(x), want)
    assert_input_dependent(want[0], want[1])     # the two images get clearly different logits


@pytest.mark.parametrize("step", range(len(ROADMAP_STEPS)))
def test_every_step_builds_runs_and_fuses(step):
    torch.manual_seed(step)
    m = build_roadmap_model(step, num_classes=10).eval()
    randomize_bn(m, seed=step)  # non-trivial BN statistics so fusing is actually exercised
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        yf = reparameterize(m)(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    torch.testing.assert_close(yf, y, rtol=1e-4, atol=1e-4)


def test_step0_is_timm_mobilenetv3_large_layout():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("mobilenetv3_large_100", pretrained=False)
    assert count_params(build_roadmap_model(0)) == count_params(ref)


def test_steps_are_incremental_config_changes():
    cfgs = [c for _, c in roadmap_configs()]
    assert cfgs[0] == RoadmapConfig()
    for prev, cur in zip(cfgs, cfgs[1:]):
        changed = [f.name for f in fields(RoadmapConfig) if getattr(prev, f.name) != getattr(cur, f.name)]
        assert 1 <= len(changed) <= 2, changed
    # the walk ends where the paper does
    last = cfgs[-1]
    assert (last.block, last.expansion, last.stem, last.downsample, last.head, last.se) == (
        "repvit", 2.0, "early_conv", "deep", "simple", "cross_block")
    assert last.widths == (48, 96, 192, 384) and last.depths == (2, 2, 14, 2) and last.kernel_sizes == (3, 3, 3, 3)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="block"):
        build_roadmap_model(replace(RoadmapConfig(), block="transformer"))
    with pytest.raises(ValueError, match="expansion"):
        build_roadmap_model(replace(RoadmapConfig(), widths=(24, 40, 80, 160), depths=(2, 2, 14, 2)))
    with pytest.raises(ValueError, match="deep downsampling"):
        build_roadmap_model(replace(RoadmapConfig(), downsample="deep"))
    with pytest.raises(ValueError, match="out of range"):
        build_roadmap_model(10)
