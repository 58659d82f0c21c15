"""The parent state: the root as the last checkpoint (or baseline) saw it.

Stored in walk order, one block per directory (its path, its entries' sorted
names and their records), so that a checkpoint reads it as a stream beside a
walk in the same order (a merge join, as git's index or restic's trees are
compared) and writes the next one as it goes: memory follows the largest
directory, not the number of files.  It is only ever read by the agent that
wrote it (it lives in the state dir, never in a checkpoint).

The file is a run of frames, each an independent zstd frame of some hundreds of
KiB of blocks, behind a small header that names its first and last directory
and counts its blocks and entries.  Each block keeps its directory's path and
entry count outside its ``marshal``'ed names and records.  So a checkpoint that
a change watch told what changed costs what changed: it copies the frames that
hold no directory the watch named as they are (neither decompressed nor
compressed again), and in the frames it rewrites, passes on the blocks it was
not told about without decoding them.  An end marker counts the frames, blocks
and entries, with a checksum of every frame header, so that a truncated file is
never taken for a smaller tree; zstd checksums each frame's content.

A state of the first (one marshal'ed dict) or second format (one zstd stream of
marshal'ed blocks) is read by converting it as it is read: an upgraded agent
carries on from it, and writes the current format.
"""

from __future__ import annotations

import errno
import marshal
import os
import queue
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import zstandard

from agent.checkpoint.scan import Stat, dir_key
from agent.errors import AgentError

# A directory's path, its entries' names (sorted) and their records.
Block = tuple[str, list[str], list[Stat]]

_MAGIC_V1 = b"STUDIO-STATE-1\n"
_MAGIC_V2 = b"STUDIO-STATE-2\n"
_MAGIC = b"STUDIO-STATE-3\n"
_V2_FRAME = struct.Struct("<I")
# A block: its path's length, its payload's length, its entries; then the path
# (UTF-8, as marshal writes the names) and the payload, marshal'ed (names, records).
_BLOCK = struct.Struct("<III")
# A frame's header: b"F", compressed and raw lengths, blocks, entries, the lengths
# of its first and last directory's paths; then the two paths and a CRC-32 of it all.
_HEAD = struct.Struct("<cIIIIII")
# The end: b"E", frames, blocks, entries, the CRC-32 of every frame header in
# order; then a CRC-32 of it.
_END = struct.Struct("<cQQQI")
_CRC = struct.Struct("<I")
_FRAME_RAW = 256 << 10  # a frame is cut once its blocks reach this
_QUEUE_DEPTH = 4
_READ_SIZE = 1 << 20
_COPY_CHUNK = 1 << 20
_ENCODING = ("utf-8", "surrogatepass")
# Decode errors that mean the file is not what this module wrote.
_CORRUPT = (zstandard.ZstdError, ValueError, EOFError, TypeError, struct.error)


def corrupt(path: Path | None, e: BaseException) -> AgentError:
    return AgentError(f"parent state {path} is corrupt ({e}); run baseline again")


def encode(d: str, names: list[str], records: list[Stat]) -> bytes:
    """A block as a frame holds it."""
    path = d.encode(*_ENCODING)
    payload = marshal.dumps((names, records))
    return _BLOCK.pack(len(path), len(payload), len(names)) + path + payload


