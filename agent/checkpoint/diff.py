"""What changed between the parent state and a new scan."""

from __future__ import annotations

import stat as st
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress, count
from operator import ne
from typing import NamedTuple

from agent.checkpoint.scan import MODE, SIZE, Listing, Stat, dir_key, join_path
from agent.checkpoint.state import ParentBlocks as ParentBlocks
from agent.checkpoint.state import blocks_of, stored_of


@dataclass(slots=True)
class Changes:
    """Paths to write (new or modified, parents first) and top-most deletions.

    With ``keep_paths`` off (a checkpoint's pass, which writes each change as it
    is found) the paths to write are counted, not kept: a million new files
    would hold a million strings to the end for nothing."""

    upserts: list[str] = field(default_factory=list)
    deletions: list[str] = field(default_factory=list)
    # Content bytes of the parent's regular files the changes rewrite or delete
    # (gone with what held them too): what the new layer makes obsolete below it.
    replaced: int = 0
    keep_paths: bool = True
    written: int = 0  # how many paths to write were found

    def __bool__(self) -> bool:
        return bool(self.written or self.deletions)

    def __len__(self) -> int:
        return self.written + len(self.deletions)

    def note(self, path: str, old: Stat | None, rec: Stat) -> bool:
        """The change test: record ``path`` if it is new or any field of its record
        (ctime and inode included) differs from the parent's; whether it was."""
        if old is not None:
            if old == rec:
                return False
            if st.S_ISREG(old[MODE]):
                self.replaced += old[SIZE]
        self.written += 1
        if self.keep_paths:
            self.upserts.append(path)
        return True


class Joined(NamedTuple):
    """One directory of the new state, as the join of a walk and the parent state
    made it: the walk's listing, or the parent's block where the walk could not
    list it (then ``raw`` may be its stored form, and nothing changed)."""

    dir: str
    names: list[str]
    records: list[Stat]
    changed: list[int]  # indices of new or modified entries, in order
    old: dict[str, Stat]  # the parent's records of the modified ones, by name
    raw: bytes | None  # the block as stored in the parent state, when unchanged


_NONE: list[int] = []
_EMPTY: dict[str, Stat] = {}


def join(parent: ParentBlocks, listings: Iterable[Listing], changes: Changes) -> Iterator[Joined]:
    """Merge the walk's listings with the parent state's blocks, both in walk order
    (``dir_key``), noting each change in ``changes`` (``Changes.note``) as the
    walk goes; the deletions are complete (and sorted) once the walk is.

    A deleted entry is one a listed directory no longer holds: the top-most
    deletions, as one whiteout hides all below it, and the new entry of a
    directory replaced by a file hides all below it too.  Parent blocks the walk
    passed without listing them lie below such paths, or below a directory the
    walk could not list: there, what the parent recorded stands.
    """
    deleted = changes.deletions
    it = stored_of(parent)
    nxt = next(it, None)
    keep: str | None = None  # the last unlistable directory

    def kept(d: str) -> bool:
        return keep is not None and (d == keep or not keep or d.startswith(keep + "/"))

    for listing in listings:
        d = listing.dir
        key = dir_key(d)
        pnames: list[str] = []
        precs: list[Stat] = []
        raw: bytes | None = None
        while nxt is not None:
            pd = nxt.dir
            pkey = dir_key(pd)
            if pkey > key:
                break
            item, nxt = nxt, next(it, None)
            if pkey == key:
                (pnames, precs), raw = item.decoded(), item.raw
                break
            if kept(pd):
                yield Joined(pd, *item.decoded(), _NONE, _EMPTY, item.raw)
            else:  # below a deletion
                changes.replaced += content_bytes(item.decoded()[1])
        if not listing.listed:
            keep = d
            yield Joined(d, pnames, precs, _NONE, _EMPTY, raw)
            continue
        yield join_dir(d, listing.names, listing.records, pnames, precs, raw, changes)
    while nxt is not None:
        item, nxt = nxt, next(it, None)
        if kept(item.dir):
            yield Joined(item.dir, *item.decoded(), _NONE, _EMPTY, item.raw)
        else:
            changes.replaced += content_bytes(item.decoded()[1])
    deleted.sort()


def join_dir(
    d: str,
    names: list[str],
    records: list[Stat],
    pnames: list[str],
    precs: list[Stat],
    raw: bytes | None,
    changes: Changes,
) -> Joined:
    """One listed directory against the parent's block of it (empty lists: none),
    its changes noted in ``changes``; the deleted names are appended unsorted."""
    note = changes.note
    if names == pnames:
        if records == precs:
            return Joined(d, names, records, _NONE, _EMPTY, raw)
        changed = list(compress(count(), map(ne, records, precs)))
        old = {names[i]: precs[i] for i in changed}
        for i in changed:
            note(join_path(d, names[i]), precs[i], records[i])
        return Joined(d, names, records, changed, old, None)
    olds = dict(zip(pnames, precs, strict=True))
    pop = olds.pop
    changed = []
    old = {}
    for i, (name, rec) in enumerate(zip(names, records, strict=True)):
        was = pop(name, None)
        if note(join_path(d, name), was, rec):
            changed.append(i)
            if was is not None:
                old[name] = was
    changes.deletions.extend(join_path(d, name) for name in olds)
    changes.replaced += content_bytes(olds.values())
    return Joined(d, names, records, changed, old, None)


def content_bytes(records: Iterable[Stat]) -> int:
    """The content bytes of the regular files among ``records``."""
    return sum(rec[SIZE] for rec in records if st.S_ISREG(rec[MODE]))


def listings_of(entries: dict[str, Stat]) -> list[Listing]:
    """A whole scan's dict as the walk lists it: every directory, empty ones too."""
    blocks = {d: (n, r) for d, n, r in blocks_of(entries)}
    dirs = {""} | {p for p, rec in entries.items() if st.S_ISDIR(rec[MODE])}
    out = [Listing(d, *blocks.get(d, ([], [])), True) for d in dirs]
    out.sort(key=lambda x: dir_key(x.dir))
    return out


def diff(parent: dict[str, Stat], current: dict[str, Stat]) -> Changes:
    """Compare a whole scan with a whole parent state (small trees and tests: a
    checkpoint joins them as streams, with the same ``join``)."""
    changes = Changes()
    for _ in join(((b, None) for b in blocks_of(parent)), listings_of(current), changes):
        pass
    return changes


@dataclass(frozen=True, slots=True)
class DiffLine:
    path: str
    kind: str  # "added" | "modified" | "deleted"
    size: int


def report(
    parent: ParentBlocks, listings: Iterable[Listing], found: dict[str, Stat] | None = None
) -> list[DiffLine]:
    """Each change with the bytes it will add, largest first (what makes a checkpoint
    big); into ``found``, if given, the record the walk read of each added or
    modified path."""
    changes = Changes()
    lines = []
    for j in join(parent, listings, changes):
        names, records, old = j.names, j.records, j.old
        for i in j.changed:
            kind = "modified" if names[i] in old else "added"
            path = join_path(j.dir, names[i])
            lines.append(DiffLine(path, kind, _content_size(records[i])))
            if found is not None:
                found[path] = records[i]
    lines.extend(DiffLine(p, "deleted", 0) for p in changes.deletions)
    lines.sort(key=lambda d: (-d.size, d.path))
    return lines


def _content_size(rec: Stat) -> int:
    return rec[SIZE] if st.S_ISREG(rec[MODE]) else 0
