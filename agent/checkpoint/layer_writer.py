"""Write a set of changes as one zstd-compressed PAX tar layer.

Entries come one at a time (``LayerWriter``), so a checkpoint writes each as its
walk finds it.  No per-member objects: headers come from ``tarformat.encode_header``
into a buffer that is handed, in large slices, to a thread of its own that feeds
the (multi-threaded) zstd compressor and hashes the compressed bytes on their
way to the file, so the layer's digest is known the moment it is written.  As
in ``tar | zstd``, reading files and compressing overlap.  Memory stays bounded:
small files are read whole, large ones in chunks, a few slices are queued,
never a whole layer.

A file that changes while it is read is still written consistently (exactly
the size its header declares) and its record is "poisoned" so the next
checkpoint sees it as modified and writes it again.

A directory's changed entries come together (``add_listing``): runs of small
plain files are read and framed by the compiled ``_tarfiles`` in one call each,
without the GIL; in Python, the open, listxattr, read, fstat and close of each,
and its header, cost more than those system calls.  What it does not frame, and
every file when it is not built, goes through ``add``, with the same bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import stat as st
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from agent.checkpoint import tarformat as tf
from agent.checkpoint.diff import Changes
from agent.checkpoint.paths import symlink_escapes
from agent.checkpoint.scan import (
    CTIME,
    GID,
    INO,
    MODE,
    MTIME,
    NLINK,
    SIZE,
    TARGET,
    UID,
    Stat,
    join_path,
    open_dir,
    stat_record,
)
from agent.errors import AgentError

_Framer = Callable[
    [bytearray, int, bytes, list[str], list[Stat], list[int], int, int, int],
    tuple[int, int, list[int]],
]
_frame_files: _Framer | None
try:
    from agent.checkpoint._tarfiles import frame_files as _frame_files
except ImportError:  # not built (a source tree without a compiler): ``add`` writes them all
    _frame_files = None

FLUSH_AT = 1 << 20
CHUNK = 1 << 20
WHOLE_FILE_MAX = 1 << 20
# Smaller zstd jobs than the default bound the compressor's buffers (each worker
# holds a job's input and output, about 5 MB in all at 2 MiB): the same speed,
# output 0.5% larger than with 4 MiB jobs.  By default there are at most
# MAX_THREADS workers, so a checkpoint stays within its memory bound on a
# machine of many CPUs; more are seldom faster (the reader is one thread).
JOB_SIZE = 2 << 20
MAX_THREADS = 4
# Slices queued for the compressing thread: each holds at most FLUSH_AT plus one
# small file, so a few MiB wait at most.
QUEUE_DEPTH = 4
# A cut layer's segments grow by the first one's size every this many, so a TiB
# of compressed layer makes about 1,200 of them (the largest 1.7 GiB at 12 MiB).
SEGMENTS_PER_STEP = 8
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

# (entries written, content bytes written)
WriteProgress = Callable[[int, int], None]


class Cancelled(AgentError):
    """The layer was abandoned before it was complete."""


def _unreadable_after_header(path: str, e: OSError) -> AgentError:
    """A file that failed once its header was out: the layer can't be trusted, so
    this checkpoint fails and the previous one stands."""
    return AgentError(f"cannot read {path}: {e.strerror}")


@dataclass(frozen=True, slots=True)
class Segment:
    """A complete segment of a layer cut into several: a blob of its own, a tar
    of whole entries in one zstd frame, the checkpoint's next one after it."""

    digest: str
    size: int
    uncompressed: int
    entries: int
    files: int


# Given a complete segment, where the next one goes.  Called on the compressing
# thread; what it raises stops the layer (the writer raises it at its next write).
NextSegment = Callable[[Segment], BinaryIO]


@dataclass(slots=True)
class LayerResult:
    digest: str
    size: int
    uncompressed: int
    entries: int
    files: int
    # New parent-state records of the hardlinked files written (poisoned when the
    # file changed while read): the late link names are checked against them.  Any
    # other path's comes back from ``add``, and is not kept, so that memory does
    # not grow with the files written.  Paths in ``reverted`` were not written and
    # keep their old record.
    linked: dict[str, Stat] = field(default_factory=dict)
    reverted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Every segment, oldest first: one, the layer itself, unless it was cut.  The
    # sizes and counts above are the whole layer's; ``digest`` is the last
    # segment's (what the output holds when ``finish`` returns).
    segments: list[Segment] = field(default_factory=list)