class Stored:
    """One directory's block as the parent state holds it: its path and entry count
    read, its names and records decoded only when asked for (``decoded``)."""

    __slots__ = ("_at", "_decoded", "_path", "dir", "entries", "raw")

    def __init__(
        self,
        d: str,
        entries: int,
        raw: bytes | None,
        at: int = 0,
        decoded: tuple[list[str], list[Stat]] | None = None,
        path: Path | None = None,
    ) -> None:
        self.dir = d
        self.entries = entries
        self.raw = raw  # the block's encoding (``encode``), when known
        self._at = at  # where its payload starts in ``raw``
        self._decoded = decoded
        self._path = path  # the file it was read from (for the error)

    @classmethod
    def of(cls, block: Block, raw: bytes | None = None) -> Stored:
        """A block already decoded (``raw``: its encoding, when known)."""
        d, names, records = block
        at = 0 if raw is None else _BLOCK.size + _BLOCK.unpack_from(raw)[0]
        return cls(d, len(names), raw, at, (names, records))

    def decoded(self) -> tuple[list[str], list[Stat]]:
        """Its names and records (decoded once)."""
        if self._decoded is None:
            try:
                self._decoded = self._decode()
            except _CORRUPT as e:
                raise corrupt(self._path, e) from e
        return self._decoded

    def _decode(self) -> tuple[list[str], list[Stat]]:
        assert self.raw is not None
        value = marshal.loads(self.raw[self._at :])
        if not (isinstance(value, tuple) and len(value) == 2):
            raise ValueError("not a block")
        names, records = value
        if not (isinstance(names, list) and isinstance(records, list)):
            raise ValueError("not a block")
        if len(names) != self.entries or len(records) != self.entries:
            raise ValueError("a block's entries do not match its count")
        return names, records

    def block(self) -> Block:
        names, records = self.decoded()
        return self.dir, names, records

    def encoded(self) -> bytes:
        if self.raw is None:
            self.raw = encode(self.dir, *self.decoded())
        return self.raw


class Frame:
    """A run of consecutive blocks, compressed on their own: in a state file (its
    place there known, its content read only by ``stored``), or blocks read
    another way (``loose``: written on block by block)."""

    __slots__ = (
        "_items",
        "blocks",
        "entries",
        "first",
        "head",
        "last",
        "offset",
        "raw_size",
        "size",
        "source",
    )

    def __init__(
        self,
        first: str,
        last: str,
        blocks: int,
        entries: int,
        source: StateReader | None = None,
        offset: int = 0,
        head: bytes = b"",
        size: int = 0,
        raw_size: int = 0,
        items: list[Stored] | None = None,
    ) -> None:
        self.first = first
        self.last = last
        self.blocks = blocks
        self.entries = entries
        self.source = source  # the reader of the file it is in (None: loose)
        self.offset = offset  # where its header starts in that file
        self.head = head  # its header, as stored
        self.size = size  # header and content, in bytes
        self.raw_size = raw_size
        self._items = items

    @classmethod
    def loose(cls, item: Stored) -> Frame:
        return cls(item.dir, item.dir, 1, item.entries, items=[item])

    def stored(self) -> Iterator[Stored]:
        """Its blocks, in order (the content read and decompressed, not decoded;
        made one at a time, so that none is held once the caller is done with it)."""
        if self._items is not None:
            return iter(self._items)
        assert self.source is not None
        return self.source.split(self)


