"""Fetching a list of blobs (a restore's chain): bounded, newest first, each one
verified before any of its bytes is handed out.

The number of downloads at once is the store's (``Store.fetch_concurrency``).
Every blob is checked against its digest by the store as it lands (an S3
download is hashed range by range as the ranges arrive; a local blob is hashed
at disk speed) and becomes readable only once it matched, so a caller never
acts on a byte of a corrupt blob.  The caller waits for each blob in the order
it wants them while the later ones still download: the downloads and whatever
consumes the earlier blobs overlap.  Nothing here knows what the blobs hold.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from agent.store.arrival import Arrival
from agent.store.base import Store

# (bytes fetched so far, bytes of all the blobs), after each blob is complete.
FetchProgress = Callable[[int, int], None]


class Fetch:
    """The blobs ``(digest, size)`` of ``blobs`` fetched into a scratch directory
    under ``parent_dir``, started in ``order`` (indices into ``blobs``: the
    order the caller will want them in), by default from the last to the first
    (a chain lists its oldest layer first; a restore wants the newest first).

    Use as ``async with``: entering starts the downloads, leaving cancels what is
    still running, releases the readers and removes the scratch directory.  A
    blob is complete, and readable, only once the store verified its digest.
    """

    def __init__(
        self,
        store: Store,
        blobs: Sequence[tuple[str, int]],
        parent_dir: Path,
        *,
        progress: FetchProgress | None = None,
        order: Sequence[int] | None = None,
    ) -> None:
        self._store = store
        self._blobs = list(blobs)
        self._order = list(reversed(range(len(self._blobs)))) if order is None else list(order)
        if sorted(self._order) != list(range(len(self._blobs))):
            raise ValueError("the fetch order must name every blob once")
        self._parent_dir = parent_dir
        self._progress = progress
        self._arrivals = [Arrival() for _ in self._blobs]
        self._tasks: list[asyncio.Future[None]] = []
        self._dir: Path | None = None
        self._fetched = 0
        self._total = sum(size for _, size in self._blobs)

    async def __aenter__(self) -> Fetch:
        self._parent_dir.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="restore-", dir=self._parent_dir))
        sem = asyncio.Semaphore(max(1, self._store.fetch_concurrency))
        self._tasks = [asyncio.ensure_future(self._fetch(i, self._dir, sem)) for i in self._order]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for arrival in self._arrivals:
            arrival.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _fetch(self, index: int, workdir: Path, sem: asyncio.Semaphore) -> None:
        (digest, size), arrival = self._blobs[index], self._arrivals[index]
        try:
            async with sem:
                dest = workdir / digest.split(":")[-1]
                dest.mkdir(exist_ok=True)
                path = await self._store.get_blob(digest, size, dest, verify=True)
                # Readable from here on: all of it, verified.
                arrival.data(path, size)
        except BaseException as e:  # a reader, waiting for bytes, raises it too
            arrival.fail(e)
            raise
        arrival.finish(path)
        self._fetched += size
        if self._progress is not None:
            self._progress(self._fetched, self._total)

    async def wait(self) -> None:
        """Until every blob is complete; raises the first download's error."""
        await asyncio.gather(*self._tasks)

    # -- any thread -----------------------------------------------------------------

    def complete(self, index: int) -> Path | None:
        """The verified file of blob ``index`` if it is complete (read it directly)."""
        return self._arrivals[index].complete()

    def wait_complete(self, index: int) -> Path:
        """The verified file of blob ``index``, waiting (in a thread other than the
        event loop's) until it is; raises the download's error if it failed."""
        return self._arrivals[index].wait()

    def opener(self, index: int) -> Callable[[], BinaryIO]:
        """Gives a fresh reader of blob ``index`` from its first byte; a read waits
        until the blob is verified and raises the download's error if it failed."""
        return self._arrivals[index].open
