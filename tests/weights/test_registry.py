"""Pretrained-weights metadata matches reality; download path verifies checksums; offline is clear.

No test touches the network: ``hub._open_url`` is patched to serve files the tests create (through
urllib's own file:// handler, which sends a Content-Length, or a fake response).
"""

import io
import re
import urllib.request

import pytest
import torch

import repvit
from repvit.models import FACTS
from repvit.utils import files
from repvit.utils.files import sha256_of
from repvit.weights import hub, layouts
from repvit.weights.layouts import CorruptCheckpointError

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


def _serve(monkeypatch, src, calls=None):
    """Every download fetches ``src`` (whatever the URL) through urllib's file:// handler."""
    def open_url(url):
        if calls is not None:
            calls.append(url)
        return urllib.request.urlopen(src.as_uri())

    monkeypatch.setattr(hub, "_open_url", open_url)


class _Response(io.BytesIO):
    def __init__(self, data, content_length):
        super().__init__(data)
        self.headers = {} if content_length is None else {"Content-Length": str(content_length)}


def test_pretrained_downloads_verifies_and_builds_the_distilled_form(tmp_path, monkeypatch):
    src = tmp_path / "src.pth"
    ref = _fake_release("repvit_m0_9", src)
    entry = hub.get_weights("repvit_m0_9")
    assert entry.epochs == 450  # default: the longest released schedule
    calls = []
    _serve(monkeypatch, src, calls)
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
    _serve(monkeypatch, src)
    entry = hub.WeightsEntry(**{**hub.get_weights("repvit_m0_6").__dict__, "sha256": "0" * 64})
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        hub.download_weights(entry, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / entry.filename).exists()


def test_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    def no_network(url):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(hub, "_open_url", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(hub.OfflineError, match="offline.*place it at"):
        repvit.create_model("repvit_m1_1", pretrained=True)
    assert list((tmp_path / "hub" / "checkpoints").iterdir()) == []  # no partial file left behind


def test_unpinned_download_records_sha256_and_checks_the_cache_on_later_use(tmp_path, monkeypatch):
    src = tmp_path / "src.pth"
    _fake_release("repvit_m0_6", src)
    calls = []
    _serve(monkeypatch, src, calls)
    entry = hub.get_weights("repvit_m0_6")
    assert entry.sha256 is None  # nothing published to pin: trust on first use
    cache = tmp_path / "cache"
    dest = hub.download_weights(entry, cache_dir=cache, progress=False)
    record = hub.sidecar_path(dest)
    assert dest == cache / entry.filename and dest.read_bytes() == src.read_bytes()
    assert record.read_text().split() == [sha256_of(src), entry.filename]
    assert sorted(p.name for p in cache.iterdir()) == sorted([dest.name, record.name])  # no temp file left
    assert hub.download_weights(entry, cache_dir=cache, progress=False) == dest and len(calls) == 1

    # the cached copy is later truncated: detected, deleted and fetched once more (matching the record)
    dest.write_bytes(src.read_bytes()[:1000])
    assert hub.download_weights(entry, cache_dir=cache, progress=False) == dest
    assert len(calls) == 2 and sha256_of(dest) == sha256_of(src)

    # corrupted again, and the server now serves other bytes: refused, nothing kept, record unchanged
    dest.write_bytes(b"garbage")
    other = tmp_path / "other.pth"
    _fake_release("repvit_m0_6", other)
    _serve(monkeypatch, other, calls)
    with pytest.raises(RuntimeError, match=r"sha256 .* first used on this machine.*delete .*\.sha256"):
        hub.download_weights(entry, cache_dir=cache, progress=False)
    assert not dest.exists() and record.read_text().split()[0] == sha256_of(src)


def test_read_only_cache_uses_a_placed_file_with_a_warning(tmp_path, monkeypatch, capsys):
    # weights placed by hand in a cache this user cannot write (container image, shared TORCH_HOME): the
    # first-use record cannot be written, so the file is used (unverified) instead of failing
    entry = hub.get_weights("repvit_m0_6")
    cache = tmp_path / "cache"
    cache.mkdir()
    _fake_release("repvit_m0_6", cache / entry.filename)

    def read_only(path, digest, name):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(hub, "_write_sidecar", read_only)
    monkeypatch.setattr(hub, "_open_url", lambda url: pytest.fail("a cached file must not be downloaded"))
    assert hub.download_weights(entry, cache_dir=cache, progress=False) == cache / entry.filename
    err = capsys.readouterr().err
    assert "cannot record the sha256" in err and "unverified" in err
    assert not hub.sidecar_path(cache / entry.filename).exists()


def test_a_local_error_while_downloading_is_not_called_offline(tmp_path, monkeypatch):
    entry = hub.get_weights("repvit_m0_6")
    _serve(monkeypatch, tmp_path / "unused.pth")
    cache = tmp_path / "cache"

    def no_temp_file(*args, dir=None, **kw):  # the cache folder refuses the temporary download file
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(files.tempfile, "mkstemp", no_temp_file)
    with pytest.raises(PermissionError, match="Permission denied") as err:
        hub.download_weights(entry, cache_dir=cache, progress=False)
    assert not isinstance(err.value, hub.OfflineError) and err.value.filename == str(cache)


def test_short_download_against_content_length_is_rejected(tmp_path, monkeypatch):
    src = tmp_path / "src.pth"
    _fake_release("repvit_m0_6", src)
    data = src.read_bytes()
    monkeypatch.setattr(hub, "_open_url", lambda url: _Response(data[: len(data) // 2], len(data)))
    cache = tmp_path / "cache"
    entry = hub.get_weights("repvit_m0_6")
    with pytest.raises(hub.DownloadError, match=rf"received {len(data) // 2} of {len(data)} bytes"):
        hub.download_weights(entry, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []  # no partial file, no digest recorded
    # the same bytes with a matching Content-Length are accepted
    monkeypatch.setattr(hub, "_open_url", lambda url: _Response(data, len(data)))
    dest = hub.download_weights(entry, cache_dir=cache, progress=False)
    assert dest.read_bytes() == data


def test_unreadable_cached_download_names_the_file_to_delete(tmp_path, monkeypatch):
    """A first download cut short without a Content-Length cannot be caught by the byte count; reading it fails
    with an error that names the cached file (and its digest record) to delete."""
    src = tmp_path / "src.pth"
    _fake_release("repvit_m0_6", src)
    monkeypatch.setattr(hub, "_open_url", lambda url: _Response(src.read_bytes()[:5000], None))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    dest = tmp_path / "hub" / "checkpoints" / hub.get_weights("repvit_m0_6").filename
    d = re.escape(str(dest))
    with pytest.raises(CorruptCheckpointError, match=rf"cached pretrained weights at {d} .*Delete {d} and {d}\.sha256"):
        repvit.create_model("repvit_m0_6", pretrained=True)


def test_pretrained_for_variant_without_release():
    with pytest.raises(ValueError, match="no pretrained weights are published for repvit_m3"):
        repvit.create_model("repvit_m3", pretrained=True)
    with pytest.raises(ValueError, match="unknown weights"):
        repvit.create_model("repvit_m0_9", pretrained="dist_999e_in1k")
