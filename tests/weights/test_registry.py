"""Pretrained-weights metadata matches reality; download path verifies checksums; offline is clear."""

import shutil

import pytest
import torch

import repvit
from repvit.models import FACTS
from repvit.utils.files import sha256_of
from repvit.weights import hub, layouts

# file names of the official release (reference sheet: official_checkpoints.files)
RELEASE_FILES = ["repvit_m0_6_distill_300e.pth", "repvit_m0_9_distill_300e.pth", "repvit_m0_9_distill_450e.pth",
                 "repvit_m1_0_distill_300e.pth", "repvit_m1_0_distill_450e.pth", "repvit_m1_1_distill_300e.pth",
                 "repvit_m1_1_distill_450e.pth", "repvit_m1_5_distill_300e.pth", "repvit_m1_5_distill_450e.pth",
                 "repvit_m2_3_distill_300e.pth", "repvit_m2_3_distill_450e.pth"]


def test_registry_covers_the_release():
    assert sorted(e.filename for e in hub.WEIGHTS.values()) == sorted(RELEASE_FILES)
    for e in hub.WEIGHTS.values():
        assert e.url.startswith("https://github.com/THU-MIG/RepViT/releases/download/v1.0/")
        assert e.variant in repvit.list_models() and e.distilled and e.epochs in (300, 450)
        published = FACTS[e.variant].top1_450e if e.epochs == 450 else FACTS[e.variant].top1_300e
        assert e.top1 == published


def _fake_release(variant, path):
    m = repvit.create_model(variant, distillation=True)
    torch.save({"model": layouts.ours_to_official(m.state_dict())}, path)
    return m


def test_pretrained_downloads_verifies_and_builds_the_distilled_form(tmp_path, monkeypatch):
    src = tmp_path / "src.pth"
    ref = _fake_release("repvit_m0_9", src)
    entry = hub.get_weights("repvit_m0_9")
    assert entry.epochs == 450  # default: the longest released schedule
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        shutil.copy(src, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    pinned = hub.WeightsEntry(**{**entry.__dict__, "sha256": sha256_of(src)})
    monkeypatch.setitem(hub.WEIGHTS, entry.name, pinned)
    m = repvit.create_model("repvit_m0_9", pretrained=True)
    assert calls == [entry.url]
    assert m.distillation and m.num_classes == 1000
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert torch.load(src, weights_only=True)["model"].keys() == layouts.ours_to_official(m.state_dict()).keys()
    n = sum(p.numel() for p in m.parameters())
    assert n == FACTS["repvit_m0_9"].train_params_dist_head
    # a second call uses the cache
    repvit.create_model("repvit_m0_9", pretrained=True, num_classes=5)
    assert len(calls) == 1


def test_checksum_mismatch_deletes_the_file(tmp_path, monkeypatch):
    src = tmp_path / "src.pth"
    _fake_release("repvit_m0_6", src)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, progress=True: shutil.copy(src, dst))
    entry = hub.WeightsEntry(**{**hub.get_weights("repvit_m0_6").__dict__, "sha256": "0" * 64})
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        hub.download_weights(entry, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / entry.filename).exists()


def test_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    def no_network(url, dst, progress=True):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(hub.OfflineError, match="offline.*place it at"):
        repvit.create_model("repvit_m1_1", pretrained=True)


def test_pretrained_for_variant_without_release():
    with pytest.raises(ValueError, match="no pretrained weights are published for repvit_m3"):
        repvit.create_model("repvit_m3", pretrained=True)
    with pytest.raises(ValueError, match="unknown weights"):
        repvit.create_model("repvit_m0_9", pretrained="dist_999e_in1k")
