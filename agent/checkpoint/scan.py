"""Walk the root filesystem and record each entry's identity, without reading content.

The walk never leaves the root's filesystem: any mount point below the root
(data mounts, bind-mounted /etc/hosts, ...) is skipped, and so are the virtual
and volatile trees, the agent's own files and anything excluded by the user.
An entry's record is the tuple ``Stat`` below; two equal records mean the entry
did not change (ctime moves on every content, mode, owner, link or xattr change,
and cannot be set back by a user).
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat as st
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.checkpoint.paths import RESTORE_TEMP_PREFIX
from agent.errors import ConfigError

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
    """Every kept entry by root-relative path, parents before children."""

    entries: dict[str, Stat] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Directories that could not be listed: what lies below them is unknown, not gone.
    unreadable_dirs: list[str] = field(default_factory=list)


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

    def _relative(self, p: Path) -> str | None:
        try:
            rel = Path(os.path.abspath(p)).relative_to(self.root)
        except ValueError:
            return None
        s = str(rel)
        return None if s == "." else s

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
    """Walk ``root`` depth-first with sorted names; never cross a filesystem boundary."""
    result = Scan()
    for _ in walk(root, excluder, result):
        pass
    return result


def walk(root: Path, excluder: Excluder, result: Scan) -> Iterator[str]:
    """Record ``root``'s entries into ``result``, yielding each path once recorded,
    so that a checkpoint can write it while the walk goes on."""
    entries = result.entries
    skipped = result.skipped
    root_s = str(root)
    try:
        root_dev = os.lstat(root_s).st_dev
    except OSError as e:
        raise ConfigError(f"cannot read the root {root_s}: {e.strerror}") from e
    excluded = excluder.excluded
    S_ISDIR, S_ISLNK = st.S_ISDIR, st.S_ISLNK
    stack: list[str] = [""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root_s, rel_dir) if rel_dir else root_s
        try:
            with os.scandir(abs_dir) as it:
                names = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            continue
        except OSError as e:
            skipped.append((rel_dir or ".", f"unreadable directory: {e.strerror}"))
            result.unreadable_dirs.append(rel_dir)
            continue
        subdirs: list[str] = []
        for de in names:
            rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
            if excluded(rel) or de.name.startswith(RESTORE_TEMP_PREFIX):
                continue
            try:
                s = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                skipped.append((rel, f"cannot stat: {e.strerror}"))
                continue
            mode = s.st_mode
            if S_ISDIR(mode):
                if s.st_dev != root_dev:
                    continue  # a mount point we did not see in mountinfo
                entries[rel] = stat_record(s)
                subdirs.append(rel)
            elif S_ISLNK(mode):
                try:
                    target = os.readlink(de.path)
                except OSError:
                    continue
                entries[rel] = stat_record(s, target)
            else:
                if s.st_dev != root_dev:
                    continue
                entries[rel] = stat_record(s)
            yield rel
        # Depth-first, parents before children, names in order: push in reverse.
        for d in reversed(subdirs):
            stack.append(d)
