"""Walk the root filesystem and record each entry's identity, without reading content.

The walk never leaves the root's filesystem: any mount point below the root
(data mounts, bind-mounted /etc/hosts, ...) is skipped, and so are the virtual
and volatile trees, the agent's own files and anything excluded by the user.
An entry's record is the tuple ``Stat`` below; two equal records mean the entry
did not change (ctime moves on every content, mode, owner, link or xattr change,
and cannot be set back by a user).
"""

from __future__ import annotations

import errno
import fnmatch
import operator
import os
import re
import stat as st
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Final, NamedTuple

from agent.checkpoint.paths import RESTORE_TEMP_PREFIX
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.checkpoint._listdir import Later, Lister

# mode, uid, gid, size, mtime_ns, ctime_ns, ino, nlink, symlink target ("" otherwise)
Stat = tuple[int, int, int, int, int, int, int, int, str]
MODE: Final = 0
UID: Final = 1
GID: Final = 2
SIZE: Final = 3
MTIME: Final = 4
CTIME: Final = 5
INO: Final = 6
NLINK: Final = 7
TARGET: Final = 8

ALWAYS_SKIPPED = ("proc", "sys", "dev", "run", "tmp")


_Fast = tuple[list[str], list[Stat]] | None
_Listed = tuple[list[str], list[Stat]]
_list_dir: Callable[[int, int, bytes], _Fast] | None
_Lister: type[Lister] | None
try:
    from agent.checkpoint._listdir import Lister as _Lister
    from agent.checkpoint._listdir import list_dir as _list_dir
except ImportError:  # installed without its compiled part: every directory the careful way
    _list_dir = _Lister = None
_SKIP = os.fsencode(RESTORE_TEMP_PREFIX)
# After a directory of PARALLEL_FROM entries or more (its siblings are likely
# alike), the next BATCH directories on the walk's stack are read ahead by the
# compiled lister's pool of LISTERS threads, without the GIL, while the walk's
# consumer joins and writes the directories it has: the system calls of a full
# walk overlap the Python work on what it found.  For small directories, waking
# the threads costs more than it saves.
BATCH = 8
LISTERS = min(4, os.cpu_count() or 1)
PARALLEL_FROM = 64


def stat_record(s: os.stat_result, target: str = "") -> Stat:
    return (
        s.st_mode,
        s.st_uid,
        s.st_gid,
        s.st_size,
        s.st_mtime_ns,
        s.st_ctime_ns,
        s.st_ino,
        s.st_nlink,
        target,
    )


@dataclass(slots=True)
class Scan:
    """What a walk saw besides its listings: every kept entry by root-relative path
    (filled by ``scan`` only: a checkpoint streams them), what it skipped, and how many."""

    entries: dict[str, Stat] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Directories that could not be listed: what lies below them is unknown, not gone.
    unreadable_dirs: list[str] = field(default_factory=list)
    count: int = 0


class Listing(NamedTuple):
    """One directory as the walk found it: its kept entries' names, sorted, and their
    records; ``listed`` is False when it could not be listed (then both are empty)."""

    dir: str
    names: list[str]
    records: list[Stat]
    listed: bool


class Excluder:
    """Decides which root-relative paths are left out of checkpoints."""

    def __init__(self, root: Path, paths: Iterable[Path | str], globs: Iterable[str]) -> None:
        self.root = Path(os.path.abspath(root))
        self.prefixes: set[str] = set(ALWAYS_SKIPPED)
        for p in paths:
            rel = self._relative(Path(p))
            if rel is not None:
                self.prefixes.add(rel)
        self.prefixes.update(mount_points_below(self.root))
        patterns = [g.strip().strip("/") for g in globs if g.strip().strip("/")]
        plain = [g for g in patterns if not any(c in g for c in "*?[")]
        self.prefixes.update(plain)
        wild = [g for g in patterns if g not in plain]
        self._glob = re.compile("|".join(fnmatch.translate(g) for g in wild)) if wild else None
        # The plain prefixes by the directory that holds them, so that a walk looks
        # up names, not paths, and skips the look-up where none is excluded.
        self.names_by_dir: dict[str, frozenset[str]] = {}
        by_dir: dict[str, set[str]] = {}
        for prefix in self.prefixes:
            head, _, name = prefix.rpartition("/")
            by_dir.setdefault(head, set()).add(name)
        self.names_by_dir = {d: frozenset(n) for d, n in by_dir.items()}

    def _relative(self, p: Path) -> str | None:
        try:
            rel = Path(os.path.abspath(p)).relative_to(self.root)
        except ValueError:
            return None
        s = str(rel)
        return None if s == "." else s

    @property
    def glob(self) -> re.Pattern[str] | None:
        """The wildcard globs as one pattern over root-relative paths (None: there are none)."""
        return self._glob

    def excluded(self, rel: str) -> bool:
        if rel in self.prefixes:
            return True
        return self._glob is not None and self._glob.match(rel) is not None


