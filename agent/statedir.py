"""The agent's own directories (the state dir and its spool), checked before use.

The default state dir lies under the root, which a restore writes and the
session's user (root in the IDE) can change: a symlink planted there, at the
state dir, its spool or a directory between them and the root, would make the
agent write its files wherever the link points.  So each component from the
root down is looked at without following links and must be a real directory,
and the agent's own directories must belong to it and be writable by no one
else; anything else is refused in one line.  Components above the root (or
above a state dir outside the root) are the operator's choice and trusted.

Files the agent writes there are created with ``O_EXCL | O_NOFOLLOW``, so a
name planted beforehand is never written through, whatever it is.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from agent.errors import AgentError


class UnsafeStateDir(AgentError):
    """The state dir, or a directory on the way to it, is not what the agent made."""


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def ensure_private_dir(path: Path, root: Path) -> None:
    """Make ``path`` exist as a real directory owned by this user, writable by no
    one else, reached from ``root`` (when it lies below it) through real
    directories only; raise ``UnsafeStateDir`` otherwise."""
    full = os.path.abspath(path)
    top = os.path.abspath(root)
    if full == top or not full.startswith(top.rstrip("/") + "/"):
        # Outside the root: the parents are the operator's, only the dir is ours.
        top = os.path.dirname(full)
    os.makedirs(top, exist_ok=True)
    parts = full[len(top) :].strip("/").split("/")
    cur = top
    for i, part in enumerate(parts):
        cur = f"{cur.rstrip('/')}/{part}"
        own = i == len(parts) - 1
        with contextlib.suppress(FileExistsError):
            os.mkdir(cur, 0o700 if own else 0o755)
        _check(cur, own)


def _check(path: str, own: bool) -> None:
    s = os.lstat(path)
    if stat.S_ISLNK(s.st_mode):
        raise UnsafeStateDir(
            f"refused the state directory {path}: it is a symlink, and the agent never "
            "writes its state through one (remove it, or set state_dir elsewhere)"
        )
    if not stat.S_ISDIR(s.st_mode):
        raise UnsafeStateDir(f"refused the state directory {path}: it is not a directory")
    if own and s.st_uid != os.geteuid():
        raise UnsafeStateDir(
            f"refused the state directory {path}: it belongs to uid {s.st_uid}, "
            f"not to the agent's {os.geteuid()}"
        )
    if own and s.st_mode & 0o022:
        raise UnsafeStateDir(
            f"refused the state directory {path}: it is writable by others "
            f"(mode {stat.S_IMODE(s.st_mode):o})"
        )


def create_file(path: Path, mode: int = 0o600) -> int:
    """A new file at ``path`` for writing (an fd), never through a link planted
    there: what is at the name already (a leftover of a killed write) is removed."""
    try:
        return os.open(path, _NEW_FILE, mode)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, _NEW_FILE, mode)


def protected_paths(root: Path, paths: list[Path]) -> list[str]:
    """The root-relative form of those of ``paths`` below ``root`` (for a restore
    to leave alone)."""
    top = os.path.abspath(root).rstrip("/") + "/"
    out = []
    for p in paths:
        full = os.path.abspath(p)
        if full.startswith(top):
            out.append(full[len(top) :].strip("/"))
    return [p for p in out if p]
