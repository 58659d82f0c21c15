"""What changed between the parent state and a new scan."""

from __future__ import annotations

import stat as st
from dataclasses import dataclass, field

from agent.checkpoint.scan import MODE, SIZE, Scan, Stat


@dataclass(slots=True)
class Changes:
    """Paths to write (new or modified, parents first) and top-most deletions."""

    upserts: list[str] = field(default_factory=list)
    added: set[str] = field(default_factory=set)
    deletions: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletions)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletions)

    def note(self, path: str, old: Stat | None, rec: Stat) -> bool:
        """The change test: record ``path`` if it is new or any field of its record
        (ctime and inode included) differs from the parent's; whether it was."""
        if old is None:
            self.added.add(path)
        elif old == rec:
            return False
        self.upserts.append(path)
        return True


def diff(parent: dict[str, Stat], current: dict[str, Stat]) -> Changes:
    """Compare a whole scan with the parent state (the one-pass checkpoint applies
    the same test, ``Changes.note``, as its walk goes)."""
    changes = Changes()
    note = changes.note
    get = parent.get
    for path, rec in current.items():
        note(path, get(path), rec)
    changes.deletions = deletions(parent, current, len(changes.added))
    return changes


def deletions(parent: dict[str, Stat], current: dict[str, Stat], added: int) -> list[str]:
    """Deleted paths whose parent directory still exists as a directory, given
    how many paths of ``current`` the parent lacks.

    Below a deleted directory one whiteout suffices; below a directory replaced
    by a file the new file's entry already hides everything.
    """
    if len(parent) + added == len(current):  # nothing was deleted
        return []
    out = []
    for path in parent:
        if path in current:
            continue
        head, _, _ = path.rpartition("/")
        if head:
            rec = current.get(head)
            if rec is None or not st.S_ISDIR(rec[MODE]):
                continue
        out.append(path)
    out.sort()
    return out


def keep_unlisted(scan: Scan, parent: dict[str, Stat]) -> None:
    """Directories the scan could not list are unknown, not deleted: what the
    parent recorded below them stands."""
    for d in scan.unreadable_dirs:
        prefix = d + "/" if d else ""
        for path, rec in parent.items():
            if path.startswith(prefix) and path not in scan.entries:
                scan.entries[path] = rec


@dataclass(frozen=True, slots=True)
class DiffLine:
    path: str
    kind: str  # "added" | "modified" | "deleted"
    size: int


def report(parent: dict[str, Stat], current: dict[str, Stat]) -> list[DiffLine]:
    """Each change with the bytes it will add, largest first (what makes a checkpoint big)."""
    changes = diff(parent, current)
    lines = [
        DiffLine(p, "added" if p in changes.added else "modified", _content_size(current[p]))
        for p in changes.upserts
    ]
    lines.extend(DiffLine(p, "deleted", 0) for p in changes.deletions)
    lines.sort(key=lambda d: (-d.size, d.path))
    return lines


def _content_size(rec: Stat) -> int:
    return rec[SIZE] if st.S_ISREG(rec[MODE]) else 0
