"""Every variant: shapes, gradients, exact counts, API surface, input checks."""

import pytest
import torch

import repvit
from repvit.models import FACTS, SPECS
from repvit.models.specs import PAPER_TABLE
from repvit.utils.complexity import count_macs, count_params

ALL = repvit.list_models()


def test_registry_lists_every_variant():
    assert set(ALL) == {"repvit_m0_6", "repvit_m0_9", "repvit_m1_0", "repvit_m1_1", "repvit_m1_5", "repvit_m2_3",
                        "repvit_m1", "repvit_m2", "repvit_m3"}


@pytest.mark.parametrize("name", ALL)
def test_param_counts_match_reference(name):
    f = FACTS[name]
    assert count_params(repvit.create_model(name)) == f.train_params_single_head
    assert count_params(repvit.create_model(name, distillation=True)) == f.train_params_dist_head
    assert count_params(repvit.create_model(name, deploy=True)) == f.fused_params
    assert count_params(repvit.reparameterize(repvit.create_model(name, distillation=True))) == f.fused_params


@pytest.mark.parametrize("name", [n for n in ALL if FACTS[n].fused_macs is not None])
def test_macs_match_reference_and_paper(name):
    macs = count_macs(repvit.create_model(name, deploy=True))
    assert macs == FACTS[name].fused_macs
    if name in PAPER_TABLE:
        params_m, gmacs = PAPER_TABLE[name]
        assert round(FACTS[name].fused_params / 1e6, 1) == params_m
        assert round(macs / 1e9, 1) == gmacs


def test_mac_counter_agrees_with_fvcore():
    fvcore = pytest.importorskip("fvcore.nn")
    m = repvit.create_model("repvit_m0_6", deploy=True).eval()
    x = torch.zeros(1, 3, 224, 224)
    ours = count_macs(m)
    # fvcore does not count our SE/head `mean`; the official head pools with adaptive_avg_pool2d,
    # which fvcore counts as one MAC per input element: add that term for comparison
    theirs = fvcore.FlopCountAnalysis(m, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
    assert ours == theirs + 320 * 7 * 7


@pytest.mark.parametrize("name", ALL)
def test_forward_shapes_and_backward_reaches_every_parameter(name):
    m = repvit.create_model(name, num_classes=7, distillation=True)
    x = torch.randn(2, 3, 64, 96)
    out = m(x)
    assert out.shape == (2, 7)
    # (a plain sum would be blind: the head's train-mode BatchNorm1d output sums to 0 over the batch)
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 5])).backward()
    # the projection BN of every FFN starts at 0, so the first conv of each FFN gets no
    # gradient at step 0 by design; everything must at least have a gradient tensor
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    nonzero = [n for n, p in m.named_parameters() if p.grad.abs().sum() > 0]
    assert len(nonzero) > 0.5 * len(list(m.parameters()))


def test_every_parameter_learns_once_ffn_is_open():
    m = repvit.create_model("repvit_m0_6", num_classes=5, distillation=True)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(1.0)
    torch.nn.functional.cross_entropy(m(torch.randn(2, 3, 64, 64)), torch.tensor([0, 3])).backward()
    zero = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not zero, zero


@pytest.mark.parametrize("size", [(224, 224), (97, 131), (33, 50), (512, 384)])
def test_odd_input_sizes_and_feature_info(size):
    m = repvit.create_model("repvit_m0_6").eval()
    x = torch.randn(1, 3, *size)
    final, feats = m.forward_intermediates(x)
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in m.feature_info] == list(SPECS["repvit_m0_6"].widths)
    for f, info in zip(feats, m.feature_info):
        expect = [-(-s // info["reduction"]) for s in size]  # ceil division: every conv pads
        assert list(f.shape[2:]) == expect
    assert torch.equal(final, feats[-1])
    assert m(x).shape == (1, 1000)


def test_features_only_and_out_indices():
    m = repvit.create_model("repvit_m0_9", features_only=True, out_indices=(1, 3))
    outs = m(torch.randn(1, 3, 128, 128))
    assert [o.shape[1] for o in outs] == [96, 384]
    assert [i["reduction"] for i in m.feature_info] == [8, 32]
    early = repvit.create_model("repvit_m0_9").forward_intermediates(
        torch.randn(1, 3, 64, 64), indices=2, intermediates_only=True)
    assert [o.shape[1] for o in early] == [192, 384]


def test_forward_head_pre_logits_and_reset_classifier():
    m = repvit.create_model("repvit_m0_6", distillation=True).eval()
    f = m.forward_features(torch.randn(2, 3, 64, 64))
    assert m.forward_head(f, pre_logits=True).shape == (2, 320)
    m.reset_classifier(10)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 10) and m.distillation
    m.reset_classifier(0)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 320)