class StateWriter:
    """Writes a state block by block to ``path``, made visible whole at ``close``
    (written beside it, fsynced, renamed): a crash leaves no partial state there.

    Blocks gather into frames; each is compressed on a thread of its own (zstd
    lets go of the GIL), beside the walk that feeds it, with a few frames queued
    at most.  Frames copied whole from the parent state (``copy``) are copied on
    that thread too, in order, file to file.  So is the end of the file
    (``start_close``), while the caller finishes other work."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._tmp = path.with_name(path.name + ".tmp")
        self._file = open(self._tmp, "wb", buffering=0)  # noqa: SIM115 (closed by close or abandon)
        self._buf = bytearray()
        self._first = ""
        self._last = ""
        self._blocks = 0
        self._entries = 0
        self._copy: _Copy | None = None
        self._fds: dict[int, tuple[StateReader, int]] = {}  # the sources' fds, dup'ed
        # (the thread's: what the end marker counts)
        self._totals = [0, 0, 0]
        self._crc = 0
        self._queue: queue.Queue[_Raw | _Copy | None] = queue.Queue(_QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._closing = False  # the end is the thread's: it finishes the file
        self._committed = False  # the file is in place
        self._out = self._file.fileno()
        _write_all(self._out, _MAGIC)
        self._thread = threading.Thread(target=self._run, name="state-compress", daemon=True)
        self._thread.start()
        self.entries = 0

    def _run(self) -> None:
        cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
        item = self._queue.get()
        while item is not None:
            if self._error is None:
                try:
                    if isinstance(item, _Raw):
                        self._frame(cctx, item)
                    else:
                        self._copied(item)
                except BaseException as e:  # handed to the writer at its next write or close
                    self._error = e
            item = self._queue.get()
        if self._closing and self._error is None:
            try:
                frames, blocks, entries = self._totals
                end = _END.pack(b"E", frames, blocks, entries, self._crc)
                _write_all(self._out, end + _CRC.pack(zlib.crc32(end)))
                os.fsync(self._out)
                self._file.close()
                os.replace(self._tmp, self.path)
                self._committed = True
            except BaseException as e:  # raised by close
                self._error = e
        self._close_fds()

    def _frame(self, cctx: zstandard.ZstdCompressor, raw: _Raw) -> None:
        data = cctx.compress(raw.data)
        head = frame_head(len(data), len(raw.data), raw.first, raw.last, raw.blocks, raw.entries)
        self._count(head, raw.blocks, raw.entries)
        _write_all(self._out, head)
        _write_all(self._out, data)

    def _copied(self, c: _Copy) -> None:
        for head, blocks, entries in c.frames:
            self._count(head, blocks, entries)
        _copy_range(c.fd, self._out, c.offset, c.size)

    def _count(self, head: bytes, blocks: int, entries: int) -> None:
        totals = self._totals
        totals[0] += 1
        totals[1] += blocks
        totals[2] += entries
        self._crc = zlib.crc32(head, self._crc)

    def _put(self, item: _Raw | _Copy) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)  # the thread's from now on

    def write(self, block: Block, raw: bytes | None = None) -> None:
        """Add the next block; ``raw`` is its encoding when known already (a
        block as the parent state held it)."""
        d, names, records = block
        if not names:
            return
        if raw is not None:
            self._append(d, len(names), raw)
            return
        path = d.encode(*_ENCODING)
        payload = marshal.dumps((names, records))
        self._append(d, len(names), _BLOCK.pack(len(path), len(payload), len(names)), path, payload)

    def add(self, item: Stored) -> None:
        """Add the next block as the parent state held it (not decoded again)."""
        if item.entries:
            self._append(item.dir, item.entries, item.encoded())

    def _append(self, d: str, entries: int, *data: bytes) -> None:
        if self._copy is not None:
            self._put(self._copy)
            self._copy = None
        if not self._blocks:
            self._first = d
        self._last = d
        for part in data:
            self._buf += part
        self._blocks += 1
        self._entries += entries
        self.entries += entries
        if len(self._buf) >= _FRAME_RAW:
            self._cut()

    def _cut(self) -> None:
        self._put(_Raw(self._buf, self._first, self._last, self._blocks, self._entries))
        self._buf = bytearray()
        self._blocks = self._entries = 0

    def copy(self, frame: Frame) -> None:
        """Add the next frame whole: as it is stored, when it is in a state file."""
        # A frame that fits beside the blocks gathered (what is left of one
        # rewritten) joins them, so that rewrites do not leave ever more small frames.
        if frame.source is None or (self._blocks and len(self._buf) + frame.raw_size <= _FRAME_RAW):
            for item in frame.stored():
                self.add(item)
            return
        if self._blocks:
            self._cut()
        self.entries += frame.entries
        c = self._copy
        fd = self._fd(frame.source)
        if c is not None and c.fd == fd and c.offset + c.size == frame.offset:
            c.size += frame.size
        else:
            if c is not None:
                self._put(c)
            c = self._copy = _Copy(fd, frame.offset, frame.size, [])
        c.frames.append((frame.head, frame.blocks, frame.entries))

    def _fd(self, source: StateReader) -> int:
        """The source's file, open for the thread as long as it needs it."""
        held = self._fds.get(id(source))
        if held is None:
            held = self._fds[id(source)] = (source, os.dup(source.fileno()))
        return held[1]

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, {}
        for _, fd in fds.values():
            os.close(fd)

    def _stop(self) -> None:
        if self._thread.is_alive():
            if not self._closing:  # (a closing thread has its end queued already)
                self._queue.put(None)
            self._thread.join()
        self._close_fds()

    def start_close(self) -> None:
        """Hand the end of the file to the thread: the last blocks, the fsync and the
        rename into place go on while the caller does something else (``close``
        waits for them).  Nothing may be written after this."""
        if self._closing:
            return
        if self._blocks:
            self._cut()
        if self._copy is not None:
            self._put(self._copy)
            self._copy = None
        self._closing = True
        self._queue.put(None)

    def close(self) -> Path:
        """Finish the file and put it in place (on failure, nothing is left)."""
        try:
            self.start_close()
            self._thread.join()
            if self._error is not None:
                raise self._error
        except BaseException:
            self.abandon()
            raise
        return self.path

    def abandon(self) -> None:
        """Remove what was written, the file in place included if it got there."""
        self._stop()
        self._file.close()
        self._tmp.unlink(missing_ok=True)
        if self._committed:
            self.path.unlink(missing_ok=True)
            self._committed = False

    def __enter__(self) -> StateWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.close()
        else:
            self.abandon()


