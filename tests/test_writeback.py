"""The layer's spool file, sent to disk while written when the store keeps it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.session import writeback
from agent.session.writeback import WriteBackFile
from agent.store.local import LocalStore


def test_written_back_while_written_and_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the disk's own writeback cannot be seen from here: the calls that start it can)
    synced: list[int] = []
    some = threading.Event()
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real(fd)
        some.set()

    monkeypatch.setattr(writeback.os, "fdatasync", fdatasync)
    path = tmp_path / "layer.tmp"
    chunk = os.urandom(1 << 16)
    f = WriteBackFile(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), every=1 << 18)
    with f:
        for _ in range(64):  # 4 MiB: a write-back due every 256 KiB
            f.write(chunk)
        # on its own thread, whenever that runs (one still due at close is skipped:
        # the store's fsync follows)
        assert some.wait(60), "nothing was written back while the file was open"
    assert f.closed
    assert all(0 < n <= 64 * len(chunk) for n in synced)
    assert path.read_bytes() == chunk * 64


def test_closed_without_writes(tmp_path: Path) -> None:
    f = WriteBackFile(os.open(tmp_path / "empty", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    f.close()
    assert f.closed and (tmp_path / "empty").stat().st_size == 0


def test_the_local_store_keeps_files_staged_on_its_filesystem(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "work")  # its directory not made yet
    spool = tmp_path / "state" / "spool"
    spool.mkdir(parents=True)
    assert store.keeps_staged(spool)
    other = Path("/proc")  # another filesystem: put_blob copies from there
    assert os.stat(other).st_dev != os.stat(tmp_path).st_dev
    assert not store.keeps_staged(other)
