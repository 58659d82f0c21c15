"""A blob that is still downloading, waited for and read from another thread.

The downloading side reports how much of the file is final (``data``, on the
event loop) and when it is complete; readers run in another thread (a restore's
apply thread) and wait here for the bytes they ask for.  ``agent.store.fetch``
keeps one per blob of the chain it fetches, and reports a blob only once the
store verified it, so the restore waits for a layer while older ones download.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO, cast


class Arrival:
    """How much of one blob has arrived, and where.  Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._ready = 0
        self._done = False
        self._path: Path | None = None
        self._error: BaseException | None = None

    # -- the downloading side (the event loop) -----------------------------------------

    def data(self, path: Path, ready: int) -> None:
        """The first ``ready`` bytes of ``path`` are final (``Store.get_blob``'s on_data)."""
        with self._cond:
            if self._fd is None:
                # Opened once: the store may rename the file when it is complete.
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._ready = max(self._ready, ready)
            self._cond.notify_all()

    def finish(self, path: Path) -> None:
        """Everything has arrived, as the file ``path`` (what get_blob returned)."""
        with self._cond:
            self._done = True
            self._path = path
            self._cond.notify_all()

    def complete(self) -> Path | None:
        """The whole file, if it has all arrived: read it directly, without waiting."""
        with self._cond:
            return self._path if self._done and self._error is None else None

    def wait(self) -> Path:
        """The whole file, waiting until it has all arrived; raises the download's error."""
        with self._cond:
            while not (self._done and self._path is not None):
                if self._error is not None:
                    raise self._error
                self._cond.wait()
            if self._error is not None:
                raise self._error
            return self._path

    def fail(self, error: BaseException) -> None:
        """The download failed: readers raise ``error``."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def close(self) -> None:
        """Release the file; a reader still waiting, or reading later, raises."""
        with self._cond:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._error is None:
                self._error = ValueError("read of a download that was closed")
            self._cond.notify_all()

    # -- the reading side (any thread) ----------------------------------------------------

    def open(self) -> BinaryIO:
        """A reader from the first byte; several may read at once.  It has only
        ``read`` and ``close``, all a layer reader asks of a file."""
        return cast(BinaryIO, ArrivingFile(self))

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset``, waiting until some have arrived; b""
        at the end of a complete blob.  The file is read under the lock, so
        ``close`` can't pull it from under a reader (a restore given up on)."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._fd is not None and (self._ready > offset or self._done):
                    break
                if self._done:  # complete, yet never reported: an empty blob
                    return b""
                self._cond.wait()
            want = self._ready - offset if n < 0 else min(n, self._ready - offset)
            return os.pread(self._fd, want, offset) if want > 0 else b""


class ArrivingFile:
    """A binary reader of an ``Arrival``: ``read`` waits for the bytes it returns."""

    def __init__(self, arrival: Arrival) -> None:
        self._arrival = arrival
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self._arrival.read_at(self._pos, n)
        self._pos += len(data)
        return data

    def close(self) -> None:
        """The file belongs to the ``Arrival``; nothing to release per reader."""

    def __enter__(self) -> ArrivingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