class _Raw:
    """Blocks to compress as one frame."""

    __slots__ = ("blocks", "data", "entries", "first", "last")

    def __init__(self, data: bytearray, first: str, last: str, blocks: int, entries: int) -> None:
        self.data = data
        self.first = first
        self.last = last
        self.blocks = blocks
        self.entries = entries


class _Copy:
    """Consecutive frames of a source file to copy as they are."""

    __slots__ = ("fd", "frames", "offset", "size")

    def __init__(
        self, fd: int, offset: int, size: int, frames: list[tuple[bytes, int, int]]
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.size = size
        self.frames = frames  # each one's header, blocks and entries


def frame_head(size: int, raw_size: int, first: str, last: str, blocks: int, entries: int) -> bytes:
    a, b = first.encode(*_ENCODING), last.encode(*_ENCODING)
    head = _HEAD.pack(b"F", size, raw_size, blocks, entries, len(a), len(b)) + a + b
    return head + _CRC.pack(zlib.crc32(head))


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src: int, dst: int, offset: int, size: int) -> None:
    """``size`` bytes of ``src`` from ``offset`` on appended to ``dst`` (in the
    kernel where it can: no pass through this process)."""
    end = offset + size
    try:
        while offset < end:
            n = os.copy_file_range(src, dst, end - offset, offset)
            if n == 0:
                raise EOFError("the parent state ends early")
            offset += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        while offset < end:
            data = os.pread(src, min(_COPY_CHUNK, end - offset), offset)
            if not data:
                raise EOFError("the parent state ends early") from None
            _write_all(dst, data)
            offset += len(data)


class StateBlocks:
    """A state's blocks in walk order, each decoded with its encoding (an unchanged
    directory is written on as it was read); or, through ``stored`` and
    ``frames``, read without decoding what the caller does not ask for."""

    def __init__(self, reader: StateReader) -> None:
        self.reader = reader

    def __iter__(self) -> Iterator[tuple[Block, bytes | None]]:
        for item in self.stored():
            yield item.block(), item.raw

    def stored(self) -> Iterator[Stored]:
        for frame in self.frames():
            yield from frame.stored()

    def frames(self) -> Iterator[Frame]:
        return self.reader.frames()


