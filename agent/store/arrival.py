"""A blob that is still downloading, read from another thread as it arrives.

``Store.get_blob`` reports through ``on_data`` how much of the file it writes is
final; a restore applies a layer from that file while the rest of it is still on
the way, so a download and the apply overlap instead of adding up.  The store's
callbacks run on the event loop; readers run in the apply thread and wait here.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class Arrival:
    """How much of one blob has arrived, and where.  Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._ready = 0
        self._done = False
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

    def finish(self) -> None:
        """Everything has arrived (get_blob returned, after its last ``data``)."""
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The download failed: readers raise ``error``."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            fd, self._fd = self._fd, None
            if self._error is None and not self._done:
                self._error = EOFError("the download was abandoned")
            self._cond.notify_all()
        if fd is not None:
            os.close(fd)

    # -- the reading side (any thread) ----------------------------------------------------

    def open(self) -> ArrivingFile:
        """A reader from the first byte; several may read at once."""
        return ArrivingFile(self)

    def _wait_for(self, offset: int) -> tuple[int, int, bool]:
        """Block until a byte past ``offset`` has arrived or the blob is complete;
        return the file, how much is readable and whether that is all."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._fd is not None and (self._ready > offset or self._done):
                    return self._fd, self._ready, self._done
                if self._done:  # complete, yet never reported: an empty blob
                    return -1, 0, True
                self._cond.wait()


class ArrivingFile:
    """A binary reader of an ``Arrival``: ``read`` waits for the bytes it returns."""

    def __init__(self, arrival: Arrival) -> None:
        self._arrival = arrival
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        fd, ready, done = self._arrival._wait_for(self._pos)
        if fd < 0:
            return b""
        available = ready - self._pos
        if available <= 0 and done:
            return b""
        want = available if n < 0 else min(n, available)
        data = os.pread(fd, want, self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        """The file belongs to the ``Arrival``; nothing to release per reader."""

    def __enter__(self) -> ArrivingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
