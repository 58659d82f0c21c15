"""The layer's spool file, sent to disk while written when the local store keeps it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.store import writeback
from agent.store.base import SpooledBlob
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
    monkeypatch.setattr(writeback, "WRITE_BACK_EVERY", 1 << 18)
    spool = tmp_path / "spool"
    spool.mkdir()
    path = spool / "layer.tmp"
    chunk = os.urandom(1 << 16)
    sink = SpooledBlob(
        LocalStore(tmp_path / "work"), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), path
    )
    for _ in range(64):  # 4 MiB: a write-back due every 256 KiB
        sink.write(chunk)
    # on its own thread, whenever that runs (one still due at close is skipped:
    # the store's fsync follows)
    assert some.wait(60), "nothing was written back while the file was open"
    sink.close()
    assert all(0 < n <= 64 * len(chunk) for n in synced)
    assert path.read_bytes() == chunk * 64


def test_closed_without_writes(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    sink = SpooledBlob(
        LocalStore(tmp_path / "work"), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), path
    )
    sink.close()
    assert path.stat().st_size == 0


def test_the_local_store_keeps_files_staged_on_its_filesystem(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "work")  # its directory not made yet
    spool = tmp_path / "state" / "spool"
    spool.mkdir(parents=True)
    assert store.keeps_staged(spool)
    other = Path("/proc")  # another filesystem: put_blob copies from there
    assert os.stat(other).st_dev != os.stat(tmp_path).st_dev
    assert not store.keeps_staged(other)
