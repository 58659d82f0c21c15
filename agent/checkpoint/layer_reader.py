"""Read a zstd-compressed tar layer as a stream of members, strictly.

Content is never held whole: the caller copies each member's bytes to a file
descriptor or skips them.  Anything malformed (bad zstd, bad checksum, an
archive that ends early, oversized PAX headers, unknown entry types) raises
``CorruptLayer``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO, cast

import zstandard

from agent.checkpoint import tarformat as tf
from agent.errors import CorruptLayer, DigestMismatch

READ_SIZE = 1 << 20
# _untar.write_files: (buffer, position, *arguments) -> (position, names, content bytes)
RunWriter = Callable[..., tuple[int, list[str], int]]
_EXTENDED = {tf.XHDTYPE, tf.XGLTYPE, tf.GNU_LONGNAME, tf.GNU_LONGLINK}
_KNOWN_TYPES = {
    tf.REGTYPE,
    tf.AREGTYPE,
    tf.CONTTYPE,
    tf.LNKTYPE,
    tf.SYMTYPE,
    tf.CHRTYPE,
    tf.BLKTYPE,
    tf.DIRTYPE,
    tf.FIFOTYPE,
}


class _Hashing:
    """The compressed file, hashed as zstd reads it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def finish(self, digest: str, size: int | None, name: str) -> None:
        """Hash what zstd left unread and compare: raises ``DigestMismatch``."""
        while self.read(READ_SIZE):
            pass
        if size is not None and self.size != size:
            raise DigestMismatch(f"{name}: blob {digest} has {self.size} bytes, expected {size}")
        got = "sha256:" + self.hash.hexdigest()
        if got != digest:
            raise DigestMismatch(f"{name}: blob {digest} is corrupt: its bytes hash to {got}")


