"""Atomic writes: the file appears whole or not at all, with the mode a plain open() would give it."""

from __future__ import annotations

import os
import stat

import pytest

from repvit.utils.files import atomic_write, atomic_write_text


def test_atomic_write_follows_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o077)
        q = atomic_write_text(tmp_path / "b.txt", "y")
        assert stat.S_IMODE(q.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    atomic_write_text(tmp_path / "c.txt", "old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "c.txt", broken)
    assert (tmp_path / "c.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["c.txt"]