def mount_points_below(root: Path) -> set[str]:
    """Root-relative paths of mount points strictly below ``root``."""
    out: set[str] = set()
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    root_s = str(root).rstrip("/") + "/"
    for line in lines:
        parts = line.split(b" ")
        if len(parts) < 5:
            continue
        mp = _unescape_mount(parts[4].decode("utf-8", "surrogateescape"))
        if mp.startswith(root_s) and len(mp) > len(root_s):
            out.add(mp[len(root_s) :].rstrip("/"))
    return out


def _unescape_mount(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def scan(root: Path, excluder: Excluder) -> Scan:
    """The whole walk as one dict (small trees and tests: a checkpoint streams it)."""
    result = Scan()
    entries = result.entries
    for d, names, records, _ in walk(root, excluder, result):
        prefix = f"{d}/" if d else ""
        entries.update(zip(map(prefix.__add__, names), records, strict=True))
    return result


def join_path(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


_RECORD = operator.attrgetter(
    "st_mode", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_nlink"
)
_NO_TARGET = ("",)
_DEV = operator.attrgetter("st_dev")
_MODE = operator.itemgetter(MODE)
_NAME = operator.attrgetter("name")
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = _ROOT_FLAGS | os.O_NOFOLLOW


def dir_key(d: str) -> str:
    """Directories in walk order sort by this key: depth-first with names sorted is
    the order of their paths' components, and "\\0" sorts before any name's character."""
    return d.replace("/", "\0")


def walk(root: Path, excluder: Excluder, result: Scan, top: str = "") -> Iterator[Listing]:
    """List ``root``'s directories depth-first, each one's names sorted: the order
    of the parent state, whose directories compare by ``dir_key``.  ``top``: only
    the tree below that root-relative directory (itself included).

    Each directory comes with all its kept entries, before any directory below
    it, so parents come before children, and a checkpoint can write its changes
    while the walk goes on.  A directory with nothing excluded is listed by the
    compiled ``_listdir`` (names and records in one call, the system calls
    without the GIL); after a large one, the next few on the stack are read
    ahead while the consumer works (``BATCH``).  One it declines, or any when
    it is not built, is listed by ``_list_careful``, with the same result.
    """
    skipped = result.skipped
    root_s = str(root)
    root_dev = root_device(root)
    stack: list[str] = [top]
    ahead: dict[str, _Listed] = {}  # read ahead, taken when the walk reaches them
    later = _ReadAhead()
    parallel = False
    while stack:
        rel_dir = stack.pop()
        listed: _Listed | OSError | None = ahead.pop(rel_dir, None)
        if listed is None and rel_dir in later.dirs:
            later.take(ahead)
            listed = ahead.pop(rel_dir, None)
        if listed is None:
            listed = _list(root_s, rel_dir, root_dev, excluder, skipped)
        if isinstance(listed, OSError):
            yield _unlisted(rel_dir, listed, result)
            continue
        names, records = listed
        parallel = LISTERS > 1 and len(names) >= PARALLEL_FROM
        modes = list(map(_MODE, records))
        result.count += len(names)
        if any(map(st.S_ISDIR, modes)):
            prefix = f"{rel_dir}/" if rel_dir else ""
            subdirs = [prefix + n for n, m in zip(names, modes, strict=True) if st.S_ISDIR(m)]
            # Depth-first in name order: push in reverse.
            stack.extend(reversed(subdirs))
        if parallel and stack:
            # One batch in flight; a new one once it is taken, or when the next
            # directory is none of its (a large one's subdirectories, just pushed).
            nxt = stack[-1]
            if not later.dirs or (nxt not in ahead and nxt not in later.dirs):
                later.take(ahead)
                later.start(root_s, root_dev, stack, ahead, excluder)
        yield Listing(rel_dir, names, records, True)


class _ReadAhead:
    """The directories the compiled lister's pool is reading ahead of the walk:
    the next ones on its stack, each as a walk reaching it a moment later would
    find it.  The pool (its threads started on first use) lasts the walk."""

    __slots__ = ("_later", "_lister", "dirs")

    def __init__(self) -> None:
        self.dirs: list[str] = []
        self._later: Later | None = None
        self._lister: Lister | None = None

    def start(
        self, root_s: str, root_dev: int, stack: list[str], ahead: dict[str, _Listed],
        excluder: Excluder,
    ) -> None:  # fmt: skip
        if _Lister is None or excluder.glob is not None:
            return
        if self._lister is None:
            self._lister = _Lister(root_dev, _SKIP, LISTERS)
        excluded = excluder.names_by_dir
        fds: list[int] = []
        try:
            # The soonest first, past those read already, within twice a batch.
            for d in reversed(stack[-2 * BATCH :]):
                if len(fds) == BATCH:
                    break
                if d not in ahead and d not in excluded:
                    try:
                        fds.append(open_dir(root_s, d))
                        self.dirs.append(d)
                    except OSError:  # listed when the walk reaches it
                        pass
            if fds:
                self._later = self._lister.later(fds)  # (which takes them out of fds)
        except BaseException:
            for f in fds:  # those the lister has not taken
                os.close(f)
            self.dirs = []
            raise

    def take(self, ahead: dict[str, _Listed]) -> None:
        """Wait for the directories being read and put those listed into ``ahead``
        (the ones the lister declined are listed the careful way when reached)."""
        later, dirs = self._later, self.dirs
        self._later, self.dirs = None, []
        if later is None:
            return
        for i, d in enumerate(dirs):
            got = later.take(i)
            if got is not None:
                ahead[d] = got


def open_dir(root_s: str, rel_dir: str) -> int:
    """A descriptor of the directory ``rel_dir`` of the root ``root_s``: never
    through a symlink that replaced it since it was listed (the root itself may
    be one)."""
    abs_dir = os.path.join(root_s, rel_dir) if rel_dir else root_s
    return os.open(abs_dir, _DIR_FLAGS if rel_dir else _ROOT_FLAGS)


def _list(
    root_s: str, rel_dir: str, root_dev: int, excluder: Excluder, skipped: list[tuple[str, str]]
) -> _Listed | OSError:
    """``rel_dir`` listed, by the compiled lister when nothing in it is excluded."""
    try:
        fd = open_dir(root_s, rel_dir)
    except FileNotFoundError:  # gone since its parent was listed
        return [], []
    except OSError as e:
        if rel_dir and e.errno in (errno.ENOTDIR, errno.ELOOP):  # replaced meanwhile
            return [], []
        return e
    excluded = excluder.names_by_dir.get(rel_dir)
    glob = excluder.glob
    try:
        if _list_dir is not None and excluded is None and glob is None:
            listed = _list_dir(fd, root_dev, _SKIP)
            if listed is not None:
                return listed
        prefix = f"{rel_dir}/" if rel_dir else ""
        return _list_careful(fd, prefix, excluded, glob, root_dev, skipped)
    except OSError as e:
        return e
    finally:
        os.close(fd)


def root_device(root: Path) -> int:
    """The device of the root's filesystem: the walk never leaves it."""
    try:
        return os.lstat(root).st_dev
    except OSError as e:
        raise ConfigError(f"cannot read the root {root}: {e.strerror}") from e


def restat(
    root: Path,
    root_dev: int,
    excluder: Excluder,
    listing: Listing,
    names: Iterable[str],
    result: Scan,
) -> Listing:
    """``listing`` (a directory as the parent state holds it) with ``names`` read
    again, as the walk would read them: a name gone, excluded, unreadable or on
    another filesystem is left out, any other gets its record as of now.

    What a change watch reported changed is all a watched checkpoint reads; the
    directory is opened as the walk opens it (never through a symlink), and when
    it is gone or replaced it is empty, as the walk would find it.
    """
    d = listing.dir
    abs_dir = os.path.join(root, d) if d else str(root)
    try:
        fd = os.open(abs_dir, _DIR_FLAGS if d else _ROOT_FLAGS)
    except FileNotFoundError:
        return Listing(d, [], [], True)
    except OSError as e:
        if d and e.errno in (errno.ENOTDIR, errno.ELOOP):
            return Listing(d, [], [], True)
        return _unlisted(d, e, result)
    prefix = f"{d}/" if d else ""
    excluded = excluder.names_by_dir.get(d)
    glob = excluder.glob
    entries = dict(zip(listing.names, listing.records, strict=True))
    before = len(entries)
    added = False
    try:
        for name in names:
            if not _kept(name, prefix, excluded, glob):
                entries.pop(name, None)
                continue
            try:
                s = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if s.st_dev != root_dev:
                    raise FileNotFoundError  # a mount point: never part of the root
                target = os.readlink(name, dir_fd=fd) if st.S_ISLNK(s.st_mode) else ""
            except FileNotFoundError:
                entries.pop(name, None)
                continue
            except OSError as e:
                result.skipped.append((prefix + name, f"cannot stat: {e.strerror}"))
                entries.pop(name, None)
                continue
            added |= name not in entries
            entries[name] = stat_record(s, target)
    finally:
        os.close(fd)
    if not added and len(entries) == before:  # the same names: the same order
        return Listing(d, listing.names, list(map(entries.__getitem__, listing.names)), True)
    kept = sorted(entries)
    return Listing(d, kept, list(map(entries.__getitem__, kept)), True)


def _unlisted(rel_dir: str, e: OSError, result: Scan) -> Listing:
    result.skipped.append((rel_dir or ".", f"unreadable directory: {e.strerror}"))
    result.unreadable_dirs.append(rel_dir)
    return Listing(rel_dir, [], [], False)


def _kept(
    name: str, prefix: str, excluded: frozenset[str] | None, glob: re.Pattern[str] | None
) -> bool:
    if excluded is not None and name in excluded:
        return False
    if glob is not None and glob.match(prefix + name) is not None:
        return False
    return not name.startswith(RESTORE_TEMP_PREFIX)


def _list_careful(
    fd: int,
    prefix: str,
    excluded: frozenset[str] | None,
    glob: re.Pattern[str] | None,
    root_dev: int,
    skipped: list[tuple[str, str]],
) -> tuple[list[str], list[Stat]]:
    """The directory open at ``fd``, sorted, its exclusions left out, each kept
    entry ``lstat``'ed (an excluded one never is: it may be a hung mount); the
    per-entry work in C loops (``map``), the rare cases (a symlink, a mount
    point, an entry gone meanwhile) found and handled per directory."""
    with os.scandir(fd) as it:
        found = sorted(it, key=_NAME)
    names = list(map(_NAME, found))
    if (
        excluded is not None
        or glob is not None
        or any(map(str.startswith, names, repeat(RESTORE_TEMP_PREFIX)))
    ):
        found = [de for de in found if _kept(de.name, prefix, excluded, glob)]
        names = list(map(_NAME, found))
    # Entries of a directory opened by its fd are stat'ed relative to it
    # (fstatat: no path to build or resolve), and ``DirEntry.stat`` is an
    # lstat for an entry d_type says is no symlink.
    if any(map(os.DirEntry.is_symlink, found)):
        names, stats = _stat_each(found, prefix, skipped)
    else:
        try:
            stats = list(map(os.DirEntry.stat, found))
        except OSError:  # an entry gone or unreadable: one at a time
            names, stats = _stat_each(found, prefix, skipped)
    records: list[Stat] = list(map(operator.add, map(_RECORD, stats), repeat(_NO_TARGET)))
    if any(map(st.S_ISLNK, map(_MODE, records))) or any(map(root_dev.__ne__, map(_DEV, stats))):
        names, records = _rare(fd, root_dev, names, stats, records)
    return names, records


def _stat_each(
    found: list[os.DirEntry[str]], prefix: str, skipped: list[tuple[str, str]]
) -> tuple[list[str], list[os.stat_result]]:
    kept, stats = [], []
    for de in found:
        try:
            s = de.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as e:
            skipped.append((prefix + de.name, f"cannot stat: {e.strerror}"))
            continue
        kept.append(de.name)
        stats.append(s)
    return kept, stats


def _rare(
    fd: int, root_dev: int, names: list[str], stats: list[os.stat_result], records: list[Stat]
) -> tuple[list[str], list[Stat]]:
    """A directory with symlinks (their targets) or other filesystems' entries (left out:
    mount points missing from mountinfo, files bind-mounted from elsewhere)."""
    kept: list[str] = []
    kept_records: list[Stat] = []
    for name, s, rec in zip(names, stats, records, strict=True):
        if st.S_ISLNK(s.st_mode):
            try:
                rec = stat_record(s, os.readlink(name, dir_fd=fd))
            except OSError:
                continue
        elif s.st_dev != root_dev:
            continue
        kept.append(name)
        kept_records.append(rec)
    return kept, kept_records
