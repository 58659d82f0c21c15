"""The merge rules of a chain read newest layer first: which entry wins, what is hidden.

One place for the decision, shared by the restore (which writes the winners to a
root) and the squash (which writes them to one layer), so that a squashed chain
is what the restore would have made of it by construction.

A path is decided by the newest layer that has an entry or a whiteout for it.
An older entry is hidden when a newer layer decided its path, or an ancestor: a
non-directory, a whiteout, an opaque directory, or a directory a newer layer
recreated after an older one removed it (then that older layer "resets" the
directory: what lies below it in the image or in older layers is gone, as
applying the layers oldest first would have done).  Within one layer, the later
of two entries at one path wins, and a whiteout never hides the layer's own
entries.

A checkpoint's layer may be stored cut into segments (``merge_order``): they
are one layer to these rules, read in their order, so a hardlink in one names
its target in an earlier one as it would within the uncut layer.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Hashable, Iterator, Sequence
from enum import IntEnum
from typing import TypeVar

from agent.checkpoint import tarformat as tf
from agent.checkpoint.layer_reader import LayerReader
from agent.checkpoint.paths import clean_member_name, parents
from agent.errors import CorruptLayer, UnsafeLayer

DIR, NONDIR, WHITEOUT = 1, 2, 3
L = TypeVar("L")  # a hardlink waiting for its target, as its caller records it
REG_TYPES = (tf.REGTYPE, tf.AREGTYPE, tf.CONTTYPE)

_M64 = (1 << 64) - 1


def path_key(path: str) -> int:
    """128 bits standing for a path (two independent string hashes of this
    process): a key a third the size of the path, for passes over millions of
    paths whose memory must not grow with their names."""
    return (hash(path) & _M64) | (hash(path + "\0") & _M64) << 64


def merge_order(count: int, continues: Sequence[bool] = ()) -> list[range]:
    """The chain's ``count`` blobs (oldest first) as the merge reads them: each
    layer newest first, a layer being a blob and the segments after it that
    ``continues`` marks (``LayerDesc.continues``; the first blob's mark means
    nothing), its segments oldest first.  A mark in a crafted manifest only
    groups blobs into one layer, which the rules take as any one layer."""
    if continues and len(continues) != count:
        raise ValueError(f"{len(continues)} continuation marks for {count} layers")
    layers: list[range] = []
    start = 0
    for i in range(1, count + 1):
        if i == count or not continues or not continues[i]:
            layers.append(range(start, i))
            start = i
    layers.reverse()
    return layers


def read_order(count: int, continues: Sequence[bool] = ()) -> list[int]:
    """The blobs' indices in the order the merge asks for them: the order to fetch them in."""
    return [i for blobs in merge_order(count, continues) for i in blobs]


class SkippedFiles:
    """A layer's regular files that a newer layer hid, each with the segment of
    the layer it is in (``part``, set as each is read): a hardlink of the layer
    may still need one's content, read again from that segment alone."""

    __slots__ = ("_where", "part")

    def __init__(self) -> None:
        self.part = 0
        self._where: dict[str, int] = {}

    def add(self, path: str) -> None:
        self._where[path] = self.part

    def __contains__(self, path: object) -> bool:
        return path in self._where

    def parts(self, targets: Collection[str], count: int) -> list[int]:
        """The segments (of ``count``) to read again for ``targets``, in order:
        every one when a target is not known here (its entry came after its link)."""
        where = self._where
        if any(t not in where for t in targets):
            return list(range(count))
        return sorted({where[t] for t in targets})


class Entry(IntEnum):
    """What to do with a layer's entry."""

    WRITE = 0
    SKIP = 1
    # Skipped, and its path is a directory a newer layer recreated after this
    # layer made it a non-directory: what lies below it from older layers goes.
    SKIP_RESET = 2


