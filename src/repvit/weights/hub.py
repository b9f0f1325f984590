"""Pretrained weights, described as data, and their download into the torch.hub cache.

Entries describe the official THU-MIG release files (ImageNet-1K, hard distillation from
RegNetY-16GF, so every file holds two heads). Published top-1 is the official README / log
figure (copied from the project's reference sheet).

What is verified, exactly:
  * A download is written to a temporary file in the cache folder and renamed into place only
    when it completed; if the server sent a Content-Length, the byte count must match it (a short
    read raises ``DownloadError`` and the partial file is deleted). Without a Content-Length a
    truncated transfer is not detectable at this point (it fails later, when the file is read).
  * ``sha256`` pinned in the registry (``WeightsEntry.sha256``): the file must match it, on every
    use; a mismatch deletes the file and raises. No entry pins one today: THU-MIG publishes no
    digests, so we have nothing trustworthy to pin.
  * Unpinned entries: trust on first use. The first download's sha256 is recorded next to the file
    in ``<file>.sha256`` (``sha256sum`` format; a file placed there by hand is recorded on its first
    use). Every later use re-hashes the cached file and compares: on a mismatch (truncated or
    modified since) the file is downloaded once more, and the new download must match the recorded
    digest; if it does not, it is discarded, the changed cached copy deleted and ``RuntimeError``
    says so (delete the ``.sha256`` record to accept the new file). A record that exists but holds
    no digest is an error too (never silently replaced). This catches a cache that changed after
    the first use; it cannot tell whether the first download itself was the file THU-MIG released.
  * A download is checked against the pinned or recorded digest before it is renamed into place,
    and the rename replaces the cached file atomically: processes sharing the cache (DDP ranks, two
    users) never see a partial or unverified file, and one process's repair never deletes the copy
    another has just put in place. The file gets the mode a plain ``open()`` would (umask), not
    ``mkstemp``'s owner-only 0600, so a shared cache stays readable.
  * A cached file that cannot be read as a checkpoint: ``create_model(..., pretrained=True)``
    raises ``CheckpointFormatError`` naming the cache path and telling you to delete it and its
    ``.sha256`` record (no automatic deletion: the record already vouches for those bytes).
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..utils.files import atomic_write, atomic_write_text, sha256_of

__all__ = ["WeightsEntry", "WEIGHTS", "get_weights", "list_weights", "download_weights", "sidecar_path",
           "OfflineError", "DownloadError"]

_RELEASE = "https://github.com/THU-MIG/RepViT/releases/download/v1.0/"


class OfflineError(RuntimeError):
    """The weights could not be fetched (no network, DNS, HTTP error)."""


class DownloadError(RuntimeError):
    """A download arrived incomplete (fewer bytes than the server announced)."""


@dataclass(frozen=True)
class WeightsEntry:
    variant: str
    tag: str
    url: str
    epochs: int
    distilled: bool
    top1: float
    hf_hub_id: str | None = None
    sha256: str | None = None
    num_classes: int = 1000

    @property
    def name(self) -> str:
        return f"{self.variant}.{self.tag}"

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _official(variant: str, epochs: int, top1: float) -> WeightsEntry:
    return WeightsEntry(
        variant=variant, tag=f"dist_{epochs}e_in1k", url=f"{_RELEASE}{variant}_distill_{epochs}e.pth",
        epochs=epochs, distilled=True, top1=top1, hf_hub_id=f"timm/{variant}.dist_{epochs}e_in1k",
    )


# Published top-1 (%): logged best of the official runs (reference sheet: training_recipe_official.logged_best_top1,
# variants.*.published.top1_300e/450e).
WEIGHTS: dict[str, WeightsEntry] = {e.name: e for e in [
    _official("repvit_m0_6", 300, 74.1),
    _official("repvit_m0_9", 300, 78.7), _official("repvit_m0_9", 450, 79.1),
    _official("repvit_m1_0", 300, 80.0), _official("repvit_m1_0", 450, 80.3),
    _official("repvit_m1_1", 300, 80.7), _official("repvit_m1_1", 450, 81.2),
    _official("repvit_m1_5", 300, 82.3), _official("repvit_m1_5", 450, 82.5),
    _official("repvit_m2_3", 300, 83.3), _official("repvit_m2_3", 450, 83.7),
]}
# Default tag per variant: the longest schedule released.
DEFAULT_TAG = {e.variant: e.tag for e in sorted(WEIGHTS.values(), key=lambda e: e.epochs)}


def list_weights(variant: str | None = None) -> list[WeightsEntry]:
    return [e for e in WEIGHTS.values() if variant is None or e.variant == variant]


def get_weights(variant: str, tag: str | bool | None = True) -> WeightsEntry:
    """Registry entry for ``variant`` (``tag=True``: the default release)."""
    if tag is True or tag is None:
        if variant not in DEFAULT_TAG:
            raise ValueError(
                f"no pretrained weights are published for {variant}; variants with weights: "
                f"{', '.join(sorted(DEFAULT_TAG))}. Train one (`repvit train`) or pass checkpoint=PATH."
            )
        tag = DEFAULT_TAG[variant]
    key = f"{variant}.{tag}"
    if key not in WEIGHTS:
        tags = [e.tag for e in list_weights(variant)]
        raise ValueError(f"unknown weights {key!r}; tags for {variant}: {tags or 'none'}")
    return WEIGHTS[key]


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the trust-on-first-use sha256 of a cached weights file is recorded."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> str | None:
    """The digest recorded in ``path``; None when there is no record (first use). A record that exists but
    cannot be read or holds no sha256 raises: silently replacing it would trust whatever file is cached now."""
    try:
        fields = path.read_bytes().split()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RuntimeError(f"cannot read the sha256 record {path} ({e}); make it readable, or delete it to record "
                           "the cached file afresh") from e
    digest = fields[0].decode("ascii", "replace").lower() if fields else ""
    if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
        raise RuntimeError(
            f"the sha256 record {path} is damaged: it holds no sha256 digest (expected '<64 hex digits>  <name>'). "
            f"Delete it to record the cached file afresh (delete {path.with_suffix('')} too if you doubt that file)."
        )
    return digest


def _write_sidecar(path: Path, digest: str, name: str) -> None:
    atomic_write_text(path, f"{digest}  {name}\n")


def _open_url(url: str) -> BinaryIO:
    """Open ``url`` for reading (tests replace this); the response has ``.headers`` and ``.read(n)``."""
    return urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "repvit"}), timeout=60)


def _write_local(out: BinaryIO, chunk: bytes | None, tmp: str) -> None:
    """Write ``chunk`` to ``out`` (None: flush it to disk). A failure (disk full, quota) is raised as an OSError
    naming ``tmp``: a local error, not to be reported as a network one."""
    try:
        if chunk is None:
            out.flush()
            os.fsync(out.fileno())
        else:
            out.write(chunk)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), tmp) from e


class _Discard(Exception):
    """Raised inside the atomic write to drop a download whose digest is not the expected one."""


def _fetch(url: str, dest: Path, progress: bool, expect: str | None = None) -> str:
    """Download ``url`` to ``dest`` via a temp file in the same folder; returns the sha256 of what was downloaded.

    Raises ``DownloadError`` (temp file deleted, ``dest`` untouched) when fewer or more bytes arrive than the
    server's Content-Length announced; network errors propagate. With ``expect``, a download of another sha256 is
    discarded and ``dest`` left as it was (the caller compares the returned digest). The rename is atomic.
    """
    h = hashlib.sha256()

    def write(tmp: str) -> None:
        n = 0
        with open(tmp, "wb") as out, _open_url(url) as resp:
            length = (resp.headers.get("Content-Length") or "").strip()
            expected = int(length) if length.isdigit() else None
            bar = None
            if progress:
                try:
                    from tqdm import tqdm
                    bar = tqdm(total=expected, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr)
                except ImportError:
                    pass
            try:
                while chunk := resp.read(1 << 20):
                    _write_local(out, chunk, tmp)
                    h.update(chunk)
                    n += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
            _write_local(out, None, tmp)
        if expected is not None and n != expected:
            raise DownloadError(
                f"incomplete download of {url}: received {n} of {expected} bytes (Content-Length); the partial file "
                f"was deleted and nothing was written to {dest}. Try again."
            )
        if expect is not None and h.hexdigest() != expect:
            raise _Discard

    try:
        atomic_write(dest, write, suffix=".part")
    except _Discard:
        pass
    return h.hexdigest()


def _download(entry: WeightsEntry, dest: Path, progress: bool, expect: str | None = None) -> str:
    try:
        return _fetch(entry.url, dest, progress, expect)
    except DownloadError:
        raise
    except OSError as e:
        # URLError and socket errors are OSErrors too; a local one (the cache folder cannot take the temp file)
        # has a filename and is not an offline problem: let it say what it is
        if getattr(e, "filename", None) is not None and not isinstance(e, urllib.error.URLError):
            raise
        raise OfflineError(
            f"could not download {entry.name} from {entry.url} ({type(e).__name__}: {e}). If this machine is "
            f"offline, fetch the file elsewhere and place it at {dest}, or pass checkpoint=PATH."
        ) from e
    except Exception as e:  # HTTP and protocol errors
        raise OfflineError(
            f"could not download {entry.name} from {entry.url} ({type(e).__name__}: {e}). If this machine is "
            f"offline, fetch the file elsewhere and place it at {dest}, or pass checkpoint=PATH."
        ) from e


def _unlink_unless(path: Path, good: str) -> bool:
    """Delete ``path`` unless it has the sha256 ``good`` (another process sharing the cache may have just put the
    right file in place); True when it was deleted or is gone."""
    try:
        if sha256_of(path) == good:
            return False
    except FileNotFoundError:
        return True
    path.unlink(missing_ok=True)
    return True


def download_weights(entry: WeightsEntry, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Return the local path of ``entry``'s file, downloading it into the torch.hub cache if needed.

    Verification (see the module docstring): the byte count against Content-Length; the digest against
    ``entry.sha256`` when the registry pins one (a mismatch deletes the file and raises), else against the
    digest recorded at first use in ``<file>.sha256`` (a mismatch downloads it once more; that download must
    match the record). Offline, raises ``OfflineError`` saying where to put the file by hand. The cache folder
    is ``cache_dir``, else ``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``; default ``~/.cache/torch``).
    """
    cache = Path(cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints"))
    dest = cache / entry.filename
    record = sidecar_path(dest)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(
            errno.ENOTDIR, f"the weights cache {cache} is not a directory (it, or a folder above it, is a file); "
            "move that file, or set TORCH_HOME to use another cache", str(cache)) from e
    fresh = not dest.exists()
    pinned = entry.sha256
    recorded = None if pinned is not None else _read_sidecar(record)
    # a download that does not match the pinned or recorded digest is never renamed into place
    digest = _download(entry, dest, progress, pinned or recorded) if fresh else sha256_of(dest)

    if pinned is not None:  # pinned in the registry
        if digest != pinned:
            if not fresh and not _unlink_unless(dest, pinned):
                return dest             # another process put the right file in place meanwhile
            raise RuntimeError(
                f"checksum mismatch for {entry.name}: expected sha256 {pinned}, got {digest}; the file was "
                "deleted - download it again"
            )
        return dest

    if recorded is None:  # first use: trust these bytes and record them
        try:
            _write_sidecar(record, digest, dest.name)
        except OSError as e:  # a read-only cache (container image, shared TORCH_HOME): use the file unrecorded
            print(f"warning: cannot record the sha256 of {dest} in {record} ({e}); the file is used unverified",
                  file=sys.stderr)
            return dest
        how = "downloaded" if fresh else "found in the cache"
        print(f"note: {dest.name} {how}; sha256={digest} recorded in {record.name}. It is not pinned in the "
              "registry, so this first copy is trusted as is; later uses are checked against it.", file=sys.stderr)
        return dest
    if digest == recorded:
        return dest
    if not fresh:  # the cached copy changed since first use (truncated, modified): fetch it once more
        # no unlink first: a matching download replaces it atomically (another process may be repairing it too)
        print(f"warning: cached {dest} does not match the sha256 recorded at first use ({recorded}, now {digest}); "
              "downloading it again", file=sys.stderr)
        digest = _download(entry, dest, progress, recorded)
        if digest == recorded:
            return dest
        # the changed copy must not be trusted later if the record is deleted - unless another process has
        # repaired the file meanwhile
        if not _unlink_unless(dest, recorded):
            return dest
    raise RuntimeError(
        f"the download of {entry.name} from {entry.url} has sha256 {digest}, but the copy first used on this machine "
        f"had {recorded} (recorded in {record}); the new file was not kept. If the release file really changed, "
        f"delete {record} to trust the new one."
    )