class StateReader:
    """Reads a state file: its frames, its blocks (``blocks``), in walk order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by close)
        try:
            magic = self._file.read(len(_MAGIC))
            self._size = os.fstat(self._file.fileno()).st_size
        except BaseException:
            self._file.close()
            raise
        if magic not in (_MAGIC, _MAGIC_V2, _MAGIC_V1):
            self._file.close()
            raise AgentError(f"parent state {path} has an unknown format; run baseline again")
        self._version = magic
        self._dctx = zstandard.ZstdDecompressor()

    def fileno(self) -> int:
        return self._file.fileno()

    def blocks(self) -> StateBlocks:
        return StateBlocks(self)

    def frames(self) -> Iterator[Frame]:
        """The frames in order, their headers read and checked (their content not
        read), the end marker checked once the last is passed; a state of an
        older format as loose frames, one block each."""
        try:
            if self._version == _MAGIC:
                yield from self._frames()
            elif self._version == _MAGIC_V2:
                yield from (Frame.loose(Stored.of(b)) for b in self._stream_v2())
            else:
                yield from (Frame.loose(Stored.of(b)) for b in blocks_of(self._load_v1()))
        except _CORRUPT as e:
            raise corrupt(self.path, e) from e

    def _frames(self) -> Iterator[Frame]:
        fd = self._file.fileno()
        pos = len(_MAGIC)
        frames = blocks = entries = crc = 0
        last_key = ""
        while True:
            fixed = os.pread(fd, _HEAD.size, pos)
            if fixed[:1] == b"E":
                break
            if len(fixed) < _HEAD.size:
                raise EOFError("the state ends early")
            tag, size, raw_size, n_blocks, n_entries, la, lb = _HEAD.unpack(fixed)
            if tag != b"F" or not n_blocks:
                raise ValueError("not a frame")
            names = os.pread(fd, la + lb + _CRC.size, pos + _HEAD.size)
            if len(names) < la + lb + _CRC.size:
                raise EOFError("the state ends early")
            head = fixed + names
            if _CRC.unpack_from(head, len(head) - _CRC.size)[0] != zlib.crc32(head[: -_CRC.size]):
                raise ValueError("a frame header's checksum does not match")
            first = names[:la].decode(*_ENCODING)
            last = names[la : la + lb].decode(*_ENCODING)
            key = dir_key(first)
            if (frames and key <= last_key) or dir_key(last) < key:
                raise ValueError("frames out of order")
            last_key = dir_key(last)
            if pos + len(head) + size > self._size:
                raise EOFError("the state ends early")
            frames += 1
            blocks += n_blocks
            entries += n_entries
            crc = zlib.crc32(head, crc)
            yield Frame(
                first, last, n_blocks, n_entries, self, pos, head, len(head) + size, raw_size
            )
            pos += len(head) + size
        end = os.pread(fd, _END.size + _CRC.size + 1, pos)
        if len(end) < _END.size + _CRC.size:
            raise EOFError("the state ends early")
        if len(end) > _END.size + _CRC.size:
            raise ValueError("data after the end of the state")
        if _CRC.unpack_from(end, _END.size)[0] != zlib.crc32(end[: _END.size]):
            raise ValueError("the end marker's checksum does not match")
        if _END.unpack_from(end) != (b"E", frames, blocks, entries, crc):
            raise ValueError("the end marker does not match the frames read")

    def split(self, frame: Frame) -> Iterator[Stored]:
        """A frame of this file read, decompressed, and cut into its blocks."""
        try:
            yield from self._split(frame)
        except _CORRUPT as e:
            raise corrupt(self.path, e) from e

    def _split(self, frame: Frame) -> Iterator[Stored]:
        at = frame.offset + len(frame.head)
        size = frame.size - len(frame.head)
        data = os.pread(self._file.fileno(), size, at)
        if len(data) < size:
            raise EOFError("the state ends early")
        raw = self._dctx.decompress(data)
        del data
        if len(raw) != frame.raw_size:
            raise ValueError("a frame's size does not match its header")
        pos = blocks = entries = 0
        unpack = _BLOCK.unpack_from
        head = _BLOCK.size
        path = self.path
        d = ""
        while pos < len(raw):
            la, lp, n = unpack(raw, pos)
            end = pos + head + la + lp
            if end > len(raw) or not n:
                raise ValueError("a block runs past its frame")
            d = raw[pos + head : pos + head + la].decode(*_ENCODING)
            if not blocks and d != frame.first:
                raise ValueError("a frame's first directory does not match its header")
            yield Stored(d, n, raw[pos:end], head + la, None, path)
            blocks += 1
            entries += n
            pos = end
        if blocks != frame.blocks or entries != frame.entries or d != frame.last:
            raise ValueError("a frame's blocks do not match its header")

    def _stream_v2(self) -> Iterator[Block]:
        reader = zstandard.ZstdDecompressor().stream_reader(self._file, closefd=False)
        buf = b""
        pos = 0
        loads = marshal.loads
        while True:
            if len(buf) - pos < _V2_FRAME.size:
                buf = self._more(reader, buf, pos, _V2_FRAME.size)
                pos = 0
            (n,) = _V2_FRAME.unpack_from(buf, pos)
            pos += _V2_FRAME.size
            if n == 0:
                return
            if len(buf) - pos < n:
                buf = self._more(reader, buf, pos, n)
                pos = 0
            block = loads(buf[pos : pos + n])
            pos += n
            if not (isinstance(block, tuple) and len(block) == 3):
                raise ValueError("not a block")
            yield block

    def _more(
        self, reader: zstandard.ZstdDecompressionReader, buf: bytes, pos: int, need: int
    ) -> bytes:
        parts = [buf[pos:]]
        have = len(parts[0])
        while have < need:
            chunk = reader.read(max(_READ_SIZE, need - have))
            if not chunk:
                raise EOFError("the state ends early")
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def _load_v1(self) -> dict[str, Stat]:
        data = self._file.read()
        entries = marshal.loads(zstandard.ZstdDecompressor().decompress(data))
        if not isinstance(entries, dict):
            raise ValueError("not a dict")
        return entries

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> StateReader:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# A parent state's blocks in walk order, each with its encoding when known.
ParentBlocks = Iterable[tuple[Block, bytes | None]]


def stored_of(parent: ParentBlocks) -> Iterator[Stored]:
    """The parent's blocks, not decoded yet when they come from a state file."""
    if isinstance(parent, StateBlocks):
        return parent.stored()
    return (Stored.of(block, raw) for block, raw in parent)


