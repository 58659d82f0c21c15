"""A cut layer's segments, each stored under its digest as soon as it is complete.

The layer writer cuts a large layer between entries (``LayerWriter``) and hands
each complete segment over on its compressing thread; here it goes to the event
loop, which names it in the session lease and then stores it, while the walk and
the compression go on with the next.  So the store's work follows the layer as
``tar | zstd | aws s3 cp -`` follows it, and nothing is copied once the last
byte is known: what is left then is the last segment's put.

At most ``IN_FLIGHT`` segments are being stored at once: the compressing thread
waits for the oldest beyond that, so a slow store holds the walk back instead of
filling the spool, and a failed one stops the layer at the next cut.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO, cast

from agent.checkpoint.layer_writer import Segment
from agent.errors import AgentError
from agent.session.leftovers import layer_spool_name
from agent.statedir import create_file
from agent.store.base import SpooledBlob, Store

IN_FLIGHT = 2

# Names the blobs (every segment so far) in the session lease before any is stored.
Cover = Callable[[list[str]], Awaitable[None]]


class SegmentUploads:
    """The spool files of one cut layer's segments, and their stores in flight."""

    def __init__(self, store: Store, spool: Path, holder: str, cover: Cover) -> None:
        self._store = store
        self._spool = spool
        self._holder = holder
        self._cover = cover
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()  # one lease write at a time, each naming more
        self._digests: list[str] = []
        self._stores: list[concurrent.futures.Future[None]] = []
        self.sinks: list[SpooledBlob] = []  # every segment's, the one being written last
        # Held by the compressing thread to add a segment and by ``discard`` to
        # close: once closed, no sink or store is added, so discard sees them all.
        self._guard = threading.Lock()
        self._closed = False  # discarded: a walk the caller gave up on gets no more
        self._final = False  # the lease names the whole layer: no narrower write after

    def open(self) -> BinaryIO:
        """The next segment's output: a new spool file."""
        with self._guard:
            self._check_open()
            path = self._spool / layer_spool_name(f"{self._holder}/{uuid.uuid4().hex}")
            sink = SpooledBlob(self._store, create_file(path), path)
            self.sinks.append(sink)
        return cast(BinaryIO, sink)  # all a layer writer asks of its output: write

    def _check_open(self) -> None:
        if self._closed:
            raise AgentError("the checkpoint was given up: no more segments")

    def next_segment(self, segment: Segment) -> BinaryIO:
        """``NextSegment``, on the compressing thread: store the segment just
        complete (in the last sink), and give the next one's output."""
        if len(self._stores) >= IN_FLIGHT:
            self._stores[-IN_FLIGHT].result()  # raises what storing it raised
        with self._guard:
            self._check_open()
            sink = self.sinks[-1]
            self._stores.append(
                asyncio.run_coroutine_threadsafe(self._store_one(sink, segment), self._loop)
            )
        return self.open()

    async def _store_one(self, sink: SpooledBlob, segment: Segment) -> None:
        if self._closed:
            return  # given up before it began: nothing named, nothing stored
        async with self._lock:
            if self._closed:
                return
            if not self._final:  # (else the final write named it, with every other)
                self._digests.append(segment.digest)
                await self._cover(list(self._digests))
        if not self._closed:  # (a put begun is waited for by ``discard``)
            await sink.commit(segment.digest, segment.size)

    async def cover_last(self, cover: Callable[[], Awaitable[None]]) -> None:
        """The lease write naming the whole layer (and its manifest), made after
        every segment's own, so none of theirs can put back a narrower one."""
        async with self._lock:
            self._final = True
            try:
                await cover()
            except BaseException:
                self._final = False  # not named after all: each still names its own
                raise

    async def stored(self) -> None:
        """Wait until every segment handed over is stored; raise the first failure."""
        await asyncio.gather(*(asyncio.wrap_future(f) for f in self._stores))

    async def discard(self) -> None:
        """Wait out what is in flight (a put is never cut short half way), then drop
        every spool file.  Segments already stored stay for gc: nothing names them."""
        with self._guard:  # (held by the other thread only to add one)
            self._closed = True
        pending = (asyncio.wrap_future(f) for f in self._stores)
        await asyncio.gather(*pending, return_exceptions=True)
        for sink in self.sinks:
            await sink.discard()
