"""A checkpoint's one pass: walk the root and write each change as the walk finds it.

Writing while walking lets the walk overlap with reading files and compressing,
as ``tar | zstd`` overlaps them, instead of the compressor's threads waiting for
a whole scan first.  Data still flows one way, scan → diff → layer: the walk's
listings are joined with the parent state's blocks as both stream by (``join``),
each change goes to the layer, and each directory, as the layer wrote it, to
the next parent state.  Memory follows the largest directory, the top-most
deletions and the hardlinked files written, never the number of files (nor
of those written: each is counted, and its record goes to the next state).
Deletions are known only once the walk is complete, so their whiteouts, and
the names of hardlinked files the walk had passed before their inode was
written, close the layer.
"""

from __future__ import annotations

import shutil
import stat as st
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.checkpoint.diff import Changes, Joined, ParentBlocks, join
from agent.checkpoint.layer_writer import LayerResult, LayerWriter, NextSegment
from agent.checkpoint.scan import INO, MODE, NLINK, SIZE, Excluder, Scan, Stat, join_path, walk
from agent.checkpoint.state import Frame, StateReader, StateWriter, Stored, blocks_of
from agent.checkpoint.watched import Dirty, join_changed

# (phase, entries written, entries to write, content bytes written, bytes to write).
# The phase is "scan" while the walk goes on (nothing to write is known yet: 0),
# then "write" with the totals.
PassProgress = Callable[[str, int, int, int, int], None]


@dataclass(slots=True)
class Pass:
    scan: Scan  # what the walk skipped and how many entries it kept (no entries)
    changes: Changes
    layer: LayerResult | None  # None: nothing changed, nothing written
    walk_seconds: float
    state: Path | None  # the next parent state (None: not asked for)
    watched: bool = False  # only what a change watch named was read, not the whole root


def scan_and_write(
    root: Path,
    excluder: Excluder,
    parent: ParentBlocks | dict[str, Stat],
    out: BinaryIO,
    *,
    state: Path | None = None,
    level: int = 3,
    threads: int = 0,
    progress: PassProgress | None = None,
    cancel: threading.Event | None = None,
    dirty: Dirty | None = None,
    keep_paths: bool = True,
    segment_bytes: int = 0,
    next_segment: NextSegment | None = None,
) -> Pass:
    """Scan ``root``, diff it against ``parent`` (a state's blocks, or a whole dict)
    and write the changes to ``out`` as one layer (``out`` stays empty when nothing
    changed), and the root as the layer records it to the state file ``state``.

    ``dirty``: what a change watch saw change since ``parent`` was written, all
    that is read then (``watched.join_changed``); None walks the whole root.
    ``keep_paths``: whether ``changes.upserts`` lists the paths written, or they
    are only counted (memory that would grow with the files changed).
    ``next_segment``: cut the layer into segments of about ``segment_bytes``
    (``LayerWriter``), each handed to it as it is complete; ``out`` gets the first."""
    if isinstance(parent, dict):
        parent = [(b, None) for b in blocks_of(parent)]
    if state is not None:
        return _one_pass(
            root, excluder, parent, out, state, dirty, Changes(keep_paths=keep_paths),
            level=level, threads=threads, progress=progress, cancel=cancel,
            segment_bytes=segment_bytes, next_segment=next_segment,
        )  # fmt: skip
    # Written all the same: the late hardlink names are found in it.
    scratch = Path(tempfile.mkdtemp(prefix="studio-state-"))
    try:
        done = _one_pass(
            root, excluder, parent, out, scratch / "next.state", dirty,
            Changes(keep_paths=keep_paths),
            level=level, threads=threads, progress=progress, cancel=cancel,
            segment_bytes=segment_bytes, next_segment=next_segment,
        )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    done.state = None
    return done


