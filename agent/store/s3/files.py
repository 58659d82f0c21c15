"""Blob files read and written by offset from worker threads, a chunk at a time.

Blobs stream between their file and the connection; neither a blob nor a part
of one is ever held in memory, so a layer of any size moves in a few MiB.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from agent.errors import DigestMismatch, StoreError
from agent.store.retry import TruncatedBody

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from aiobotocore.response import StreamingBody

# Bytes read from disk per step when hashing, and gathered from the network per
# disk write when downloading: what one transfer holds in memory at most.
_IO_CHUNK = 1 << 20


class BlobFile:
    """A file read and written by offset from worker threads, and closed safely.

    A worker thread cannot be cancelled: the disk read or write of a transfer
    that was cancelled or failed (or aiohttp's read of a request body, in its
    executor) may still be running when its caller gives up and closes the
    file.  Every access and ``close`` share a lock, so no access can reach the
    descriptor's number after it was closed (and perhaps reused for another
    file).  The accesses are short (a MiB at most), so the lock costs nothing.
    """

    def __init__(self, path: Path, flags: int) -> None:
        self._fd = os.open(path, flags, 0o644)
        self.path = path
        self._lock = threading.Lock()
        self._closed = False

    def read_into(self, buf: memoryview, offset: int) -> int:
        with self._lock:
            self._check()
            return os.preadv(self._fd, [buf], offset)

    def write_at(self, chunks: list[bytes], offset: int) -> None:
        with self._lock:
            self._check()
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(self._fd, view, offset)
                    view, offset = view[n:], offset + n

    def truncate(self, size: int) -> None:
        with self._lock:
            self._check()
            os.ftruncate(self._fd, size)

    def _check(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path} is closed")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> BlobFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(src: Path, digest: str) -> BlobFile:
    try:
        return BlobFile(src, os.O_RDONLY)
    except OSError as e:
        raise StoreError(f"cannot read blob {digest} from {src}: {e.strerror or e}") from e


class _Part(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of a source, as a seekable stream.

    The request body of an upload: aiohttp reads it from disk (in its executor)
    a chunk at a time as it sends, where a part held as bytes would sit in
    memory whole, and twice over (botocore wraps bytes in a BytesIO, which
    aiohttp copies).
    """

    def __init__(self, source: BlobFile, offset: int, length: int) -> None:
        super().__init__()
        self._source = source
        self._offset = offset
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        if base + pos < 0:
            raise ValueError(f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos

    def readinto(self, buf: WriteableBuffer) -> int:
        view = memoryview(buf).cast("B")
        n = min(len(view), self._length - self._pos)
        if n <= 0:
            return 0
        got = self._source.read_into(view[:n], self._offset + self._pos)
        if got == 0:
            end = self._offset + self._length
            raise DigestMismatch(f"{self._source.path} ends before byte {end} (did it change?)")
        self._pos += got
        return got


def upload_body(source: BlobFile, offset: int, length: int) -> IO[bytes] | bytes:
    """An upload body for part of ``source`` (an empty one as bytes: nothing to stream)."""
    if length == 0:
        return b""
    # A RawIOBase is the binary file object botocore takes; the stubs only know IO.
    return cast("IO[bytes]", _Part(source, offset, length))


def hash_range(file: BlobFile, offset: int, length: int, *hashers: hashlib._Hash) -> None:
    """Feed ``length`` bytes of ``file`` from ``offset`` to every hasher, a chunk at a time."""
    buf = memoryview(bytearray(min(_IO_CHUNK, length) or 1))
    done = 0
    while done < length:
        n = file.read_into(buf[: min(len(buf), length - done)], offset + done)
        if n == 0:
            raise DigestMismatch(f"{file.path} ends before byte {offset + length} (did it change?)")
        for h in hashers:
            h.update(buf[:n])
        done += n


async def copy_body(
    body: StreamingBody, length: int, file: BlobFile, offset: int, hasher: hashlib._Hash | None
) -> int:
    """Stream a response body into ``file`` at ``offset``; return the bytes written.

    Chunks are handed to a worker thread about ``_IO_CHUNK`` at a time, as
    aiohttp returned them (not joined into one more copy), so hashing and disk
    writes run beside the network reads and a transfer holds at most that much.
    """
    got = 0
    held = 0
    chunks: list[bytes] = []
    while True:
        chunk = await body.read(_IO_CHUNK)
        if chunk:
            chunks.append(chunk)
            held += len(chunk)
            if got + held > length:
                raise TruncatedBody(f"more than the {length} bytes announced")
        if held >= _IO_CHUNK or (not chunk and chunks):
            await asyncio.to_thread(_write_at, file, offset + got, chunks, hasher)
            got += held
            held = 0
            chunks = []
        if not chunk:
            return got


def _write_at(
    file: BlobFile, offset: int, chunks: list[bytes], hasher: hashlib._Hash | None
) -> None:
    file.write_at(chunks, offset)
    if hasher is not None:
        for chunk in chunks:
            hasher.update(chunk)
