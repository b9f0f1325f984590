"""timm-style model API: forward_intermediates / prune_intermediate_layers against timm's RepViT (an independent
implementation, same weights), and the classifier contract (distillation setting, num_classes, in_chans)."""

import inspect

import pytest
import torch

import repvit
from repvit.models import build_model
from repvit.weights import CheckpointMismatchError, layouts
from tests.conftest import randomize_bn

timm = pytest.importorskip("timm")
NAME = "repvit_m0_9"  # the smallest variant timm has (repvit_m0_6 is ours only)
X = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def pair():
    """(ours, timm) with identical random weights and BN statistics, eval mode."""
    torch.manual_seed(0)
    t = randomize_bn(timm.create_model(NAME, num_classes=8)).eval()
    ours = repvit.create_model(NAME, num_classes=8, distillation=True).eval()
    ours.load_state_dict(layouts.timm_to_ours(t.state_dict()), strict=True)
    return ours, t


def _fresh_pair():
    t = randomize_bn(timm.create_model(NAME, num_classes=8)).eval()
    ours = repvit.create_model(NAME, num_classes=8, distillation=True).eval()
    ours.load_state_dict(layouts.timm_to_ours(t.state_dict()), strict=True)
    return ours, t


def _same(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        return
    assert type(a) is type(b) and len(a) == len(b)
    for u, v in zip(a, b):
        _same(u, v)


# ----------------------------------------------------------------------------- forward_intermediates


def test_forward_intermediates_signature_matches_timm():
    from timm.models.repvit import RepVit
    ours = inspect.signature(repvit.models.RepViT.forward_intermediates).parameters
    ref = inspect.signature(RepVit.forward_intermediates).parameters
    assert [(p.name, p.default, p.kind) for p in ours.values()] == [(p.name, p.default, p.kind) for p in ref.values()]
    ours = inspect.signature(repvit.models.RepViT.prune_intermediate_layers).parameters
    ref = inspect.signature(RepVit.prune_intermediate_layers).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in ref.values()]


@pytest.mark.parametrize("args", [
    (),
    (None, False, False, "NCHW", False),          # all positional, timm's order
    ([0, 2], False, True, "NCHW", False),          # stop early after stage 2: final features = stage 2
    ([1, 3], True, False, "NCHW", True),           # norm=True is accepted (no-op in both)
    (2, False, True),                              # last 2 stages
    ([-1, -3],),                                   # negative indices
    (1, False, False, "NCHW", True),
])
def test_forward_intermediates_match_timm(pair, args):
    ours, t = pair
    x = torch.randn(*X)
    with torch.no_grad():
        _same(ours.forward_intermediates(x, *args), t.forward_intermediates(x, *args))


@pytest.mark.parametrize("kw", [dict(indices=[0, 3], stop_early=True), dict(indices=3, intermediates_only=True),
                                dict(indices=[1], norm=True, stop_early=True)])
def test_forward_intermediates_keywords_match_timm(pair, kw):
    ours, t = pair
    x = torch.randn(*X)
    with torch.no_grad():
        _same(ours.forward_intermediates(x, **kw), t.forward_intermediates(x, **kw))


def test_forward_intermediates_nhwc(pair):
    ours, t = pair
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, feats = ours.forward_intermediates(x, [1, 2], output_fmt="NHWC")
        ref_final, ref_feats = t.forward_intermediates(x, [1, 2])  # timm's RepViT supports NCHW only
    _same(final, ref_final)  # final features stay NCHW (ready for forward_head)
    assert [f.shape for f in feats] == [(1, 8, 12, ours.feature_info[1]["num_chs"]),
                                        (1, 4, 6, ours.feature_info[2]["num_chs"])]
    _same(feats, [f.permute(0, 2, 3, 1) for f in ref_feats])


def test_forward_intermediates_rejects_unknown_format(pair):
    with pytest.raises(ValueError, match="output_fmt"):
        pair[0].forward_intermediates(torch.randn(*X), output_fmt="NLC")


# ----------------------------------------------------------------------------- prune_intermediate_layers