def _one_pass(
    root: Path,
    excluder: Excluder,
    parent: ParentBlocks,
    out: BinaryIO,
    state: Path,
    dirty: Dirty | None,
    changes: Changes,
    *,
    level: int,
    threads: int,
    progress: PassProgress | None,
    cancel: threading.Event | None,
    segment_bytes: int,
    next_segment: NextSegment | None,
) -> Pass:
    t0 = time.monotonic()
    result = Scan()
    writer: LayerWriter | None = None
    phase, total_entries, total_bytes = "scan", 0, 0
    linked: set[int] = set()  # inodes of hardlinked files written

    def on_write(done: int, bytes_done: int) -> None:
        if progress is not None:
            progress(phase, done, total_entries, bytes_done, total_bytes)

    def start() -> LayerWriter:
        return LayerWriter(
            root, out, level=level, threads=threads, progress=on_write, cancel=cancel,
            segment_bytes=segment_bytes, next_segment=next_segment,
        )  # fmt: skip

    joined: Iterator[Joined | Stored | Frame]
    if dirty is None:
        joined = join(parent, walk(root, excluder, result), changes)
    else:
        joined = join_changed(parent, root, excluder, dirty, result, changes)
    watched = dirty is not None
    next_state = StateWriter(state)
    closed = False
    try:
        for j in joined:
            if isinstance(j, Stored):  # passed on as the parent state holds it
                next_state.add(j)
                continue
            if isinstance(j, Frame):
                next_state.copy(j)
                continue
            if not j.changed:
                next_state.write((j.dir, j.names, j.records), j.raw)
                continue
            if writer is None:
                writer = start()
            total_bytes += _write_changed(writer, j, linked)
            next_state.write((j.dir, j.names, j.records))
        walked = time.monotonic() - t0
        # The state's end (its last blocks, fsync and rename) goes on beside the
        # layer's: zstd's last jobs, the whiteouts and the late hardlink names.
        next_state.start_close()
        if not changes or linked:  # (the late link names are read from the state)
            next_state.close()
            closed = True
        if not changes:
            return Pass(result, changes, None, walked, state, watched)
        phase, total_entries = "write", len(changes)
        if writer is None:
            writer = start()
        links = _hardlinked(state, linked) if linked else {}
        layer = writer.finish(changes.deletions, links)
        if not closed:
            next_state.close()
            closed = True
        late = {p: r for p, r in links.items() if layer.linked.get(p, r) != r}
        if late:  # link names of a file that changed while read: poisoned too
            _patch(state, late)
        return Pass(result, changes, layer, walked, state, watched)
    except BaseException:
        if writer is not None:
            writer.abandon()
        if closed:
            state.unlink(missing_ok=True)
        else:  # nothing left of it, whether it failed in close, before, or beside the layer
            next_state.abandon()
        raise


def _write_changed(writer: LayerWriter, j: Joined, linked: set[int]) -> int:
    """Add a directory's changed entries to the layer and put what it wrote into
    ``j.records``: the record as read (poisoned when the file changed meanwhile),
    or for one not written the parent's (none when the parent had none); the
    content bytes to write."""
    names, records = j.names, j.records
    size = 0
    for i in j.changed:
        rec = records[i]
        if st.S_ISREG(rec[MODE]):
            size += rec[SIZE]
            if rec[NLINK] > 1:
                linked.add(rec[INO])
    gone: list[int] = []
    for i, written in writer.add_listing(j.dir, names, records, j.changed).items():
        if written is None:
            was = j.old.get(names[i])
            if was is None:
                gone.append(i)
            else:
                records[i] = was
        else:
            records[i] = written
    for i in sorted(gone, reverse=True):
        del names[i], records[i]
    return size


def _hardlinked(state: Path, inodes: set[int]) -> dict[str, Stat]:
    """Every regular file of the state on one of ``inodes``: the names a hardlinked
    file written has besides the ones the walk found changed."""
    out: dict[str, Stat] = {}
    with StateReader(state) as r:
        for (d, names, records), _ in r.blocks():
            for name, rec in zip(names, records, strict=True):
                if rec[NLINK] > 1 and rec[INO] in inodes and st.S_ISREG(rec[MODE]):
                    out[join_path(d, name)] = rec
    return out


def _patch(state: Path, records: dict[str, Stat]) -> None:
    """Rewrite ``state`` with the given records instead of its own."""
    by_dir: dict[str, dict[str, Stat]] = {}
    for path, rec in records.items():
        head, _, name = path.rpartition("/")
        by_dir.setdefault(head, {})[name] = rec
    with StateReader(state) as r, StateWriter(state) as w:
        for item in r.blocks().stored():
            fix = by_dir.get(item.dir)
            if fix is None:
                w.add(item)
                continue
            d, names, recs = item.block()
            w.write((d, names, [fix.get(n, rec) for n, rec in zip(names, recs, strict=True)]))
