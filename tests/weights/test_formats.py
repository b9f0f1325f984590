"""Checkpoint formats: timm parity, official layouts, round trips, EMA choice, fine-tuning."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

import repvit
from repvit.weights import layouts
from repvit.weights.io import read_checkpoint
from tests.conftest import assert_input_dependent, randomize_bn

timm = pytest.importorskip("timm")
TIMM_VARIANTS = [n for n in repvit.list_models() if n in timm.list_models("repvit*")]


def _save_st(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_timm_has_the_variants_we_expect():
    assert set(TIMM_VARIANTS) == set(repvit.list_models()) - {"repvit_m0_6"}


@pytest.mark.parametrize("name", TIMM_VARIANTS)
def test_timm_weights_give_identical_outputs(name, tmp_path):
    """Independent implementation parity: timm's model with random weights and BN stats,
    loaded through our converter, produces the same logits, unfused and fused."""
    t = randomize_bn(timm.create_model(name, num_classes=20)).eval()
    _save_st(t.state_dict(), tmp_path / "model.safetensors")
    ours = repvit.create_model(name, checkpoint=tmp_path / "model.safetensors").eval()
    assert ours.distillation == t.head.distillation and ours.num_classes == 20
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = t(x)
        torch.testing.assert_close(ours(x), ref, rtol=0, atol=0)
        t.fuse()  # timm's own fusion, then load its fused state dict into our deploy form
        torch.save(t.state_dict(), tmp_path / "fused.pth")
        ours_fused = repvit.create_model(name, checkpoint=tmp_path / "fused.pth")
        assert ours_fused.deploy
        torch.testing.assert_close(ours_fused(x), t(x), rtol=0, atol=0)
        torch.testing.assert_close(repvit.reparameterize(ours)(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["repvit_m0_9", "repvit_m1", "repvit_m2_3"])
def test_our_weights_load_into_timm(name, tmp_path):
    m = randomize_bn(repvit.create_model(name, distillation=True, num_classes=8)).eval()
    repvit.save_checkpoint(m, tmp_path / "timm.safetensors", format="timm")
    from safetensors.torch import load_file
    t = timm.create_model(name, num_classes=8).eval()
    t.load_state_dict(load_file(str(tmp_path / "timm.safetensors")), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(t(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", repvit.list_models())
@pytest.mark.parametrize("deploy", [False, True])
def test_round_trip_ours_timm_official(name, deploy, tmp_path):
    m = randomize_bn(repvit.create_model(name, distillation=not deploy, num_classes=6))
    if deploy:
        m = repvit.reparameterize(m)
    sd = m.state_dict()
    repvit.save_checkpoint(m, tmp_path / "a.safetensors")
    a = repvit.create_model(name, checkpoint=tmp_path / "a.safetensors")
    repvit.save_checkpoint(a, tmp_path / "b.safetensors", format="timm")
    b = repvit.create_model(name, checkpoint=tmp_path / "b.safetensors")
    repvit.save_checkpoint(b, tmp_path / "c.pth", format="official")
    c = repvit.create_model(name, checkpoint=tmp_path / "c.pth")
    assert _same(c.state_dict(), sd)
    assert c.deploy == deploy
    assert read_checkpoint(tmp_path / "c.pth").source_format == "official"
    assert read_checkpoint(tmp_path / "b.safetensors").source_format == "timm"
    assert read_checkpoint(tmp_path / "a.safetensors").source_format == "repvit"


def _official_keys_for(name, deploy):
    spec = repvit.models.get_spec(name)
    return {a for a, _ in layouts.official_prefix_table(spec.depths, deploy=deploy)}


def test_official_layout_matches_the_published_key_names():
    """Spot-check against key names documented for the THU-MIG release files."""
    m = repvit.create_model("repvit_m1_1", distillation=True)
    off = layouts.ours_to_official(m.state_dict())
    for key in ["features.0.0.c.weight", "features.0.2.bn.running_var",
                "features.1.token_mixer.0.conv.c.weight", "features.1.token_mixer.0.conv1.weight",
                "features.1.token_mixer.0.bn.weight", "features.1.token_mixer.1.fc1.weight",
                "features.1.channel_mixer.m.0.c.weight", "features.1.channel_mixer.m.2.bn.weight",
                "features.4.token_mixer.0.c.weight", "features.4.token_mixer.2.bn.bias",
                "classifier.classifier.bn.weight", "classifier.classifier_dist.l.weight"]:
        assert key in off, key
    # detection out_indices published per variant are the last block of each stage
    last = max(int(k.split(".")[1]) for k in off if k.startswith("features."))
    assert last == 24
    assert not any(k.startswith("features.2.token_mixer.1.") for k in off)  # block 1 of stage 0: no SE
    legacy = layouts.ours_to_official(repvit.create_model("repvit_m2").state_dict())
    assert "features.1.token_mixer.0.conv1.c.weight" in legacy and "features.1.token_mixer.0.bn.weight" not in legacy


def _official_release_file(model, path, ema_model=None):
    """A file shaped like the THU-MIG release: pickle dict with args as an argparse.Namespace."""
    obj = {
        "model": layouts.ours_to_official(model.state_dict()),
        "model_ema": layouts.ours_to_official((ema_model or model).state_dict()),
        "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3}]},
        "lr_scheduler": {"last_epoch": 299}, "epoch": 299, "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="repvit_m0_9", batch_size=256, lr=4e-3, distillation_type="hard"),
    }
    torch.save(obj, path)


def test_official_release_file_loads_safely_and_use_ema_chooses(tmp_path):
    raw = randomize_bn(repvit.create_model("repvit_m0_9", distillation=True), seed=1)
    ema = randomize_bn(repvit.create_model("repvit_m0_9", distillation=True), seed=2)
    _official_release_file(raw, tmp_path / "repvit_m0_9_distill_300e.pth", ema)
    p = tmp_path / "repvit_m0_9_distill_300e.pth"
    default = repvit.create_model("repvit_m0_9", checkpoint=p)
    assert _same(default.state_dict(), raw.state_dict())  # default: raw weights, as the official eval
    with_ema = repvit.create_model("repvit_m0_9", checkpoint=p, use_ema=True)
    assert _same(with_ema.state_dict(), ema.state_dict())
    loaded = repvit.load_checkpoint(repvit.create_model("repvit_m0_9", distillation=True), p, use_ema=True)
    assert _same(loaded.state_dict(), ema.state_dict())


def test_deploy_flag_with_train_checkpoint_fuses(tmp_path):
    # statistics measured on images: the outputs depend on the input, so the parity below means something
    m = randomize_bn(repvit.create_model("repvit_m1_0", distillation=True), calibrate=64).eval()
    _official_release_file(m, tmp_path / "f.pth")
    d = repvit.create_model("repvit_m1_0", checkpoint=tmp_path / "f.pth", deploy=True)
    assert d.deploy
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = m(x)
        assert_input_dependent(want[0], want[1])
        torch.testing.assert_close(d(x), want, rtol=1e-4, atol=1e-4)


def test_finetune_with_new_number_of_classes(tmp_path):
    src = randomize_bn(repvit.create_model("repvit_m0_9", distillation=True))
    repvit.save_checkpoint(src, tmp_path / "in1k.safetensors")
    ft = repvit.create_model("repvit_m0_9", checkpoint=tmp_path / "in1k.safetensors", num_classes=10,
                             distillation=False)
    assert ft.num_classes == 10 and not ft.distillation
    body = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    got = ft.state_dict()
    assert all(torch.equal(got[k], v) for k, v in body.items())
    assert ft.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    # a fused model can get a new head too (linear probe on a deployed backbone)
    fused = repvit.reparameterize(src)
    repvit.save_checkpoint(fused, tmp_path / "deploy.safetensors")
    probe = repvit.create_model("repvit_m0_9", checkpoint=tmp_path / "deploy.safetensors", num_classes=3)
    assert probe.deploy and probe(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_our_format_carries_metadata(tmp_path):
    m = repvit.create_model("repvit_m0_6", in_chans=1, num_classes=10)
    m.preprocessing = {"input_size": [1, 64, 64], "mean": [0.286], "std": [0.353], "interpolation": "bilinear",
                       "crop_pct": 1.0}
    repvit.save_checkpoint(m, tmp_path / "fm.safetensors")
    ck = read_checkpoint(tmp_path / "fm.safetensors")
    assert ck.metadata["variant"] == "repvit_m0_6" and ck.metadata["form"] == "train"
    assert ck.metadata["num_classes"] == 10 and ck.metadata["in_chans"] == 1
    back = repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "fm.safetensors")
    assert back.in_chans == 1 and back.preprocessing == m.preprocessing


def test_training_checkpoint_carries_the_runs_preprocessing(tmp_path):
    """last.pt / checkpoint-epoch*.pt keep the data's preprocessing under data_info: a model (and so an export or
    INT8 calibration) built from them normalises as the run did, not with the ImageNet defaults."""
    m = repvit.create_model("repvit_m0_6", in_chans=1, num_classes=10)
    pre = {"input_size": [1, 48, 48], "mean": [0.286], "std": [0.353], "interpolation": "bilinear", "crop_pct": 1.0}
    torch.save({"model": m.state_dict(), "ema": None, "epoch": 3,
                "data_info": {"num_classes": 10, "in_chans": 1, "preprocessing": pre}}, tmp_path / "last.pt")
    assert read_checkpoint(tmp_path / "last.pt").metadata["preprocessing"] == pre
    back = repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "last.pt")
    assert back.preprocessing == pre


def test_our_format_refuses_a_pickle_suffix(tmp_path):
    """format 'repvit' is safetensors with metadata: a .pth name would silently drop variant/form/preprocessing."""
    m = repvit.create_model("repvit_m0_6", num_classes=10)
    for name in ("m.pth", "m.pt", "m.bin"):
        with pytest.raises(ValueError, match="safetensors"):
            repvit.save_checkpoint(m, tmp_path / name)
        assert not (tmp_path / name).exists()
    repvit.save_checkpoint(m, tmp_path / "m.pth", format="timm")   # a plain timm state dict is fine as .pth
    assert read_checkpoint(tmp_path / "m.pth").source_format == "timm"


def test_features_only_loads_backbone_from_classifier_checkpoint(tmp_path):
    src = randomize_bn(repvit.create_model("repvit_m1_1", distillation=True)).eval()
    repvit.save_checkpoint(src, tmp_path / "c.safetensors")
    bb = repvit.create_model("repvit_m1_1", checkpoint=tmp_path / "c.safetensors", features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, ref = src.forward_intermediates(x)
        for a, b in zip(bb(x), ref):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."])
def test_ddp_and_compile_prefixes_are_stripped(tmp_path, prefix):
    # torch.compile(DDP(model)) saves '_orig_mod.module.', DDP(torch.compile(model)) 'module._orig_mod.'
    m = randomize_bn(repvit.create_model("repvit_m0_6"))
    torch.save({"model": {prefix + k: v for k, v in m.state_dict().items()}}, tmp_path / "ddp.pth")
    assert _same(repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "ddp.pth").state_dict(), m.state_dict())


def test_features_only_keeps_the_checkpoints_preprocessing(tmp_path):
    m = repvit.create_model("repvit_m0_6", in_chans=1, num_classes=10)
    m.preprocessing = {"input_size": [1, 48, 48], "mean": [0.286], "std": [0.353], "interpolation": "bilinear",
                       "crop_pct": 1.0}
    repvit.save_checkpoint(m, tmp_path / "fm.safetensors")
    for deploy in (None, True):
        bb = repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "fm.safetensors", features_only=True,
                                 deploy=deploy)
        assert isinstance(bb, repvit.RepViTFeatures) and bb.preprocessing == m.preprocessing
    bb = repvit.load_checkpoint(repvit.create_model("repvit_m0_6", in_chans=1, features_only=True),
                                tmp_path / "fm.safetensors")
    assert bb.preprocessing == m.preprocessing


def test_files_without_batchnorm_step_counters_load(tmp_path):
    """torch fills a missing num_batches_tracked itself; cleaned state dicts were refused as mismatched."""
    m = randomize_bn(repvit.create_model("repvit_m0_6"))
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "clean.pth")
    got = repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "clean.pth").state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_ema_saved_by_torch_averaged_model_loads(tmp_path):
    """torch.optim.swa_utils.AveragedModel (torchvision's model_ema) saves 'module.*' keys and 'n_averaged'."""
    from torch.optim.swa_utils import AveragedModel
    m = randomize_bn(repvit.create_model("repvit_m0_6"))
    ema = AveragedModel(m, use_buffers=True)
    with torch.no_grad():                       # the EMA must differ from the raw weights, or either would pass
        for t in ema.module.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)
    torch.save({"model": m.state_dict(), "model_ema": ema.state_dict()}, tmp_path / "tv.pth")
    got = repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "tv.pth", use_ema=True).state_dict()
    assert _same(got, ema.module.state_dict())
    assert not _same(got, m.state_dict())
    raw = repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "tv.pth").state_dict()
    assert _same(raw, m.state_dict())


def test_metadata_of_the_wrong_type_is_a_format_error(tmp_path):
    from repvit.weights.io import CheckpointFormatError
    m = repvit.create_model("repvit_m0_6")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "bad.safetensors"),
              metadata={"format": "repvit", "variant": "repvit_m0_6", "preprocessing": "bicubic"})
    with pytest.raises(CheckpointFormatError, match="metadata entry 'preprocessing' is 'bicubic', not an object"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "bad.safetensors")


def test_reset_classifier_keeps_a_distilling_student_distilling():
    m = repvit.create_model("repvit_m0_6", distillation=True, num_classes=10)
    m.set_distilled_training(True)
    m.reset_classifier(5)
    out = m.train()(torch.randn(2, 3, 64, 64))
    assert isinstance(out, tuple) and out[0].shape == (2, 5)