def frames_of(parent: ParentBlocks) -> Iterator[Frame]:
    """The parent's frames: a state file's as stored, or one block each."""
    if isinstance(parent, StateBlocks):
        return parent.frames()
    return (Frame.loose(Stored.of(block, raw)) for block, raw in parent)


def blocks_of(entries: dict[str, Stat]) -> list[Block]:
    """A path -> record dict as blocks in walk order (a whole scan, or the first format)."""
    by_dir: dict[str, list[tuple[str, Stat]]] = {}
    for path, rec in entries.items():
        head, _, name = path.rpartition("/")
        by_dir.setdefault(head, []).append((name, rec))
    out: list[Block] = []
    for d in sorted(by_dir, key=dir_key):
        items = sorted(by_dir[d])
        out.append((d, [n for n, _ in items], [r for _, r in items]))
    return out


def entries_of(blocks: Iterable[Block]) -> dict[str, Stat]:
    """Blocks as one path -> record dict (tests and small trees)."""
    out: dict[str, Stat] = {}
    for d, names, records in blocks:
        prefix = f"{d}/" if d else ""
        out.update(zip(map(prefix.__add__, names), records, strict=True))
    return out


def save_state(path: Path, entries: dict[str, Stat]) -> None:
    """Write a whole dict as a state file."""
    with StateWriter(path) as w:
        for block in blocks_of(entries):
            w.write(block)


def check_state(path: Path) -> int:
    """Read a state file through (as a stream), raising ``AgentError`` when it is
    unreadable or corrupt; how many entries it holds."""
    n = 0
    with StateReader(path) as r:
        for (_, names, _), _ in r.blocks():
            n += len(names)
    return n


def drop_unchanged(src: Path, dst: Path, drop: dict[str, Stat]) -> int:
    """Write ``src`` to ``dst`` without the entries of ``drop`` whose record it holds
    as ``drop`` gives it; how many it left out."""
    by_dir: dict[str, dict[str, Stat]] = {}
    for path, rec in drop.items():
        head, _, name = path.rpartition("/")
        by_dir.setdefault(head, {})[name] = rec
    dropped = 0
    with StateReader(src) as r, StateWriter(dst) as w:
        for item in r.blocks().stored():
            fix = by_dir.get(item.dir)
            if fix is None:
                w.add(item)
                continue
            d, names, recs = item.block()
            keep = [(n, rec) for n, rec in zip(names, recs, strict=True) if fix.get(n) != rec]
            dropped += len(names) - len(keep)
            w.write((d, [n for n, _ in keep], [rec for _, rec in keep]))
    return dropped


def load_state(path: Path) -> dict[str, Stat]:
    """A whole state file as one dict (tests and small trees)."""
    with StateReader(path) as r:
        return entries_of(b for b, _ in r.blocks())