class Whiteout(IntEnum):
    """What to do with a whiteout."""

    NONE = 0  # hidden, or the path is decided by a newer layer
    REMOVE = 1  # remove the path from what lies below
    RESET = 2  # reset the directory (opaque whiteout, or one a newer layer recreated)


class Link(IntEnum):
    """Where a hardlink's content comes from."""

    HERE = 0  # its target was written by this layer, before it
    AGAIN = 1  # its target's content in this layer was overridden: read it again
    LATER = 2  # its target is of an older layer or below the chain: link at the end


class MergeRules:
    """The decisions of one merged pass.  ``key`` maps a path to what the tables
    keep (the path itself by default; ``path_key`` to keep memory small)."""

    __slots__ = ("_decided", "_key", "_opaque", "_pairs", "used_dirs")

    def __init__(self, key: Callable[[str], Hashable] | None = None) -> None:
        self._key = key
        self._decided: dict[Hashable, tuple[int, int]] = {}
        self._opaque: dict[str, int] = {}
        # Directories some layer writes below, with the newest such layer.
        self.used_dirs: dict[str, int] = {}
        self._pairs: list[tuple[tuple[int, int], ...]] = []

    # -- the tables ---------------------------------------------------------------

    def decision(self, path: str) -> tuple[int, int] | None:
        """(layer, kind) of the newest layer that decided ``path``."""
        k = self._key
        return self._decided.get(path if k is None else k(path))

    def _pair(self, layer: int, kind: int) -> tuple[int, int]:
        pairs = self._pairs
        while len(pairs) <= layer:  # one shared tuple per (layer, kind)
            n = len(pairs)
            pairs.append(((n, 0), (n, DIR), (n, NONDIR), (n, WHITEOUT)))
        return pairs[layer][kind]

    def decide(self, path: str, layer: int, kind: int) -> None:
        k = self._key
        self._decided[path if k is None else k(path)] = self._pair(layer, kind)

    @property
    def opaque(self) -> dict[str, int]:
        """Directories reset, with the newest layer that reset each."""
        return self._opaque

    def reset(self, rel_dir: str, layer: int) -> None:
        """Below ``rel_dir``, nothing older than ``layer`` (nor of the image) remains."""
        if self._opaque.get(rel_dir, -1) < layer:
            self._opaque[rel_dir] = layer

    def note_used(self, rel_dir: str, layer: int) -> None:
        if self.used_dirs.get(rel_dir, -1) < layer:
            self.used_dirs[rel_dir] = layer

    # -- the rules ----------------------------------------------------------------

    def hidden(self, path: str, layer: int, check_parents: bool) -> bool:
        """Whether a newer layer already decided this path or hides it."""
        d = self.decision(path)
        if d is not None and d[0] > layer:
            return True
        return check_parents and self.hidden_by_parent(path, layer)

    def hidden_by_parent(self, path: str, layer: int) -> bool:
        opaque = self._opaque
        for a in parents(path):
            d = self.decision(a)
            if d is not None and d[0] > layer and d[1] != DIR:
                return True
            o = opaque.get(a)
            if o is not None and o > layer:
                return True
        return False

    def entry(self, path: str, kind: bytes, layer: int, older: bool) -> Entry:
        """Whether the entry of ``layer`` at ``path`` is written (``older``: a newer
        layer was read before it).  Refuses a non-directory below which a newer
        layer writes."""
        if kind in (tf.CHRTYPE, tf.BLKTYPE):
            raise UnsafeLayer(f"refused device node {path!r}: device nodes are never restored")
        d = self.decision(path)
        if (d is not None and d[0] > layer) or (older and self.hidden_by_parent(path, layer)):
            if kind != tf.DIRTYPE and d is not None and d[1] == DIR:
                # This layer made the path a non-directory, removing what was below
                # it; a newer one made it a directory again: only newer content stays.
                return Entry.SKIP_RESET
            return Entry.SKIP
        if kind != tf.DIRTYPE:
            used = self.used_dirs.get(path)
            if used is not None and used > layer:
                if kind == tf.SYMTYPE:
                    raise UnsafeLayer(
                        f"refused symlink {path!r}: a newer layer writes below it, which "
                        "would write through the link"
                    )
                raise CorruptLayer(f"{path!r} is not a directory but a newer layer writes below it")
        return Entry.WRITE

    def written(self, path: str, kind: bytes, layer: int) -> None:
        """Record that ``layer``'s entry at ``path`` won."""
        if kind == tf.DIRTYPE:
            self.decide(path, layer, DIR)
            self.note_used(path, layer)
        else:
            self.decide(path, layer, NONDIR)

    def written_files(self, paths: list[str], layer: int) -> None:
        """``written`` of regular files (non-directories) at each of ``paths``."""
        pair = self._pair(layer, NONDIR)
        k = self._key
        if k is None:
            self._decided.update(dict.fromkeys(paths, pair))
        else:
            self._decided.update((k(path), pair) for path in paths)

    def whiteout(self, target: str, layer: int, older: bool) -> Whiteout:
        """A whiteout of ``target`` in ``layer``; a REMOVE is recorded as decided."""
        d = self.decision(target)
        if d is not None:
            # Decided by a newer layer (or this one): a directory recreated after
            # this removal keeps only what is newer below it.
            return Whiteout.RESET if d[1] == DIR else Whiteout.NONE
        if self.hidden(target, layer, older):
            return Whiteout.NONE
        if self.used_dirs.get(target, -1) > layer:
            return Whiteout.RESET  # a newer layer wrote below it: made it a directory again
        self.decide(target, layer, WHITEOUT)
        return Whiteout.REMOVE

    def opaque_whiteout(self, rel_dir: str, layer: int, older: bool) -> Whiteout:
        if not rel_dir:
            raise UnsafeLayer("refused opaque whiteout of the root directory")
        if self.hidden(rel_dir, layer, older):
            return Whiteout.NONE
        return Whiteout.RESET

    def link(self, target: str, layer: int, skipped_files: Container[str]) -> Link:
        """Where the content of a hardlink of ``layer`` to ``target`` comes from
        (``skipped_files``: this layer's regular files that a newer layer hid)."""
        d = self.decision(target)
        if d is not None and d[0] == layer and d[1] == NONDIR:
            return Link.HERE
        if target in skipped_files or (d is not None and d[0] > layer):
            return Link.AGAIN
        return Link.LATER

    def check_late_link(self, path: str, target: str, layer: int) -> None:
        """A hardlink linked after the pass must still find its layer's target."""
        d = self.decision(target)
        if d is not None and d[0] > layer:
            raise CorruptLayer(
                f"hardlink {path!r} -> {target!r} refers to content a newer layer replaced"
            )


def whiteout_target(head: str, base: str, raw: str) -> str | None:
    """The path a whiteout named ``head/base`` removes; None for an opaque whiteout."""
    if base == tf.OPAQUE_WHITEOUT:
        return None
    name = base[len(tf.WHITEOUT_PREFIX) :]
    if name in ("", ".", "..") or name.startswith(tf.WHITEOUT_PREFIX):
        raise UnsafeLayer(f"refused whiteout {raw!r}: it does not name an entry of its directory")
    return f"{head}/{name}" if head else name


def targets_read_again(
    reader: LayerReader, pending: dict[str, list[L]]
) -> Iterator[tuple[tf.Member, list[L]]]:
    """The regular files of a layer (or a segment of it) read a second time
    whose names ``pending`` holds, each with the hardlinks waiting for it (taken
    out of ``pending``): a newer layer replaced what they linked to, so their
    content comes from here."""
    for m in reader.members():
        if m.type not in REG_TYPES:
            continue
        try:
            name = clean_member_name(m.name)
        except UnsafeLayer:
            continue
        links = pending.pop(name, None)
        if links:
            yield m, links
