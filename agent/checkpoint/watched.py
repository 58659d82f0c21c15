"""A checkpoint's join when a change watch says what changed: no walk of the root.

The parent state streams by as in a full checkpoint, and every directory the
watch saw no change in is written on as it was read: a frame of the state that
holds none of the directories the watch names is copied whole, as stored, and
in the others the blocks not named pass on as their stored bytes, not decoded.
A directory the watch names is the parent's block with just the named entries
read again (``scan.restat``).  A directory that is new
at a path, or another directory than the parent's there (created, moved in,
replaced), is walked whole, as a full checkpoint would: the watch may have
missed what was written into it before it was watched.  Below a path that is
gone, or that is no longer a directory, the parent's blocks are dropped.

The result is the stream of directories, in walk order, that ``diff.join``
makes of a full walk (but for the blocks and frames passed on as stored), so
the layer and the next parent state are written by the same code; only how
many entries were read differs.
"""

from __future__ import annotations

import heapq
import stat as st
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Set
from pathlib import Path
from typing import Protocol

from agent.checkpoint.diff import (
    Changes,
    Joined,
    ParentBlocks,
    content_bytes,
    join_dir,
)
from agent.checkpoint.scan import (
    INO,
    MODE,
    Excluder,
    Listing,
    Scan,
    Stat,
    dir_key,
    join_path,
    restat,
    root_device,
    walk,
)
from agent.checkpoint.state import Frame, Stored, frames_of

# Root-relative directory -> the names in it the watch saw change.
Dirty = Mapping[str, Set[str]]


class ChangeSource(Protocol):
    """Where a checkpoint learns what changed since its parent state (a change watch)."""

    def take(self) -> Dirty | None:
        """The changes since the last ``take`` (None: unknown, walk the whole root)."""
        ...

    def spoil(self) -> None:
        """The last ``take``'s changes reached no checkpoint: the next must walk."""
        ...


_NONE: list[int] = []
_EMPTY: dict[str, Stat] = {}


def _under(d: str, tops: set[str]) -> bool:
    """Whether ``d`` is one of ``tops`` or lies below one."""
    if not tops:
        return False
    while True:
        if d in tops:
            return True
        if not d:
            return False
        d = d.rpartition("/")[0]


