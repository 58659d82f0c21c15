"""A chain of layers (or the upper part of one) compacted into one layer.

The squashed layer, applied on what lies below the squashed layers, gives the
root the layers gave: it is the restore's merged pass (``merge.MergeRules``, read
newest layer first) writing the winning entries to a layer instead of a root.
Each winner is copied as it was read (mode, owner, nanosecond mtime, xattrs,
content), in its layer's order; whiteouts stay whiteouts, since the image or a
layer below may have the path, unless a reset directory above them already
hides everything below (then the opaque whiteout says it); a directory that a
layer reset (an opaque whiteout, or recreated after an older layer removed it)
gets an opaque whiteout.  What was superseded inside the squashed layers is
left out.

A hardlink whose target is another layer's, or below the squashed layers, comes
after every entry, so its target precedes it; one whose target this layer had
but a newer layer replaced is written as a file, read again from its layer.

Streaming, like the restore: the layers are read once each (a second time only
for such a hardlink), the output is compressed as it is written, and memory
holds a key per path (``merge.path_key``), the directories and the whiteouts,
never content.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from agent.checkpoint import tarformat as tf
from agent.checkpoint.layer_reader import LayerReader
from agent.checkpoint.layer_writer import Cancelled, LayerResult, LayerWriter
from agent.checkpoint.merge import (
    REG_TYPES,
    Entry,
    Link,
    MergeRules,
    SkippedFiles,
    Whiteout,
    merge_order,
    path_key,
    targets_read_again,
)
from agent.checkpoint.merge import whiteout_target as _whiteout_target
from agent.checkpoint.paths import clean_member_name, parents, symlink_escapes
from agent.checkpoint.restore import LayerFile
from agent.errors import CorruptLayer, UnsafeLayer

__all__ = [
    "Cancelled",
    "LayerUse",
    "SquashProgress",
    "SquashResult",
    "squash_layers",
]

# (uncompressed bytes read so far, of all the layers when known else 0)
SquashProgress = Callable[[int, int], None]


@dataclass(slots=True)
class LayerUse:
    """What the squash found in one of its input layers.  ``bytes``: the layer's
    uncompressed tar bytes; ``superseded``: those of its members the squashed
    layer does not carry (replaced, removed or hidden by a newer layer)."""

    entries: int = 0
    kept: int = 0
    bytes: int = 0
    superseded: int = 0


@dataclass(slots=True)
class SquashResult:
    layer: LayerResult  # the squashed layer: digest, size, uncompressed, entries, files
    inputs: list[LayerUse] = field(default_factory=list)  # oldest first, as given

    @property
    def superseded(self) -> int:
        return sum(u.superseded for u in self.inputs)


@dataclass(slots=True)
class _Link:
    path: str
    target: str
    layer: int
    member: tf.Member


@dataclass(slots=True)
class _Pass:
    rules: MergeRules
    writer: LayerWriter
    late_links: list[_Link] = field(default_factory=list)
    whiteouts: list[str] = field(default_factory=list)


def squash_layers(
    layers: Sequence[Path | LayerFile] | int,
    out: BinaryIO,
    fetch: Callable[[int], Path | LayerFile] | None = None,
    *,
    level: int = 3,
    threads: int = 0,
    cancel: threading.Event | None = None,
    progress: SquashProgress | None = None,
    total_bytes: int = 0,
    continues: Sequence[bool] = (),
) -> SquashResult:
    """Write to ``out`` one layer equal to ``layers`` (oldest first) applied in order.

    ``layers`` is the list, or its count with ``fetch(index)`` giving each layer
    when it is ready (asked in ``merge_order(count, continues)``, as the restore
    asks; it may block while it downloads); a ``LayerFile`` with a digest is
    verified as it is read.  ``cancel`` set stops the squash with ``Cancelled``
    (``out`` then holds no valid layer).  Raises what the restore would raise
    on the same layers (``CorruptLayer``, ``UnsafeLayer``, ``DigestMismatch``).
    """
    if isinstance(layers, int):
        if fetch is None:
            raise ValueError("fetch is required with a layer count")
        count, get = layers, fetch
    else:
        files = list(layers)
        count, get = len(files), files.__getitem__
    writer = LayerWriter(Path("/"), out, level=level, threads=threads, cancel=cancel)
    state = _Pass(MergeRules(key=path_key), writer)
    uses = [LayerUse() for _ in range(count)]
    done = 0

    def read(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total_bytes)

    try:
        for blobs in merge_order(count, continues):
            _squash_one(state, blobs, get, count, uses, cancel, read)
        _finish(state)
        result = writer.finish((), {})
    except BaseException:
        writer.abandon()
        raise
    return SquashResult(result, uses)


def _squash_one(
    state: _Pass,
    blobs: range,
    get: Callable[[int], Path | LayerFile],
    count: int,
    uses: list[LayerUse],
    cancel: threading.Event | None,
    read: Callable[[int], None],
) -> None:
    """One layer of the chain: the blob ``blobs`` names, or each segment of it
    (``read`` told each one's bytes once it is read)."""
    index = blobs.start  # the layer, to the rules
    older = blobs.stop < count
    pending: dict[str, list[_Link]] = {}
    skipped_files = SkippedFiles()
    sources: list[LayerFile] = []
    for part, blob in enumerate(blobs):
        src = get(blob)
        layer = src if isinstance(src, LayerFile) else LayerFile(src)
        sources.append(layer)
        skipped_files.part = part
        use = uses[blob]
        name = f"layer {blob + 1} of {count}"
        with layer.open() as f, LayerReader(f, name, layer.digest, layer.size) as reader:
            end = 0  # where the previous member's content ended
            for m in reader.members():
                if cancel is not None and cancel.is_set():
                    raise Cancelled("squash cancelled")
                at = reader.consumed
                cost = at - end + m.size + (-m.size % tf.BLOCK)
                end = at + m.size + (-m.size % tf.BLOCK)
                use.entries += 1
                if _member(state, reader, m, index, older, pending, skipped_files):
                    use.kept += 1
                else:
                    use.superseded += cost
            use.bytes = reader.consumed
        read(use.bytes)
    if pending:
        again = skipped_files.parts(pending.keys(), len(sources))
        _write_again(state, [(index + i, sources[i]) for i in again], index, pending)


def _member(
    state: _Pass,
    reader: LayerReader,
    m: tf.Member,
    layer: int,
    older: bool,
    pending: dict[str, list[_Link]],
    skipped_files: SkippedFiles,
) -> bool:
    """Decide one member and write it if it wins; whether the output carries it."""
    rules, writer = state.rules, state.writer
    path = clean_member_name(m.name)
    head, _, base = path.rpartition("/")
    if base.startswith(tf.WHITEOUT_PREFIX):
        target = _whiteout_target(head, base, m.name)
        if target is None:
            if not rules.opaque_whiteout(head, layer, older):
                return False
            _reset(state, head, layer)
            return True
        verdict = rules.whiteout(target, layer, older)
        if verdict is Whiteout.RESET:
            _reset(state, target, layer)
        elif verdict is Whiteout.REMOVE:
            state.whiteouts.append(target)
            return True
        return False
    kind = m.type
    decided = rules.entry(path, kind, layer, older)
    if decided:
        if kind in REG_TYPES:
            skipped_files.add(path)  # a hardlink of this layer may still need it
        if decided is Entry.SKIP_RESET:
            _reset(state, path, layer)
        return False
    if kind in REG_TYPES:
        writer.add_member(m, path, "", reader.read)
    elif kind == tf.DIRTYPE:
        writer.add_member(m, path + "/", "", None)
    elif kind == tf.LNKTYPE:
        target = clean_member_name(m.linkname)
        how = rules.link(target, layer, skipped_files)
        if how is Link.HERE:
            writer.add_member(m, path, target, None)
        elif how is Link.AGAIN:
            pending.setdefault(target, []).append(_Link(path, target, layer, m))
        else:  # the restore makes its directory only at the end, too
            state.late_links.append(_Link(path, target, layer, m))
            rules.written(path, kind, layer)
            return True
    elif kind == tf.SYMTYPE:
        if symlink_escapes(path, m.linkname):
            raise UnsafeLayer(
                f"refused symlink {path!r} -> {m.linkname!r}: it climbs above the root"
            )
        writer.add_member(m, path, m.linkname, None)
    elif kind == tf.FIFOTYPE:
        writer.add_member(m, path, "", None)
    rules.written(path, kind, layer)
    if head and rules.used_dirs.get(head, -1) < layer:
        for a in parents(path):  # as the restore notes the directories it writes in
            rules.note_used(a, layer)
    return True


def _reset(state: _Pass, rel_dir: str, layer: int) -> None:
    """``rel_dir`` hides what lies below it: one opaque whiteout says so."""
    if rel_dir not in state.rules.opaque:
        state.writer.add_opaque(rel_dir)
    state.rules.reset(rel_dir, layer)


def _write_again(
    state: _Pass,
    sources: list[tuple[int, LayerFile]],
    index: int,
    pending: dict[str, list[_Link]],
) -> None:
    """Hardlinks whose target's content in this layer a newer layer replaced: the
    content once, under the first link's name, read again (from the segments of
    the layer that hold the targets, by blob index); the others link to it."""
    writer = state.writer
    for blob, source in sources:
        with source.open() as f, LayerReader(f, name=f"layer {blob + 1}") as reader:
            for m, links in targets_read_again(reader, pending):
                first = links[0].path
                writer.add_member(m, first, "", reader.read)
                for link in links[1:]:
                    writer.add_member(link.member, link.path, first, None)
        if not pending:
            return
    missing = ", ".join(sorted(pending))
    raise CorruptLayer(f"layer {index + 1}: hardlink targets not found: {missing}")


def _finish(state: _Pass) -> None:
    """What only the whole pass knows: hardlinks to other layers' files, then the
    whiteouts no reset directory covers."""
    rules, writer = state.rules, state.writer
    for link in state.late_links:
        rules.check_late_link(link.path, link.target, link.layer)
        writer.add_member(link.member, link.path, link.target, None)
    opaque = rules.opaque
    for path in state.whiteouts:
        if not opaque or not any(a in opaque for a in parents(path)):
            writer.add_whiteout(path)
