"""The download cache under failure and sharing: damaged records, disk full, a cache path that is a file, file
modes in a shared cache, processes repairing the cache at once, and the real urllib path against a local server.

No test touches the network; ``download_weights`` does not parse the file, so plain bytes stand in for weights.
"""

import builtins
import hashlib
import http.server
import io
import os
import stat
import threading

import pytest
import torch

from repvit.weights import hub

GOOD, BAD = b"good weights " * 400, b"other bytes " * 300
ENTRY = hub.get_weights("repvit_m0_6")


class _Response(io.BytesIO):
    def __init__(self, data, content_length=None):
        super().__init__(data)
        self.headers = {} if content_length is None else {"Content-Length": str(content_length)}


def _serve(monkeypatch, data, before=None):
    def open_url(url):
        if before is not None:
            before()
        return _Response(data, len(data))

    monkeypatch.setattr(hub, "_open_url", open_url)


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def test_download_gets_the_umask_mode_not_owner_only(tmp_path, monkeypatch):
    """mkstemp makes 0600 files: renamed as is, a download in a shared cache (TORCH_HOME of a team, a container
    user other than the one that downloaded) cannot be read by anyone else, while its .sha256 record can."""
    _serve(monkeypatch, GOOD)
    old = os.umask(0o022)
    try:
        dest = hub.download_weights(ENTRY, cache_dir=tmp_path, progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert stat.S_IMODE(hub.sidecar_path(dest).stat().st_mode) == 0o644


def test_disk_full_while_downloading_is_a_local_error_not_offline(tmp_path, monkeypatch):
    _serve(monkeypatch, GOOD)
    class Full(io.RawIOBase):
        def __init__(self, path):
            self.f = builtins.open(path, "wb")

        def write(self, b):
            raise OSError(28, "No space left on device")

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()
            super().close()

    monkeypatch.setattr(hub, "open", lambda path, mode: Full(path), raising=False)  # the download's temp file
    with pytest.raises(OSError, match=r"No space left on device: .*\.part") as err:
        hub.download_weights(ENTRY, cache_dir=tmp_path, progress=False)
    assert not isinstance(err.value, hub.OfflineError) and err.value.errno == 28
    assert list(tmp_path.iterdir()) == []  # the partial file is gone


@pytest.mark.parametrize("record", [b"", b"deadbeef  repvit_m0_6_distill_300e.pth\n", b"\xff\xfe garbage"])
def test_a_damaged_sha256_record_is_an_error_not_silently_replaced(tmp_path, monkeypatch, record):
    """An empty / cut / non-text record used to be taken for 'no record': the cached file, whatever it had become,
    was trusted afresh and the record overwritten (or a UnicodeDecodeError escaped)."""
    _serve(monkeypatch, GOOD)
    dest = hub.download_weights(ENTRY, cache_dir=tmp_path, progress=False)
    dest.write_bytes(BAD)  # the cache changed since first use ...
    hub.sidecar_path(dest).write_bytes(record)  # ... and its record was damaged
    monkeypatch.setattr(hub, "_open_url", lambda url: pytest.fail("nothing to compare a download with"))
    with pytest.raises(RuntimeError, match=r"sha256 record .*\.sha256 is damaged.*Delete it"):
        hub.download_weights(ENTRY, cache_dir=tmp_path, progress=False)
    assert dest.read_bytes() == BAD and hub.sidecar_path(dest).read_bytes() == record  # nothing re-trusted


def test_cache_path_that_is_a_file(tmp_path, monkeypatch):
    _serve(monkeypatch, GOOD)
    (tmp_path / "hub").write_text("not a folder")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(NotADirectoryError, match=r"weights cache .*hub.checkpoints is not a directory.*TORCH_HOME"):
        hub.download_weights(ENTRY, progress=False)


def test_cache_follows_torch_home(tmp_path, monkeypatch):
    _serve(monkeypatch, GOOD)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # no torch.hub.set_dir() in effect
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    dest = hub.download_weights(ENTRY, progress=False)
    assert dest == tmp_path / "th" / "hub" / "checkpoints" / ENTRY.filename and dest.read_bytes() == GOOD


def test_a_repair_does_not_delete_the_copy_another_process_just_put_in_place(tmp_path, monkeypatch):
    """Two ranks find the same damaged cache. Rank B hashed the damaged copy; before it acts, rank A has replaced it
    with a good download. B used to unlink the path first (deleting A's good file, which A is about to read) and
    only then download; now its download replaces the file atomically."""
    _serve(monkeypatch, GOOD)
    dest = hub.download_weights(ENTRY, cache_dir=tmp_path, progress=False)
    dest.write_bytes(BAD)
    real_sha = hub.sha256_of

    def hash_then_rank_a_repairs(path):
        digest = real_sha(path)
        (tmp_path / "a.part").write_bytes(GOOD)
        os.replace(tmp_path / "a.part", dest)
        return digest

    monkeypatch.setattr(hub, "sha256_of", hash_then_rank_a_repairs)
    present = []
    _serve(monkeypatch, GOOD, before=lambda: present.append(dest.read_bytes() == GOOD))
    assert hub.download_weights(ENTRY, cache_dir=tmp_path, progress=False) == dest
    assert present == [True] and dest.read_bytes() == GOOD


def test_a_download_that_fails_verification_never_replaces_the_cached_file(tmp_path, monkeypatch):
    """A fresh download that does not match the record is discarded before the rename, so a good copy another
    process put in place meanwhile survives (it used to be renamed over, then deleted)."""
    dest = tmp_path / ENTRY.filename
    hub.sidecar_path(dest).write_text(f"{_sha(GOOD)}  {ENTRY.filename}\n")
    _serve(monkeypatch, BAD, before=lambda: dest.write_bytes(GOOD))  # the other process, during our download
    with pytest.raises(RuntimeError, match=r"first used on this machine.*not kept.*delete .*\.sha256"):
        hub.download_weights(ENTRY, cache_dir=tmp_path, progress=False)
    assert dest.read_bytes() == GOOD
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, dest.name + ".sha256"])  # no temp file
    # pinned entries alike
    dest.unlink()
    pinned = hub.WeightsEntry(**{**ENTRY.__dict__, "sha256": _sha(GOOD)})
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        hub.download_weights(pinned, cache_dir=tmp_path, progress=False)
    assert dest.read_bytes() == GOOD