def join_changed(
    parent: ParentBlocks,
    root: Path,
    excluder: Excluder,
    dirty: Dirty,
    result: Scan,
    changes: Changes,
) -> Iterator[Joined | Stored | Frame]:
    """The parent state with what ``dirty`` names read again, as ``diff.join``
    would join it with a full walk; the deletions are sorted once it is done.
    What it passes on unchanged comes as stored: a whole ``Frame``, or a block
    (``Stored``, not decoded).

    Work waits in a heap by walk order: the directories to read again, and the
    walks of new directories, one listing of each at a time (a walk is found
    while its parent is read again, and ordered in among the rest).  A frame of
    the parent is copied whole when the next work lies past its last directory
    and none of its blocks lie below what is gone or walked anew: what is found
    later lies below work not done yet, so past the frame too.
    """
    root_dev = root_device(root)
    seq = 0  # ties never compare the payloads
    # (dir_key, seq, dir, the walk's listing and the walk, or None: read again)
    heap: list[tuple[str, int, str, tuple[Listing, Iterator[Listing]] | None]] = []
    for d in dirty:
        heap.append((dir_key(d), seq, d, None))
        seq += 1
    heapq.heapify(heap)
    gone: set[str] = set()  # parent directories that are gone, or files now
    walked: set[str] = set()  # tops of whole walks: below them, the walk decides
    ahead = _Ahead(frames_of(parent))
    while ahead.next is not None or heap:
        nxt = ahead.next
        pkey: str | None = None
        if isinstance(nxt, Frame):
            top = heap[0][0] if heap else None
            if top is None or top > dir_key(nxt.last):
                if not _overlaps(nxt, gone) and not _overlaps(nxt, walked):
                    ahead.take()
                    yield nxt
                    continue
                ahead.expand()
                continue
            if top >= dir_key(nxt.first):
                ahead.expand()
                continue
        elif nxt is not None:
            pkey = dir_key(nxt.dir)
            if not heap or pkey < heap[0][0]:
                ahead.take()
                if _under(nxt.dir, gone) or _under(nxt.dir, walked):  # below a deletion
                    changes.replaced += content_bytes(nxt.decoded()[1])
                else:
                    yield nxt
                continue
        key, _, d, walking = heapq.heappop(heap)
        if walking is None and (_under(d, gone) or _under(d, walked)):
            continue  # gone with what held it, or the walk lists it
        pnames: list[str] = []
        precs: list[Stat] = []
        raw: bytes | None = None
        if pkey == key:
            assert isinstance(nxt, Stored)
            (pnames, precs), raw = nxt.decoded(), nxt.raw
            ahead.take()
        if walking is not None:  # the next directory of a walk
            listing, rest = walking
            following = next(rest, None)
            if following is not None:
                item = (dir_key(following.dir), seq, following.dir, (following, rest))
                heapq.heappush(heap, item)
                seq += 1
            if not listing.listed:  # what the parent recorded stands
                yield Joined(d, pnames, precs, _NONE, _EMPTY, raw)
                continue
        else:
            # A directory the parent has no block of was empty then (a new one is
            # walked from its parent's new entry, and skipped above).
            named = sorted(dirty[d])
            was = Listing(d, pnames, precs, True)
            listing = restat(root, root_dev, excluder, was, named, result)
            if not listing.listed:
                yield Joined(d, pnames, precs, _NONE, _EMPTY, raw)
                continue
            result.count += len(named)
            for sub in _new_dirs(listing, pnames, precs, named, gone):
                first = walk(root, excluder, result, top=sub)
                start = next(first, None)
                if start is not None:
                    walked.add(sub)
                    heapq.heappush(heap, (dir_key(sub), seq, sub, (start, first)))
                    seq += 1
        yield join_dir(d, listing.names, listing.records, pnames, precs, raw, changes)
    changes.deletions.sort()


class _Ahead:
    """The parent state ahead of the join: its next block, or its next frame whole
    (until ``expand`` opens it into its blocks)."""

    def __init__(self, frames: Iterator[Frame]) -> None:
        self._frames = frames
        self._blocks: Iterator[Stored] = iter(())
        self.next: Stored | Frame | None = None
        self.take()

    def take(self) -> None:
        """Past the next block or frame."""
        block = next(self._blocks, None)
        self.next = block if block is not None else next(self._frames, None)

    def expand(self) -> None:
        """The next frame as its blocks."""
        assert isinstance(self.next, Frame)
        self._blocks = self.next.stored()
        self.take()


def _overlaps(frame: Frame, tops: set[str]) -> bool:
    """Whether a block of ``frame`` may lie at or below one of ``tops``: the keys
    of a directory and all below it run from its key to its key + "\\x01"."""
    first, last = dir_key(frame.first), dir_key(frame.last)
    return any(first < k + "\x01" and k <= last for k in map(dir_key, tops))


def _new_dirs(
    listing: Listing, pnames: list[str], precs: list[Stat], named: list[str], gone: set[str]
) -> list[str]:
    """The directories among the ``named`` entries of ``listing`` to walk whole (new,
    or another directory than the parent's there), noting in ``gone`` the parent's
    directories that are no more.  Only named entries were read again: the others
    are the parent's, unchanged, so only those are looked up (both lists are sorted)."""
    out = []
    d = listing.dir
    names, records = listing.names, listing.records
    for name in named:
        i = bisect_left(names, name)
        rec = records[i] if i < len(names) and names[i] == name else None
        j = bisect_left(pnames, name)
        was = precs[j] if j < len(pnames) and pnames[j] == name else None
        is_dir = rec is not None and st.S_ISDIR(rec[MODE])
        if was is not None and st.S_ISDIR(was[MODE]):
            if not is_dir:
                gone.add(join_path(d, name))
            elif rec is not None and was[INO] != rec[INO]:
                out.append(join_path(d, name))
        elif is_dir:
            out.append(join_path(d, name))
    return out