class _HashingWriter:
    """The compressed stream's sink: counts and hashes bytes on their way to the file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self._f.write(data)
        return len(data)

    def flush(self) -> None:
        self._f.flush()


@dataclass(frozen=True, slots=True)
class _Cut:
    """In the queue: the segment ends here, after ``entries`` and ``files`` (the
    layer's so far) and ``uncompressed`` bytes."""

    uncompressed: int
    entries: int
    files: int


class _CompressThread:
    """zstd's input side, the output's hash and the file write, on their own thread.

    The caller, walking, reading files and making headers, then runs beside them,
    as tar runs beside zstd in ``tar | zstd``, and never waits for the compressor
    unless the queue is full; on many cores that thread is what limits a
    checkpoint.  Slices given to ``write`` belong to the thread from then on.

    At a ``cut`` it ends the frame, hands the segment to ``next_segment`` and goes
    on into the output that returns, so the walk never waits for the store."""

    def __init__(
        self,
        cctx: zstandard.ZstdCompressor,
        out: BinaryIO,
        next_segment: NextSegment | None = None,
    ) -> None:
        self._cctx = cctx
        self.sink = _HashingWriter(out)
        self._zw = cctx.stream_writer(self.sink, closefd=False, write_size=FLUSH_AT)  # type: ignore[arg-type]
        self._next_segment = next_segment
        self._queue: queue.Queue[bytes | bytearray | _Cut | None] = queue.Queue(QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._finish = False
        self.uncompressed = 0
        self.segments: list[Segment] = []  # complete, oldest first
        self._start = _Cut(0, 0, 0)  # where the current segment began
        self._thread = threading.Thread(target=self._run, name="layer-compress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        get = self._queue.get
        data = get()
        try:
            while data is not None:
                if isinstance(data, _Cut):
                    self._cut(data)
                else:
                    self._zw.write(data)
                data = get()
            if self._finish:
                self._zw.flush(zstandard.FLUSH_FRAME)
        except BaseException as e:  # handed to the caller at its next write or close
            self._error = e
            while data is not None:  # drained, so the caller never blocks on a full queue
                data = get()

    def _cut(self, at: _Cut) -> None:
        assert self._next_segment is not None
        self._zw.flush(zstandard.FLUSH_FRAME)
        start, sink = self._start, self.sink
        segment = Segment(
            "sha256:" + sink.sha.hexdigest(),
            sink.size,
            at.uncompressed - start.uncompressed,
            at.entries - start.entries,
            at.files - start.files,
        )
        out = self._next_segment(segment)
        self.segments.append(segment)
        self._start = at
        self.sink = _HashingWriter(out)
        self._zw = self._cctx.stream_writer(self.sink, closefd=False, write_size=FLUSH_AT)  # type: ignore[arg-type]

    def write(self, data: bytes | bytearray) -> None:
        if self._error is not None:
            raise self._error
        self.uncompressed += len(data)
        self._queue.put(data)

    def cut(self, entries: int, files: int) -> None:
        """End the segment after what was written so far."""
        if self._error is not None:
            raise self._error
        self._queue.put(_Cut(self.uncompressed, entries, files))

    def close(self, finish: bool) -> None:
        """Wait for the thread; ``finish`` ends the frame, otherwise the output is abandoned."""
        if not self._thread.is_alive():
            return
        self._finish = finish
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and finish:
            raise self._error

    def started(self) -> _Cut:
        """Where the segment being written began."""
        return self._start


def poisoned(rec: Stat) -> Stat:
    """A record no scan can equal, so the path is written again next time."""
    return (rec[0], rec[1], rec[2], rec[3], rec[4], -1, rec[6], rec[7], rec[8])


def _read_small(fd: int, rec: Stat) -> tuple[bytes, bool] | None:
    """A small file's content, exactly ``rec``'s size, and whether it changed since
    the scan (then the bytes are still consistent, and it is written again next
    time); None when it is no longer a regular file."""
    size = rec[SIZE]
    data = os.read(fd, size) if size else b""
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    after = os.fstat(fd)
    if not st.S_ISREG(after.st_mode):
        return None
    dirty = (after.st_mtime_ns, after.st_ctime_ns, after.st_size, after.st_ino) != (
        rec[MTIME],
        rec[CTIME],
        size,
        rec[INO],
    )
    if len(data) < size:
        data += bytes(size - len(data))
    return data, dirty


def read_xattrs(where: str | int) -> dict[str, bytes]:
    """The extended attributes of the entry at path ``where`` (never followed), or
    of the file open at descriptor ``where`` (the very inode whose content is read)."""
    follow = isinstance(where, int)  # (a descriptor has nothing to follow)
    try:
        names = os.listxattr(where, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOENT, errno.EPERM):
            return {}
        raise
    out = {}
    for name in names:
        try:
            out[name] = os.getxattr(where, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
                raise
    return out


class LayerWriter:
    """One layer, entry by entry, in the order a walk finds changes.

    ``add`` each new or changed path (parents first), while the walk is still
    going, so the walk, the reading and the compression overlap; then ``finish``
    with what only the complete walk knows, or ``abandon`` on failure.

    With ``next_segment``, the layer is cut between entries into segments of
    about ``segment_bytes`` compressed (growing by that every ``SEGMENTS_PER_STEP``
    segments): a store that cannot rename (S3) stores each under its digest as
    soon as it is complete, while the walk goes on, instead of copying one large
    blob once its digest is known.  Paths are never repeated across segments,
    but a hardlink may name a path of an earlier one, so the restore and the
    squash read a cut layer's segments, in order, as one layer
    (``merge.merge_order``)."""

    def __init__(
        self,
        root: Path,
        out: BinaryIO,
        *,
        level: int = 3,
        threads: int = 0,
        progress: WriteProgress | None = None,
        cancel: threading.Event | None = None,
        segment_bytes: int = 0,
        next_segment: NextSegment | None = None,
    ) -> None:
        self._root = str(root)
        params = zstandard.ZstdCompressionParameters.from_level(
            level,
            threads=threads or min(os.cpu_count() or 1, MAX_THREADS),
            job_size=JOB_SIZE,
            write_checksum=1,
        )
        self._compressor = _CompressThread(
            zstandard.ZstdCompressor(compression_params=params), out, next_segment
        )
        self._segment_bytes = segment_bytes if next_segment is not None else 0
        self._cuts = 0
        self._cut_due = False  # the segment is full: cut before the next entry
        self._segment_start = 0  # uncompressed bytes before the segment being written
        self._progress = progress
        self._cancel = cancel
        self._buf = bytearray()
        # inode -> (first path written, was it dirty, its xattrs)
        self._links: dict[int, tuple[str, bool, dict[str, bytes]]] = {}
        self._added: set[str] = set()
        self.result = LayerResult(digest="", size=0, uncompressed=0, entries=0, files=0)
        self.bytes_done = 0

    def _maybe_cut(self) -> None:
        """Mark the segment full, after an entry, if it is large enough.  Its
        compressed size is estimated from the bytes given to the compressor and the
        ratio of the segments complete (none: 1): what it has put out lags several
        jobs behind.  The cut is made before the next entry (``_cut``), so no
        segment is left without one when the layer ends first."""
        if self._cut_due:
            return
        compressor = self._compressor
        done = list(compressor.segments)  # (appended to by the compressing thread)
        ratio = 1.0
        if done:
            ratio = sum(x.size for x in done) / max(1, sum(x.uncompressed for x in done))
        pending = compressor.uncompressed - self._segment_start
        if self._segment_full(self._cuts, int(pending * ratio)):
            self._cut_due = True

    def _cut(self) -> None:
        """End the segment before the entry about to be added: what the buffer
        holds is whole entries (a large file's padding included)."""
        self._cut_due = False
        self._buf += tf.end_of_archive()
        self._flush()
        self._compressor.cut(self.result.entries, self.result.files)
        self._cuts += 1
        self._segment_start = self._compressor.uncompressed

    def _segment_full(self, number: int, size: int) -> bool:
        """Whether segment ``number`` (from 0), about ``size`` bytes compressed, is
        large enough to end."""
        return size >= self._segment_bytes * (1 + number // SEGMENTS_PER_STEP)

    def _entry_starts(self) -> None:
        """Just before an entry's first byte: a full segment ends here, so every
        segment ends between entries and none is left without one."""
        if self._cut_due:
            self._cut()

    def _entry_done(self, streamed: bool = False) -> None:
        """After an entry: the buffer to the compressor once it is large, and
        whether the segment is full then (or after a file ``streamed`` to the
        compressor past the buffer, which may fill a segment alone)."""
        if len(self._buf) >= FLUSH_AT:
            self._flush()
        elif not streamed:
            return
        if self._segment_bytes:
            self._maybe_cut()

    def _flush(self) -> None:
        if self._buf:
            self._compressor.write(self._buf)  # the thread's from now on: no copy
            self._buf = bytearray()

    def _whiteout(self, path: str) -> None:
        self._entry_starts()
        head, _, base = path.rpartition("/")
        wh = f"{head}/{tf.WHITEOUT_PREFIX}{base}" if head else tf.WHITEOUT_PREFIX + base
        self._buf += tf.encode_header(wh, tf.REGTYPE, 0o644, 0, 0, 0, 0)
        self.result.entries += 1
        self._entry_done()

    def add_whiteout(self, path: str) -> None:
        """A whiteout of ``path``, for a layer made of other layers' entries (a squash)."""
        self._whiteout(path)

    def add_opaque(self, rel_dir: str) -> None:
        """An opaque whiteout: nothing below ``rel_dir`` from the layers underneath remains."""
        self._buf += tf.encode_header(
            f"{rel_dir}/{tf.OPAQUE_WHITEOUT}", tf.REGTYPE, 0o644, 0, 0, 0, 0
        )
        self.result.entries += 1
        if len(self._buf) >= FLUSH_AT:
            self._flush()

    def add_member(
        self, m: tf.Member, name: str, linkname: str, read: Callable[[int], bytes] | None
    ) -> None:
        """Another layer's entry as it was read, under ``name`` (its cleaned path,
        with a trailing slash for a directory): the content, ``m.size`` bytes,
        comes from ``read`` in chunks, so a large file is never held whole."""
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("squash cancelled")
        result = self.result
        kind = tf.REGTYPE if m.type in (tf.AREGTYPE, tf.CONTTYPE) else m.type
        size = m.size if kind == tf.REGTYPE else 0
        header = tf.encode_header(
            name, kind, m.mode, m.uid, m.gid, size, m.mtime_ns, linkname, m.xattrs
        )
        if size and read is None:
            raise ValueError(f"{name!r}: a file's content needs a reader")
        if size <= WHOLE_FILE_MAX:
            self._buf += header
            if size and read is not None:
                self._buf += read(size)
                self._buf += tf.padding(size)
        else:
            self._buf += header
            self._flush()
            left = size
            write = self._compressor.write
            while left and read is not None:
                chunk = read(min(CHUNK, left))
                write(chunk)
                left -= len(chunk)
            self._buf += tf.padding(size)
        if kind == tf.REGTYPE:
            result.files += 1
            self.bytes_done += size
        result.entries += 1
        if len(self._buf) >= FLUSH_AT:
            self._flush()
        if self._progress is not None and (result.entries & 255) == 0:
            self._progress(result.entries, self.bytes_done)

    def add_listing(
        self, rel_dir: str, names: list[str], records: list[Stat], which: list[int]
    ) -> dict[int, Stat | None]:
        """``add`` of ``names[i]`` (in ``rel_dir``, with its scan record
        ``records[i]``) for each ``i`` of ``which``, in that order: the records
        that are not the scan's (poisoned, or None: not written), by index."""
        out: dict[int, Stat | None] = {}
        prefix = f"{rel_dir}/" if rel_dir else ""
        framing = _frame_files is not None and prefix.isascii()
        bprefix = prefix.encode("ascii") if framing else b""
        dirfd = -1
        k, n = 0, len(which)
        try:
            while k < n:
                i = which[k]
                rec = records[i]
                if framing and rec[NLINK] == 1 and st.S_ISREG(rec[MODE]):
                    if dirfd < 0:
                        try:
                            dirfd = open_dir(self._root, rel_dir)
                        except OSError:  # each file's own open says what happened
                            framing = False
                            continue
                    done = self._framed(dirfd, bprefix, names, records, which, k, out)
                    if done:
                        k += done
                        continue
                written = self.add(join_path(rel_dir, names[i]), rec)
                if written is not rec:
                    out[i] = written
                k += 1
        finally:
            if dirfd >= 0:
                os.close(dirfd)
        return out

    def _framed(
        self,
        dirfd: int,
        prefix: bytes,
        names: list[str],
        records: list[Stat],
        which: list[int],
        start: int,
        out: dict[int, Stat | None],
    ) -> int:
        """The files from ``which[start]`` on that ``_frame_files`` writes: how many."""
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("checkpoint cancelled")
        self._entry_starts()
        assert _frame_files is not None
        result = self.result
        before = result.entries
        count, content, dirty = _frame_files(
            self._buf, dirfd, prefix, names, records, which, start, FLUSH_AT,
            WHOLE_FILE_MAX,
        )  # fmt: skip
        for at in dirty:
            i = which[at]
            out[i] = poisoned(records[i])
        result.files += count
        result.entries += count
        self.bytes_done += content
        self._entry_done()
        if self._progress is not None and (result.entries >> 8) != (before >> 8):
            self._progress(result.entries, self.bytes_done)
        return count

    def add(self, path: str, rec: Stat) -> Stat | None:
        """Write ``path`` as the scan recorded it in ``rec`` (its content as it is
        now); the record the next parent state keeps for it (poisoned when the file
        changed while read), None when it was not written (``reverted``)."""
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("checkpoint cancelled")
        result = self.result
        mode = rec[MODE]
        abs_path = os.path.join(self._root, path)
        if st.S_ISREG(mode):
            if rec[NLINK] > 1:  # (no late link name for it: see finish)
                self._added.add(path)
            written = self._file(path, rec, abs_path)
            if written is None:
                return None
            rec = written
        else:
            xattrs = self._xattrs(path, abs_path)
            if xattrs is None:
                return None
            if st.S_ISDIR(mode):
                kind, name, target = tf.DIRTYPE, path + "/", ""
            elif st.S_ISLNK(mode):
                kind, name, target = tf.SYMTYPE, path, rec[TARGET]
                if symlink_escapes(path, target):
                    result.skipped.append((path, f"symlink target climbs above the root: {target}"))
                    return rec
            elif st.S_ISFIFO(mode):
                kind, name, target = tf.FIFOTYPE, path, ""
            else:
                what = "socket" if st.S_ISSOCK(mode) else "device node"
                result.skipped.append((path, f"{what} not checkpointed"))
                return rec  # reported once, not at every checkpoint
            self._entry_starts()
            self._buf += tf.encode_header(
                name, kind, mode, rec[UID], rec[GID], 0, rec[MTIME], target, xattrs
            )
        result.entries += 1
        self._entry_done(streamed=st.S_ISREG(mode) and rec[SIZE] > WHOLE_FILE_MAX)
        if self._progress is not None and (result.entries & 255) == 0:
            self._progress(result.entries, self.bytes_done)
        return rec

    def _xattrs(self, path: str, where: str | int) -> dict[str, bytes] | None:
        """``read_xattrs`` of ``where``; None when the entry is gone or they cannot be
        read (then it is not written, and keeps its old record)."""
        try:
            return read_xattrs(where)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.result.skipped.append((path, f"cannot read xattrs: {e.strerror}"))
        self.result.reverted.append(path)
        return None

    def _file(self, path: str, rec: Stat, abs_path: str) -> Stat | None:
        """A regular file's entry (a hardlink to a name already written, or the
        content); its record as written, None when nothing was."""
        result = self.result
        mode = rec[MODE]
        first = self._links.get(rec[INO]) if rec[NLINK] > 1 else None
        if first is not None:  # the inode's xattrs, as read with the first name's content
            self._entry_starts()
            self._buf += tf.encode_header(
                path, tf.LNKTYPE, mode, rec[UID], rec[GID], 0, rec[MTIME], first[0], first[2]
            )
            rec = poisoned(rec) if first[1] else rec
            result.linked[path] = rec
            return rec
        try:
            fd = os.open(abs_path, _OPEN_FLAGS)
        except FileNotFoundError:
            result.reverted.append(path)
            return None
        except OSError as e:
            result.skipped.append((path, f"unreadable: {e.strerror}"))
            result.reverted.append(path)
            return None
        try:
            xattrs = self._xattrs(path, fd)
            if xattrs is None:
                return None
            # Only reading the file makes it "unreadable": what writing the layer
            # raises (a full spool, a failed segment) fails the checkpoint.
            small = rec[SIZE] <= WHOLE_FILE_MAX
            try:
                got = _read_small(fd, rec) if small else None
                before = None if small else os.fstat(fd)
            except OSError as e:
                result.skipped.append((path, f"unreadable: {e.strerror}"))
                result.reverted.append(path)
                return None
            if got is not None:
                data, dirty = got
                size = rec[SIZE]
                self._entry_starts()
                self._buf += tf.encode_header(
                    path, tf.REGTYPE, mode, rec[UID], rec[GID], size, rec[MTIME], "", xattrs
                )
                self._buf += data
                self._buf += tf.padding(size)
                new_rec = rec
            elif before is not None and st.S_ISREG(before.st_mode):
                new_rec, dirty = self._large_file(path, abs_path, fd, xattrs, before)
                size = new_rec[SIZE]
            else:  # no longer a regular file: next time
                result.reverted.append(path)
                return None
        finally:
            os.close(fd)
        written = poisoned(new_rec) if dirty else new_rec
        self.bytes_done += size
        result.files += 1
        if new_rec[NLINK] > 1:
            self._links[new_rec[INO]] = (path, dirty, xattrs)
            result.linked[path] = written
        return written

    def _large_file(
        self, path: str, abs_path: str, fd: int, xattrs: dict[str, bytes], before: os.stat_result
    ) -> tuple[Stat, bool]:
        """Stream a large file (``before``: its ``fstat``) in chunks: its record as
        read and whether it changed meanwhile."""
        size = before.st_size
        self._entry_starts()
        self._buf += tf.encode_header(
            path, tf.REGTYPE, before.st_mode, before.st_uid, before.st_gid, size,
            before.st_mtime_ns, "", xattrs,
        )  # fmt: skip
        self._flush()
        dirty = False
        left = size
        write = self._compressor.write  # (what it raises is the layer's, not the file's)
        while left:
            try:
                chunk = os.read(fd, min(CHUNK, left))
            except OSError as e:
                raise _unreadable_after_header(abs_path, e) from e
            if not chunk:  # truncated while we read it
                dirty = True
                chunk = bytes(min(CHUNK, left))
            write(chunk)
            left -= len(chunk)
        try:
            after = os.fstat(fd)
        except OSError as e:
            raise _unreadable_after_header(abs_path, e) from e
        self._buf += tf.padding(size)
        if (after.st_mtime_ns, after.st_ctime_ns, after.st_size) != (
            before.st_mtime_ns,
            before.st_ctime_ns,
            before.st_size,
        ):
            dirty = True
        return stat_record(before), dirty

    def _link_unlisted(self, current: dict[str, Stat]) -> None:
        """Names of a written inode that were not added (a new link to an unchanged
        file) join it in this layer, so a checkpoint's hardlinks never name an
        older checkpoint's file (only an earlier segment's, when it is cut)."""
        if not self._links:
            return
        result = self.result
        for other, orec in current.items():
            if orec[NLINK] < 2 or not st.S_ISREG(orec[MODE]):
                continue
            first = self._links.get(orec[INO])
            if first is None or other in self._added:
                continue
            self._entry_starts()
            self._buf += tf.encode_header(
                other, tf.LNKTYPE, orec[MODE], orec[UID], orec[GID], 0, orec[MTIME], first[0],
                first[2],
            )  # fmt: skip
            result.linked[other] = poisoned(orec) if first[1] else orec
            result.entries += 1
            self._entry_done()

    def finish(self, deletions: Iterable[str], current: dict[str, Stat]) -> LayerResult:
        """Close the layer with the ``deletions`` (as whiteouts) and the hardlink
        names the complete scan ``current`` shows; the result carries the digest."""
        for path in deletions:
            self._whiteout(path)
        self._link_unlisted(current)
        self._buf += tf.end_of_archive()
        self._flush()
        compressor = self._compressor
        compressor.close(finish=True)
        result, sink, start = self.result, compressor.sink, compressor.started()
        result.digest = "sha256:" + sink.sha.hexdigest()
        result.uncompressed = compressor.uncompressed
        result.segments = [
            *compressor.segments,
            Segment(
                result.digest,
                sink.size,
                result.uncompressed - start.uncompressed,
                result.entries - start.entries,
                result.files - start.files,
            ),
        ]
        result.size = sum(x.size for x in result.segments)
        if self._progress is not None:
            self._progress(result.entries, self.bytes_done)
        return result

    def abandon(self) -> None:
        """Stop without ending the frame: what was written is not a layer."""
        self._compressor.close(finish=False)


def write_layer(
    root: Path,
    changes: Changes,
    current: dict[str, Stat],
    out: BinaryIO,
    *,
    level: int = 3,
    threads: int = 0,
    progress: WriteProgress | None = None,
    cancel: threading.Event | None = None,
) -> LayerResult:
    """Write ``changes`` (paths relative to ``root``, the diff complete) as one layer."""
    writer = LayerWriter(root, out, level=level, threads=threads, progress=progress, cancel=cancel)
    try:
        for path in changes.upserts:
            writer.add(path, current[path])
        return writer.finish(changes.deletions, current)
    except BaseException:
        writer.abandon()
        raise