@pytest.mark.parametrize("indices, prune_head", [([0, 1], True), (2, False), ([1], False), (1, True)])
def test_prune_intermediate_layers_matches_timm(indices, prune_head):
    ours, t = _fresh_pair()
    x = torch.randn(*X)
    assert ours.prune_intermediate_layers(indices, prune_head=prune_head) == \
        t.prune_intermediate_layers(indices, prune_head=prune_head)
    assert len(ours.stages) == len(t.stages) and ours.num_features == t.num_features
    assert ours.num_classes == t.num_classes
    with torch.no_grad():
        _same(ours.forward_features(x), t.forward_features(x))
        _same(ours.forward_intermediates(x, indices), t.forward_intermediates(x, indices))
        if t.num_classes:  # head kept: same logits
            _same(ours(x), t(x))
        else:  # no head: timm also drops the pooling (global_pool=''); ours keeps it, so compare pooled
            assert ours(x).shape == (1, ours.num_features)
            _same(ours(x), t(x).mean((2, 3)))
    # a new head fits the pruned features
    ours.reset_classifier(5)
    assert ours(x).shape == (1, 5)


# ----------------------------------------------------------------------------- classifier contract


def _timm_keys(model):
    return set(layouts.ours_to_timm(model.state_dict()))


def test_distillation_survives_reset_to_zero_classes():
    m = repvit.create_model(NAME, num_classes=8, distillation=True).eval()
    m.reset_classifier(0)
    assert m.num_classes == 0 and m(torch.randn(*X)).shape == (1, m.num_features)
    m.reset_classifier(10)
    assert m.distillation and m.head.head_dist is not None
    # same two-head layout as timm's model with distillation=True, 10 classes
    assert _timm_keys(m) == set(timm.create_model(NAME, num_classes=10, distillation=True).state_dict())
    m.reset_classifier(10, distillation=False)  # an explicit setting changes what is remembered
    m.reset_classifier(0)
    m.reset_classifier(4)
    assert not m.distillation
    assert _timm_keys(m) == set(timm.create_model(NAME, num_classes=4, distillation=False).state_dict())


def test_zero_classes_with_distillation_keeps_the_setting():
    m = build_model("repvit_m0_6", num_classes=0, distillation=True).eval()
    assert m.num_classes == 0 and not m.distillation  # no classifier, so no distillation head yet
    m.reset_classifier(3)
    assert m.distillation and m(torch.randn(*X)).shape == (1, 3)


def test_checkpoint_with_zero_classes_keeps_distillation(tmp_path):
    src = repvit.create_model("repvit_m0_6", num_classes=6, distillation=True)
    repvit.save_checkpoint(src, tmp_path / "m.safetensors")
    m = repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "m.safetensors", num_classes=0)
    m.reset_classifier(3)
    assert m.distillation


def test_distillation_on_deploy_form_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="train form"):
        build_model("repvit_m0_6", deploy=True, distillation=True)
    with pytest.raises(ValueError, match="train form"):
        repvit.create_model("repvit_m0_6", deploy=True, distillation=True)
    fused = repvit.reparameterize(repvit.create_model("repvit_m0_6", num_classes=4, distillation=True))
    with pytest.raises(ValueError, match="train form"):
        fused.reset_classifier(5, distillation=True)
    assert fused.num_classes == 4  # unchanged by the refused call
    fused.reset_classifier(5)  # the deploy form gets its one Linear head
    assert fused(torch.randn(*X)).shape == (1, 5) and not fused.distillation
    repvit.save_checkpoint(fused, tmp_path / "fused.safetensors")
    with pytest.raises(CheckpointMismatchError, match="distillation=True"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "fused.safetensors", distillation=True)
    # a train-form file fused on load keeps working: the two heads fold into one
    repvit.save_checkpoint(repvit.create_model("repvit_m0_6", num_classes=4, distillation=True),
                           tmp_path / "train.safetensors")
    m = repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "train.safetensors", deploy=True, distillation=True)
    assert m.deploy


@pytest.mark.parametrize("bad", [-1, -10])
def test_negative_num_classes_is_an_error(tmp_path, bad):
    m = repvit.create_model("repvit_m0_6", num_classes=4).eval()
    with pytest.raises(ValueError, match="num_classes"):
        m.reset_classifier(bad)
    assert m.num_classes == 4 and m(torch.randn(*X)).shape == (1, 4)
    with pytest.raises(ValueError, match="num_classes"):
        repvit.create_model("repvit_m0_6", num_classes=bad)
    repvit.save_checkpoint(m, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="num_classes"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "m.safetensors", num_classes=bad)
    with pytest.raises(ValueError, match="num_classes"):
        repvit.reparameterize(m).reset_classifier(bad)


def test_in_chans_zero_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="in_chans"):
        repvit.create_model("repvit_m0_6", in_chans=0)
    repvit.save_checkpoint(repvit.create_model("repvit_m0_6", num_classes=2), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="in_chans"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "m.safetensors", in_chans=0)
    # None still means the default / the file's value
    assert repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "m.safetensors", in_chans=None).in_chans == 3
