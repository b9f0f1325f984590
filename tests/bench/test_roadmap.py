"""Roadmap models: every step builds, runs and fuses; the last step is RepViT-M0.9 exactly."""

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from repvit import reparameterize
from repvit.models import build_model
from repvit.models.repvit import FFN, ClassifierHead, Stem
from repvit.models.roadmap import (ROADMAP_STEPS, DeepDownsample, MBV3Head, RoadmapConfig, build_roadmap_model,
                                   roadmap_configs)
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
    # non-trivial BN affine parameters and statistics measured on images, so fusing is exercised and the outputs
    # depend on the input (with arbitrary statistics a deep random net's outputs barely do)
    randomize_bn(m, seed=step, calibrate=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        yf = reparameterize(m)(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert_input_dependent(y[0], y[1])
    torch.testing.assert_close(yf, y, rtol=1e-4, atol=1e-4)


def test_step0_is_timm_mobilenetv3_large_layout():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("mobilenetv3_large_100", pretrained=False)
    ours = build_roadmap_model(0)
    assert count_params(ours) == count_params(ref)
    # the same layers, not just the same total: every parameter tensor's shape, as a multiset
    shapes = lambda m: sorted(tuple(p.shape) for p in m.parameters())       # noqa: E731
    assert shapes(ours) == shapes(ref)


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


# the reference sheet on the development machine; the numbers above were copied from it
REF = Path("/work/shared/reference/repvit_reference.json")


# (top-1, iPhone 12 ms) per step, copied from the sheet's roadmap_mobilenetv3_to_repvit (paper section 3)
PUBLISHED = [(71.5, 1.01), (68.3, 0.81), (None, 0.65), (73.5, 0.89), (73.9, 0.86), (75.4, 0.96), (74.8, 0.77),
             (76.9, 0.91), (76.9, 0.89), (77.4, 0.87)]


def test_published_numbers_are_the_reference_sheets():
    assert [(top1, lat) for _, _, top1, lat in ROADMAP_STEPS] == PUBLISHED
    if REF.exists():   # the copy has not drifted from the sheet (no skip without it: the copy is the reference)
        ref = json.loads(REF.read_text())["roadmap_mobilenetv3_to_repvit"]
        assert [(r["top1"], r["latency_ms"]) for r in ref] == PUBLISHED


# what each step changes (the config fields), so a step that changes the wrong thing fails
STEP_CHANGES = {1: {"block"}, 2: {"expansion"}, 3: {"widths"}, 4: {"stem"}, 5: {"downsample", "depths"},
                6: {"head"}, 7: {"depths"}, 8: {"kernel_sizes"}, 9: {"se"}}


def test_each_step_changes_what_the_paper_says_in_the_built_network():
    cfgs = [c for _, c in roadmap_configs()]
    for i, fields_changed in STEP_CHANGES.items():
        changed = {f.name for f in fields(RoadmapConfig) if getattr(cfgs[i - 1], f.name) != getattr(cfgs[i], f.name)}
        assert changed == fields_changed, (i, changed)
    nets = [build_roadmap_model(i) for i in range(len(ROADMAP_STEPS))]
    ffns = lambda m: [f for f in m.modules() if isinstance(f, FFN)]                            # noqa: E731
    assert not ffns(nets[0]) and ffns(nets[1])                                                  # RepViT block
    for m in nets[2:]:                                                                          # expansion 2
        assert all(f.conv1.c.out_channels == 2 * f.conv1.c.in_channels for f in ffns(m))
    assert any(f.conv1.c.out_channels != 2 * f.conv1.c.in_channels for f in ffns(nets[1]))
    widths = lambda m: [st.blocks[-1].channel_mixer.conv2.c.out_channels if hasattr(st.blocks[-1], "channel_mixer")
                        else None for st in m.stages]                                           # noqa: E731
    assert widths(nets[3])[0] == 48 and widths(nets[2])[0] != 48                                # widths
    assert not isinstance(nets[3].stem, Stem) and isinstance(nets[4].stem, Stem)               # early-conv stem
    assert (nets[4].stem.conv1.c.out_channels, nets[4].stem.conv2.c.out_channels) == (24, 48)
    for i, m in enumerate(nets):                                                                # deep downsampling
        deep = [isinstance(st.downsample, DeepDownsample) for st in m.stages[1:]]
        assert deep == ([True] * 3 if i >= 5 else [False] * 3), i
    assert all(isinstance(m.head, MBV3Head) for m in nets[:6])                                   # simple classifier
    assert all(isinstance(m.head, ClassifierHead) for m in nets[6:])
    depths = lambda m: [len(st.blocks) for st in m.stages]                                      # noqa: E731
    assert depths(nets[7]) == [2, 2, 14, 2] and depths(nets[6]) != [2, 2, 14, 2]                # stage ratio
    k = lambda m: {c.kernel_size for c in reparameterize(m).modules()                           # noqa: E731
                   if isinstance(c, torch.nn.Conv2d) and c.groups > 1}      # fused: no 1x1 training branches
    assert k(nets[7]) == {(3, 3), (5, 5)} and k(nets[8]) == {(3, 3)}                            # 3x3 only
    se = lambda m: [[any(type(x).__name__ == "SqueezeExcite" for x in b.modules()) for b in st.blocks]  # noqa: E731
                    for st in m.stages]
    assert se(nets[9]) == [[j % 2 == 0 for j in range(n)] for n in (2, 2, 14, 2)]              # cross-block SE
    assert se(nets[8]) != se(nets[9])


def test_mobilenetv3_head_macs_pool_the_960_wide_conv():
    """fvcore counts the global pool as its input's size; MobileNetV3's head pools its 960-channel conv (timm's
    mobilenetv3_large_100 without BatchNorm: 216,636,800 MACs by fvcore at 224), not the last stage's 160."""
    from repvit.models.roadmap import MBV3_HEAD_CONV
    step0 = reparameterize(build_roadmap_model(0).eval())
    convs_and_linear = count_macs(step0) - MBV3_HEAD_CONV * 7 * 7
    step0.pool_input_module = lambda: step0.stages[-1]          # the old count: pool over the last stage
    assert count_macs(step0) == convs_and_linear + 160 * 7 * 7
    assert convs_and_linear + MBV3_HEAD_CONV * 7 * 7 == 216_636_800