def test_distillation_output_contract():
    m = repvit.create_model("repvit_m0_6", distillation=True, num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    # default: one tensor in both modes
    assert isinstance(m.train()(x), torch.Tensor)
    m.eval()
    avg = m(x)
    assert isinstance(avg, torch.Tensor)
    m.set_distilled_training(True)
    cls, dist = m.train()(x)
    assert cls.shape == dist.shape == (2, 4)
    m.eval()
    out = m(x)
    assert isinstance(out, torch.Tensor)  # eval always returns one tensor
    torch.testing.assert_close(out, (m.head.head(m.forward_head(m.forward_features(x), pre_logits=True))
                                     + m.head.head_dist(m.forward_head(m.forward_features(x), pre_logits=True))) / 2)
    with pytest.raises(ValueError, match="distillation=True"):
        repvit.create_model("repvit_m0_6").set_distilled_training(True)


def test_drop_path_and_dropout_active_only_in_training():
    m = repvit.create_model("repvit_m0_6", drop_path_rate=0.5, drop_rate=0.3, num_classes=3)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(1.0)
    x = torch.randn(4, 3, 64, 64)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)
    m.eval()
    assert torch.equal(m(x), m(x))


def test_gradient_checkpointing_gives_same_gradients_and_norm_statistics():
    torch.manual_seed(0)
    m = repvit.create_model("repvit_m0_6", num_classes=3, drop_path_rate=0.1)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([0, 2])
    torch.manual_seed(1)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    ref_stats = {k: v.clone() for k, v in m.state_dict().items() if "running_" in k or "num_batches" in k}
    m.load_state_dict(start)
    m.zero_grad()
    m.set_grad_checkpointing(True)
    torch.manual_seed(1)  # same drop-path draws; checkpoint replays them in the recompute
    torch.nn.functional.cross_entropy(m(x), y).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)
    # the recompute in the backward pass must not fold the batch into the running statistics a second time
    state = m.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in ref_stats.items())  # the step did move them
    for k, v in ref_stats.items():
        torch.testing.assert_close(state[k], v, msg=k)


def test_gradient_checkpointing_under_torch_compile_moves_norm_statistics_once():
    """Under torch.compile the checkpointed blocks take plain checkpointing (AOTAutograd's recompute replays no
    buffer writes, and it refuses non-dispatch-mode contexts): same statistics as eager without checkpointing."""
    from repvit.models.repvit import RepViTStage
    torch.manual_seed(0)
    stage = RepViTStage(16, 16, 2, downsample=False, legacy=False, drop_paths=[0.0, 0.0], deploy=False).train()
    start = {k: v.clone() for k, v in stage.state_dict().items()}
    x = torch.randn(4, 16, 8, 8)
    stage(x).sum().backward()
    ref = {k: v.clone() for k, v in stage.state_dict().items()}
    stage.load_state_dict(start)
    stage.grad_checkpointing = True
    torch.compile(stage, backend="aot_eager")(x).sum().backward()
    got = stage.state_dict()
    assert any(not torch.equal(ref[k], start[k]) for k in ref if "running_mean" in k)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=k)


def test_in_chans_option():
    m = repvit.create_model("repvit_m0_6", in_chans=1, num_classes=10)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(3, 64, 64), "4-D NCHW"),
    (torch.randn(1, 1, 64, 64), "3 channels"),
    (torch.randn(1, 64, 64, 3), "NHWC"),
])
def test_bad_input_gets_clear_error(bad, match):
    m = repvit.create_model("repvit_m0_6")
    with pytest.raises(ValueError, match=match):
        m(bad)
    with pytest.raises(ValueError, match=match):
        repvit.reparameterize(m)(bad)


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="unknown RepViT variant.*repvit_m0_9"):
        repvit.create_model("repvit_m0_99")
    with pytest.raises(ValueError, match="Did you mean"):
        repvit.create_model("repvit_m09")
