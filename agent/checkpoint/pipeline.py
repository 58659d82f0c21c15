"""A checkpoint's one pass: walk the root and write each change as the walk finds it.

Writing while walking lets the walk overlap with reading files and compressing,
as ``tar | zstd`` overlaps them, instead of the compressor's threads waiting for
a whole scan first.  Data still flows one way, scan → diff → layer.  Deletions
are known only once the walk is complete, so their whiteouts, and the names of
hardlinked files the walk had passed before their inode was written, close the
layer.
"""

from __future__ import annotations

import stat as st
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.checkpoint.diff import Changes, deletions, keep_unlisted
from agent.checkpoint.layer_writer import LayerResult, LayerWriter
from agent.checkpoint.scan import MODE, SIZE, Excluder, Scan, Stat, walk

# (phase, entries written, entries to write, content bytes written, bytes to write).
# The phase is "scan" while the walk goes on (nothing to write is known yet: 0),
# then "write" with the totals.
PassProgress = Callable[[str, int, int, int, int], None]


@dataclass(slots=True)
class Pass:
    scan: Scan
    changes: Changes
    layer: LayerResult | None  # None: nothing changed, nothing written
    walk_seconds: float


def scan_and_write(
    root: Path,
    excluder: Excluder,
    parent: dict[str, Stat],
    out: BinaryIO,
    *,
    level: int = 3,
    threads: int = 0,
    progress: PassProgress | None = None,
    cancel: threading.Event | None = None,
) -> Pass:
    """Scan ``root``, diff it against ``parent`` and write the changes to ``out`` as
    one layer; ``out`` stays empty when nothing changed."""
    t0 = time.monotonic()
    result = Scan()
    changes = Changes()
    note = changes.note
    entries = result.entries
    old_record = parent.get
    writer: LayerWriter | None = None
    phase, total_entries, total_bytes = "scan", 0, 0

    def on_write(done: int, bytes_done: int) -> None:
        if progress is not None:
            progress(phase, done, total_entries, bytes_done, total_bytes)

    def start() -> LayerWriter:
        return LayerWriter(
            root, out, level=level, threads=threads, progress=on_write, cancel=cancel
        )

    try:
        for path in walk(root, excluder, result):
            rec = entries[path]
            if not note(path, old_record(path), rec):
                continue
            if writer is None:
                writer = start()
            writer.add(path, rec)
        walked = time.monotonic() - t0
        keep_unlisted(result, parent)
        changes.deletions = deletions(parent, entries, len(changes.added))
        if not changes:
            return Pass(result, changes, None, walked)
        phase, total_entries = "write", len(changes)
        total_bytes = sum(entries[p][SIZE] for p in changes.upserts if st.S_ISREG(entries[p][MODE]))
        if writer is None:
            writer = start()
        return Pass(result, changes, writer.finish(changes.deletions, entries), walked)
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