def test_a_failed_repair_keeps_a_good_copy_another_process_put_in_place(tmp_path, monkeypatch):
    """This process finds a changed cached copy and its re-download fails verification; meanwhile another process
    repaired the file. The clean-up must not delete that good copy: the call returns it instead of raising."""
    dest = tmp_path / ENTRY.filename
    dest.write_bytes(BAD)
    hub.sidecar_path(dest).write_text(f"{_sha(GOOD)}  {ENTRY.filename}\n")
    _serve(monkeypatch, BAD, before=lambda: dest.write_bytes(GOOD))
    assert hub.download_weights(ENTRY, cache_dir=tmp_path, progress=False) == dest
    assert dest.read_bytes() == GOOD
    # nobody repaired it: the changed copy is deleted and the error says so
    dest.write_bytes(BAD)
    _serve(monkeypatch, BAD)
    with pytest.raises(RuntimeError, match="not kept"):
        hub.download_weights(ENTRY, cache_dir=tmp_path, progress=False)
    assert not dest.exists()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/moved/w.pth":  # GitHub release downloads redirect to a CDN
            self.send_response(302)
            self.send_header("Location", "/w.pth")
            self.end_headers()
        elif self.path in ("/w.pth", "/short.pth"):
            body = GOOD if self.path == "/w.pth" else GOOD[:1000]
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        else:
            self.send_error(404)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def test_real_urllib_path_against_a_local_server(tmp_path, monkeypatch, server):
    """hub._open_url itself (not patched): a redirect is followed, a short body against Content-Length is refused,
    an HTTP error names the URL and where to put the file."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)

    def entry(path):
        return hub.WeightsEntry(**{**ENTRY.__dict__, "url": server + path})

    dest = hub.download_weights(entry("/moved/w.pth"), cache_dir=tmp_path / "a", progress=False)
    assert dest.read_bytes() == GOOD
    with pytest.raises(hub.DownloadError, match=f"received 1000 of {len(GOOD)} bytes"):
        hub.download_weights(entry("/short.pth"), cache_dir=tmp_path / "b", progress=False)
    assert list((tmp_path / "b").iterdir()) == []
    with pytest.raises(hub.OfflineError, match=rf"from {server}/gone\.pth \(HTTPError: HTTP Error 404.*place it at"):
        hub.download_weights(entry("/gone.pth"), cache_dir=tmp_path / "c", progress=False)
    assert list((tmp_path / "c").iterdir()) == []
