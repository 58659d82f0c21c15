"""A layer's spool file sent to disk while it is written, so that storing it waits on little.

The local store keeps the very file a checkpoint wrote (renamed into place) and
fsyncs it before any manifest may name it.  Left to that fsync, the whole layer
goes to disk at the end while nothing else runs (tens of ms for 150 MB on a fast
disk, several times that on a slow one).  Sent to disk every few MiB from a
thread of its own, the writing overlaps the walk and the compression instead.
It is no durability step: the store's fsync, unchanged, is still what makes the
blob durable before the manifest is written.
"""

from __future__ import annotations

import os
import threading

# Bytes written between two write-backs: what the store's fsync has left at most
# (beside what was written while the last one ran).
WRITE_BACK_EVERY = 16 << 20


class WriteBack:
    """``fdatasync``s the new file ``fd`` from a thread of its own after every
    ``every`` bytes its writer says it wrote (``wrote``), until ``stop``."""

    def __init__(self, fd: int, every: int | None = None) -> None:
        self._fd = fd
        self._every = WRITE_BACK_EVERY if every is None else every
        self._pending = 0
        self._kick = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="write-back", daemon=True)
        self._thread.start()

    def wrote(self, n: int) -> None:
        self._pending += n
        if self._pending >= self._every:
            self._pending = 0
            self._kick.set()

    def _run(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            if self._stopping:
                return
            try:
                os.fdatasync(self._fd)
            except OSError:
                return  # the store's fsync meets it again, and reports it

    def stop(self) -> None:
        """Wait for a write-back in progress; call before the file is closed."""
        if self._thread.is_alive():
            self._stopping = True
            self._kick.set()
            self._thread.join()
