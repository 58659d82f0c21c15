"""The parent state: the root as the last checkpoint (or baseline) saw it.

Stored in walk order, one block per directory (its path, its entries' sorted
names and their records), so that a checkpoint reads it as a stream beside a
walk in the same order (a merge join, as git's index or restic's trees are
compared) and writes the next one as it goes: memory follows the largest
directory, not the number of files.  The file is a zstd stream of length-framed
``marshal`` blocks, ended by an empty frame so that a truncated file is never
taken for a smaller tree.  It is only ever read by the agent that wrote it (it
lives in the state dir, never in a checkpoint).

A state in the first format (one marshal'ed dict) is read by converting it, in
memory, once: an upgraded agent carries on from it.
"""

from __future__ import annotations

import marshal
import os
import queue
import struct
import threading
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
_MAGIC = b"STUDIO-STATE-2\n"
_FRAME = struct.Struct("<I")
_READ_SIZE = 1 << 20
_WRITE_SIZE = 1 << 20
_QUEUE_DEPTH = 4


class StateWriter:
    """Writes a state block by block to ``path``, made visible whole at ``close``
    (written beside it, fsynced, renamed): a crash leaves no partial state there.

    Compression runs on a thread of its own (zstd lets go of the GIL), beside the
    walk that feeds it, with a few buffers of 1 MiB queued at most; so does the
    end of the file (``start_close``), while the caller finishes other work."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._tmp = path.with_name(path.name + ".tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by close or abandon)
        self._file.write(_MAGIC)
        self._zw = zstandard.ZstdCompressor(level=1).stream_writer(self._file, closefd=False)
        self._buf = bytearray()
        self._queue: queue.Queue[bytearray | None] = queue.Queue(_QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._closing = False  # the end is the thread's: it finishes the file
        self._committed = False  # the file is in place
        self._thread = threading.Thread(target=self._run, name="state-compress", daemon=True)
        self._thread.start()
        self.entries = 0

    def _run(self) -> None:
        data = self._queue.get()
        while data is not None:
            if self._error is None:
                try:
                    self._zw.write(data)
                except BaseException as e:  # handed to the writer at its next write or close
                    self._error = e
            data = self._queue.get()
        if self._closing and self._error is None:
            try:
                self._zw.flush(zstandard.FLUSH_FRAME)
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                os.replace(self._tmp, self.path)
                self._committed = True
            except BaseException as e:  # raised by close
                self._error = e

    def write(self, block: Block, raw: bytes | None = None) -> None:
        """Add the next block; ``raw`` is its marshal'ed form when known already."""
        names = block[1]
        if not names:
            return
        data = marshal.dumps(block) if raw is None else raw
        self._buf += _FRAME.pack(len(data))
        self._buf += data
        self.entries += len(names)
        if len(self._buf) >= _WRITE_SIZE:
            if self._error is not None:
                raise self._error
            self._queue.put(self._buf)  # the thread's from now on
            self._buf = bytearray()

    def _stop(self) -> None:
        if self._thread.is_alive():
            if not self._closing:  # (a closing thread has its end queued already)
                self._queue.put(None)
            self._thread.join()

    def start_close(self) -> None:
        """Hand the end of the file to the thread: the last blocks, the fsync and the
        rename into place go on while the caller does something else (``close``
        waits for them).  Nothing may be written after this."""
        if self._closing:
            return
        self._closing = True
        self._buf += _FRAME.pack(0)
        self._queue.put(self._buf)
        self._buf = bytearray()
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


class StateReader:
    """Reads a state file's blocks in walk order, each with its marshal'ed form
    (an unchanged directory is written on as it was read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by close)
        try:
            magic = self._file.read(len(_MAGIC))
        except BaseException:
            self._file.close()
            raise
        self._v1 = magic == _MAGIC_V1
        if magic != _MAGIC and not self._v1:
            self._file.close()
            raise AgentError(f"parent state {path} has an unknown format; run baseline again")

    def blocks(self) -> Iterator[tuple[Block, bytes | None]]:
        try:
            if self._v1:
                yield from ((b, None) for b in blocks_of(self._load_v1()))
            else:
                yield from self._stream()
        except (zstandard.ZstdError, ValueError, EOFError, TypeError, struct.error) as e:
            raise AgentError(
                f"parent state {self.path} is corrupt ({e}); run baseline again"
            ) from e

    def _stream(self) -> Iterator[tuple[Block, bytes | None]]:
        reader = zstandard.ZstdDecompressor().stream_reader(self._file, closefd=False)
        buf = b""
        pos = 0
        loads = marshal.loads
        while True:
            if len(buf) - pos < _FRAME.size:
                buf = self._more(reader, buf, pos, _FRAME.size)
                pos = 0
            (n,) = _FRAME.unpack_from(buf, pos)
            pos += _FRAME.size
            if n == 0:
                return
            if len(buf) - pos < n:
                buf = self._more(reader, buf, pos, n)
                pos = 0
            raw = buf[pos : pos + n]
            pos += n
            block = loads(raw)
            if not (isinstance(block, tuple) and len(block) == 3):
                raise ValueError("not a block")
            yield block, raw

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
        for (d, names, recs), raw in r.blocks():
            fix = by_dir.get(d)
            if fix is None:
                w.write((d, names, recs), raw)
                continue
            keep = [(n, rec) for n, rec in zip(names, recs, strict=True) if fix.get(n) != rec]
            dropped += len(names) - len(keep)
            w.write((d, [n for n, _ in keep], [rec for _, rec in keep]))
    return dropped


def load_state(path: Path) -> dict[str, Stat]:
    """A whole state file as one dict (tests and small trees)."""
    with StateReader(path) as r:
        return entries_of(b for b, _ in r.blocks())