class LayerReader:
    """Decompresses in a thread of its own (zstd releases the GIL), so restoring
    files and decompressing the next megabytes overlap, as in ``zstd -d | tar -x``.

    Given ``digest`` (and ``size``), the same thread hashes the compressed bytes
    as it reads them and ends the stream with ``DigestMismatch`` instead of its
    end when they do not match: the layer is verified without a pass of its own.
    """

    def __init__(
        self, f: BinaryIO, name: str = "layer", digest: str | None = None, size: int | None = None
    ) -> None:
        self._hashing = _Hashing(f) if digest is not None else None
        self._expect = (digest or "", size)
        source = cast(BinaryIO, self._hashing) if self._hashing is not None else f
        self._z = zstandard.ZstdDecompressor().stream_reader(source, read_size=READ_SIZE)
        self._name = name
        self._buf = b""
        self._pos = 0
        self._taken = 0  # uncompressed bytes of the buffers before ``_buf``
        self._member_end = 0  # where the member last handed out ends, padding included
        self._pax_global = False  # a global PAX header was read: it applies to what follows
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        self._eof = False
        self._thread = threading.Thread(target=self._produce, name="layer-decompress", daemon=True)
        self._thread.start()

    def __enter__(self) -> LayerReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._chunks.get(timeout=0.1)
        self._thread.join()

    def _produce(self) -> None:
        while not self._stop.is_set():
            item: bytes | BaseException
            try:
                item = self._z.read(READ_SIZE)
                if not item and self._hashing is not None:
                    self._hashing.finish(*self._expect, self._name)
            except zstandard.ZstdError as e:
                item = CorruptLayer(f"{self._name}: corrupt zstd data ({e})")
                if self._hashing is not None:  # a wrong digest says more, if it is one
                    try:
                        self._hashing.finish(*self._expect, self._name)
                    except BaseException as wrong:
                        item = wrong
            except BaseException as e:  # handed to the reader, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._chunks.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, bytes) or not item:
                return

    # -- byte level -----------------------------------------------------------

    @property
    def consumed(self) -> int:
        """Uncompressed bytes handed out so far."""
        return self._taken + self._pos

    def _more(self) -> bytes:
        if self._eof:
            return b""
        item = self._chunks.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        if not item:
            self._eof = True
        return item

    def _fill(self, n: int) -> None:
        """Make the buffer hold at least ``n`` bytes from the current position."""
        avail = len(self._buf) - self._pos
        if avail >= n:
            return
        parts = [self._buf[self._pos :]]
        while avail < n:
            data = self._more()
            if not data:
                raise CorruptLayer(f"{self._name} is truncated (archive ends early)")
            parts.append(data)
            avail += len(data)
        self._taken += self._pos
        self._buf = b"".join(parts)
        self._pos = 0

    def read(self, n: int) -> bytes:
        self._fill(n)
        pos = self._pos
        self._pos = pos + n
        return self._buf[pos : pos + n]

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next ``n`` bytes to ``fd``."""
        self._advance(n, fd)

    def skip(self, n: int) -> None:
        self._advance(n, None)

    def _refill(self) -> None:
        """The current buffer is used up: the next one."""
        self._taken += len(self._buf)
        self._buf = self._more()
        self._pos = 0
        if not self._buf:
            raise CorruptLayer(f"{self._name} is truncated (archive ends early)")

    def take(self, n: int) -> list[bytes]:
        """The next ``n`` bytes, as pieces to write later from another thread:
        copies (a slice of a decompressed buffer would keep all of it alive),
        except a buffer taken whole."""
        out = []
        while n:
            buf, pos = self._buf, self._pos
            k = min(len(buf) - pos, n)
            if not k:
                self._refill()
                continue
            out.append(buf[pos : pos + k])
            self._pos = pos + k
            n -= k
        return out

    def _advance(self, n: int, fd: int | None) -> None:
        """Consume ``n`` bytes, writing them to ``fd`` unless it is None."""
        while n:
            buf, pos = self._buf, self._pos
            k = min(len(buf) - pos, n)
            if not k:
                self._refill()
                continue
            if fd is not None:
                view = memoryview(buf)[pos : pos + k]
                while view:
                    view = view[os.write(fd, view) :]
            self._pos = pos + k
            n -= k

    # -- member level -----------------------------------------------------------

    def members(self) -> Iterator[tf.Member]:
        """Members in archive order.  A member's content may be consumed
        (``copy_to`` or ``skip``, in order) before the next is asked for; what is
        left of it, and the padding, is skipped here."""
        pax_global: dict[bytes, bytes] = {}
        pax: dict[bytes, bytes] = {}
        mtime_ns: int | None = None
        long_name: str | None = None
        long_link: str | None = None
        B = tf.BLOCK
        mtime_blocks = tf.MTIME_PAX_BLOCKS
        parse_header = tf.parse_header
        while True:
            if len(self._buf) - self._pos < B:
                self._fill(B)
            buf, pos = self._buf, self._pos
            block = buf[pos : pos + B]
            kind = block[156:157]
            if kind == tf.XHDTYPE and (length := mtime_blocks.get(block)) is not None:
                # Our writer's PAX header for a nanosecond mtime alone: its one
                # record, then the member's own header block.
                if len(buf) - pos < 3 * B:
                    self._fill(3 * B)
                    buf, pos = self._buf, self._pos
                mtime_ns = tf.parse_mtime_record(buf[pos + B : pos + B + length])
                pax = {}
                pos += 2 * B
                block = buf[pos : pos + B]
                kind = block[156:157]
            self._pos = pos = pos + B
            if kind in _EXTENDED:
                size = tf.extended_size(block)
                if size > tf.MAX_PAX_SIZE:
                    raise CorruptLayer(f"{self._name}: extended header of {size} bytes")
                data = self.read(size + (-size % B))[:size]
                if kind == tf.XHDTYPE:
                    pax = tf.parse_pax(data)
                    mtime_ns = None
                elif kind == tf.XGLTYPE:
                    pax_global.update(tf.parse_pax(data))
                    self._pax_global = True
                elif kind == tf.GNU_LONGNAME:
                    long_name = os.fsdecode(data.split(b"\0", 1)[0])
                else:
                    long_link = os.fsdecode(data.split(b"\0", 1)[0])
                continue
            m = parse_header(block)
            if m is None:
                self._drain()
                return
            if kind not in _KNOWN_TYPES:
                raise CorruptLayer(f"{self._name}: unsupported tar entry type {kind!r}")
            if long_name is not None:
                m.name = long_name
                long_name = None
            if long_link is not None:
                m.linkname = long_link
                long_link = None
            if pax_global:
                tf.apply_pax(m, pax_global)
            if pax:
                tf.apply_pax(m, pax)
                pax = {}
            elif mtime_ns is not None:
                m.mtime_ns = mtime_ns
                mtime_ns = None
            size = m.size
            self._member_end = self._taken + pos + size + (-size % B)
            yield m
            left = self._member_end - (self._taken + self._pos)
            if left < 0:
                raise CorruptLayer(f"{self._name}: read past the end of {m.name!r}")
            if left:
                if len(self._buf) - self._pos >= left:
                    self._pos += left
                else:
                    self.skip(left)

    def write_run(self, write: RunWriter, *args: int | bytes) -> tuple[list[str], int]:
        """Hand the entries after the member last handed out (its content
        consumed) to ``write`` (``_untar.write_files``, with ``args`` after the
        buffer and position), which writes those of a run it can and returns
        where it stopped: the names written, their content bytes.  ``members``
        goes on from there.  Nothing is handed over once a global PAX header
        applies, or where the member's padding is not in the buffer."""
        start = self._member_end - self._taken
        if self._pax_global or start > len(self._buf) or start < self._pos:
            return [], 0
        pos, names, content = write(self._buf, start, *args)
        if names:
            self._pos = pos
            self._member_end = self._taken + pos
        return names, content

    def _drain(self) -> None:
        """Read to the end so a damaged frame tail is still noticed."""
        self._taken += self._pos
        self._buf = b""
        self._pos = 0
        while self._more():
            pass
