"""The layer writer's failure paths: whatever stops a layer midway (a disk that
fills up at any byte, a cancelled checkpoint) ends ``write_layer`` with that error,
promptly, and leaves no thread behind."""

from __future__ import annotations

import errno
import io
import os
import threading
from pathlib import Path

import pytest

from agent.checkpoint.diff import diff
from agent.checkpoint.layer_writer import Cancelled, write_layer
from agent.checkpoint.scan import Excluder, Stat, scan


class _FillsUp(io.RawIOBase):
    """A file that takes ``room`` bytes and then fails as a full disk does.

    Stands in for a disk filling at an exact byte, which a real filesystem can't
    be made to do; tests/test_disk_faults.py runs the same failure on a real full
    tmpfs through the CLI."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.taken = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.taken + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.taken += len(data)
        return len(data)


def _tree(root: Path) -> dict[str, Stat]:
    for d in range(4):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(40):
            (root / f"d{d}/f{f}").write_bytes(os.urandom(30_000))
    (root / "big").write_bytes(os.urandom(3 << 20))  # read in chunks
    return scan(root, Excluder(root, [], [])).entries


def _compress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "layer-compress"]


def test_a_complete_layer_fits_exactly(tmp_path: Path) -> None:
    current = _tree(tmp_path / "root")
    sink = _FillsUp(1 << 30)
    result = write_layer(tmp_path / "root", diff({}, current), current, sink)  # type: ignore[arg-type]
    assert result.size == sink.taken > 4 << 20
    assert _compress_threads() == []


@pytest.mark.parametrize("where", ["first byte", "midway", "last byte"])
def test_disk_full_at_any_byte_fails_the_layer(tmp_path: Path, where: str) -> None:
    root = tmp_path / "root"
    current = _tree(root)
    changes = diff({}, current)
    size = write_layer(root, changes, current, _FillsUp(1 << 30)).size  # type: ignore[arg-type]
    room = {"first byte": 0, "midway": size // 2, "last byte": size - 1}[where]
    with pytest.raises(OSError) as caught:
        write_layer(root, changes, current, _FillsUp(room))  # type: ignore[arg-type]
    assert caught.value.errno == errno.ENOSPC
    assert _compress_threads() == []


def test_cancel_stops_the_layer(tmp_path: Path) -> None:
    root = tmp_path / "root"
    current = _tree(root)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        write_layer(root, diff({}, current), current, _FillsUp(1 << 30), cancel=cancel)  # type: ignore[arg-type]
    assert _compress_threads() == []
