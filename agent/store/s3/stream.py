"""A blob uploaded while it is written, as ``zstd | aws s3 cp -`` uploads a stream.

A layer's digest is known only once its last byte is compressed, and a
multipart upload names its key when it starts, so the parts go to a temporary
key, ``<root>/uploads/<owner>/<id>``, as they fill: each is sent once the bytes
after it begin, read back from the spool file (so memory holds no part, and a
slow store only lets the spool grow), a bounded number at a time.  Each part's
CRC32 is computed from the bytes as they are written, before they reach the
file, and S3 checks every part against it: what S3 holds is what the writer
hashed.  ``commit`` completes the temporary object, then copies it inside S3
to ``blobs/sha256/<hex>``, only while its ETag is the one this writer completed
(``CopySourceIfMatch``), so nothing else at the temporary key can become a
blob, and with S3's own CRC32 of the copy checked against the writer's of the
bytes it wrote; then deletes the temporary object, while the caller goes on
(``discard`` waits for that).  A blob already stored is refreshed instead.

CRC32 rather than SHA-256 for these checks: they only guard the transfer and
the copy (the digest is the writer's SHA-256 of the very bytes it wrote, and
every reader checks it), and CRC32, which the AWS SDKs use by default for that,
costs the writer and the server a fraction of a SHA-256 (moto, hashing the copy
with SHA-256, spends about 0.4 s more CPU per 150 MB).

A blob that ends within one part never starts a multipart upload: it is put
from the spool file straight to its content address, checked by S3 against
the digest itself.

What a killed writer leaves under ``uploads/`` (an incomplete upload, or a
completed temporary object) is removed at its next start (the spool file it
left names it) or by gc, which spares the uploads of owners whose session
lease is live.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import AgentError, DigestMismatch
from agent.log import get_logger
from agent.store.base import BlobSink
from agent.store.s3.client import Connection
from agent.store.s3.files import BlobFile, open_source
from agent.store.s3.upload import MAX_PARTS, Uploader

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = get_logger("store.s3")

# Parts per step of size: after every PARTS_PER_STEP parts the part size grows by
# the first one's, so 10,000 parts of 16 MiB to start with hold 880 GB.
PARTS_PER_STEP = MAX_PARTS // 10


class StreamedBlob(BlobSink):
    """One blob's bytes: to the spool file, and part by part to a temporary key."""

    def __init__(
        self,
        conn: Connection,
        uploader: Uploader,
        *,
        fd: int,
        spool: Path,
        temp_key: str,
        blob_key: Callable[[str], str],
        put_file: Callable[[Path, str, int], Awaitable[None]],
        stored: Callable[[], Awaitable[None]],
    ) -> None:
        self._conn = conn
        self._uploader = uploader
        self._spool = spool
        self._key = temp_key
        self._blob_key = blob_key
        self._put_file = put_file
        self._stored = stored
        self._loop = asyncio.get_running_loop()
        # -- the writing thread's ------------------------------------------------------
        self._fd: int | None = fd
        self._lock = threading.Lock()  # writes against close
        self.written = 0
        self._number = 1  # the part being filled
        self._start = 0  # its offset
        self._fill = 0  # its bytes so far
        self._crc = 0  # their CRC32
        self._whole_crc = 0  # every byte's, for the check of the copy
        # -- the event loop's ------------------------------------------------------------
        self._error: BaseException | None = None  # the first failed part (read by write)
        # What the part uploads read, opened now: the spool file exists already.
        self._source: BlobFile = open_source(spool, f"upload {temp_key}")
        self._create: asyncio.Future[tuple[str, bool]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._parts: dict[int, CompletedPartTypeDef] = {}
        self._etag: str | None = None  # the temporary object's, once completed
        self._finished = False
        self._done = False  # committed or discarded
        self._times: dict[str, float] = {}  # what the tail took, for the log
        self._removing: asyncio.Task[None] | None = None  # the temporary object's deletion

    def _part_size(self, number: int) -> int:
        return self._uploader.part_size * (1 + (number - 1) // PARTS_PER_STEP)

    # -- the writing thread -----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._error is not None:
            raise self._error
        view = memoryview(data).cast("B")
        n = len(view)
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self._spool} is closed")
            rest = view
            while rest:
                rest = rest[os.write(self._fd, rest) :]
            self._whole_crc = zlib.crc32(view, self._whole_crc)
            pos = 0
            while pos < n:
                size = self._part_size(self._number)
                if self._fill == size:  # full, and more follows: it can go
                    self._loop.call_soon_threadsafe(self._start_part, *self._next_part())
                    size = self._part_size(self._number)
                take = min(size - self._fill, n - pos)
                self._crc = zlib.crc32(view[pos : pos + take], self._crc)
                self._fill += take
                pos += take
            self.written += n
        return n

    def _next_part(self) -> tuple[int, int, int, str]:
        """The part being filled, as (number, offset, length, checksum); start the next."""
        checksum = base64.b64encode(self._crc.to_bytes(4, "big")).decode()
        part = (self._number, self._start, self._fill, checksum)
        self._number, self._start, self._fill = self._number + 1, self._start + self._fill, 0
        self._crc = 0
        return part

    def _close_file(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # -- the event loop -----------------------------------------------------------------

    def _start_part(self, number: int, offset: int, length: int, checksum: str) -> None:
        if self._done:
            return  # discarded meanwhile
        if self._create is None:
            self._create = asyncio.ensure_future(self._uploader.create(self._key, "CRC32"))
        task = asyncio.ensure_future(self._part(number, offset, length, checksum))
        self._tasks.add(task)
        task.add_done_callback(self._part_done)

    async def _part(self, number: int, offset: int, length: int, checksum: str) -> None:
        assert self._create is not None
        upload_id, _ = await asyncio.shield(self._create)
        self._parts[number] = await self._uploader.upload_part(
            self._source, self._key, upload_id, number, offset, length, checksum, algorithm="CRC32"
        )

    def _part_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and self._error is None:
            self._error = error  # the writer stops at its next write
        elif error is None:
            self._tasks.discard(task)

    async def finish(self) -> None:
        """Send the last part and complete the temporary object (not needed: one part)."""
        if self._finished:
            return
        self._finished = True
        self._close_file()
        if self._create is None:
            return  # nothing sent: ``commit`` puts the file whole
        # The writer is done, and the parts it handed over were started before its
        # end was reported here; the last one has at least a byte.
        t0 = time.monotonic()
        self._times["parts_left"] = len(self._tasks) + 1
        self._start_part(*self._next_part())
        await asyncio.gather(*self._tasks)
        t1 = time.monotonic()
        upload_id, _ = await self._create
        parts = [self._parts[n] for n in range(1, self._number)]
        self._etag = await self._uploader.complete(self._key, upload_id, parts, self.written)
        self._times |= {"parts_s": t1 - t0, "complete_s": time.monotonic() - t1}

    async def commit(self, digest: str, size: int) -> None:
        await self.finish()
        if size != self.written:
            raise DigestMismatch(f"blob {digest}: {self.written} bytes written, expected {size}")
        if self._etag is None:  # within one part: put straight to the content address
            await self._put_file(self._spool, digest, size)
            self._done = True
            return
        key = self._blob_key(digest)
        t0 = time.monotonic()
        # An object of the wrong size under a content address is damaged: replace it.
        # One of the right size is refreshed instead (gone meanwhile: copied).
        if await self._conn.size_of(key) != size or not await self._uploader.refresh(key):
            await self._uploader.copy(self._key, self._etag, key, size, self._whole_crc)
            await self._stored()
        self._done = True
        log.info(
            "s3.streamed",
            key=self._conn.where(key),
            size=size,
            parts=self._number - 1,
            **{k: round(v, 3) for k, v in self._times.items()},
            copy_s=round(time.monotonic() - t0, 3),
        )
        # The blob is stored: the temporary object goes while the caller goes on.
        self._removing = asyncio.ensure_future(self._remove_temporary())

    async def discard(self) -> None:
        if self._removing is not None:
            await asyncio.shield(self._removing)
        if self._done:
            return
        self._done = True
        self._close_file()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._etag is not None:
            await self._remove_temporary()
        elif self._create is not None:
            (created,) = await asyncio.gather(self._create, return_exceptions=True)
            if isinstance(created, tuple):
                await self._uploader.abort(self._key, created[0])
                if created[1]:
                    await self._uploader.sweep(self._key, keep=None)
        self._release()

    def _release(self) -> None:
        """Done with the spool file: close it and remove it."""
        self._source.close()
        self._spool.unlink(missing_ok=True)

    async def _remove_temporary(self) -> None:
        """Delete the completed temporary object (left for gc if that fails), and
        any upload a lost answer to its creation started."""
        key, bucket = self._key, self._conn.bucket
        try:
            await asyncio.shield(
                self._conn.call(
                    "DeleteObject", key, lambda c: c.delete_object(Bucket=bucket, Key=key)
                )
            )
        except AgentError as e:
            log.warning("s3.temporary_left", key=self._conn.where(key), error=str(e))
        assert self._create is not None
        if self._create.result()[1]:
            await self._uploader.sweep(key, keep=None)
        self._release()
