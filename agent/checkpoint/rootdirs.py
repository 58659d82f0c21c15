"""The root's directories as file descriptors, each opened without following a symlink.

The restore names every entry it writes, links, removes or lists as a directory
fd and a single name, and gets that fd only from here: each component below the
root is opened with ``O_NOFOLLOW | O_DIRECTORY``, so the kernel never resolves a
path through a symlink, whoever planted it (the image, a layer, an earlier entry)
and whenever.  A directory the restore later replaced leaves a stale fd at worst,
which writes into the removed directory, never outside: ``forget`` drops it.

Fds are cached by path (walk order makes most lookups hits) and the cache is
trimmed only between entries (``trim``), so an fd handed out stays open while
the entry that asked for it is applied; one ``hold``-ing work still in flight
(a file a writer thread finishes) stays open, cached or not, until it is
``release``d.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat as st

from agent.errors import UnsafeLayer

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# For a directory the restoring user may search but not read (a non-root restore).
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# At most this many fds cached, and a quarter of the process's allowance: a
# tree's directories all fit, most often, so the metadata pass at the end
# opens none of them again.
CACHE_LIMIT = 8192


def cache_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return CACHE_LIMIT
    return max(16, min(CACHE_LIMIT, soft // 4))


def open_dir_at(parent: int, name: str, rel: str, what: str, readable: bool = True) -> int | None:
    """An fd of the real directory ``name`` in ``parent``; None when there is none
    there (missing, or not a directory); ``UnsafeLayer`` when it is a symlink.
    Unless ``readable``, an ``O_PATH`` fd where the directory may not be read."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except PermissionError:
        if readable:
            raise
        return os.open(name, _PATH_FLAGS, dir_fd=parent)
    except (FileNotFoundError, NotADirectoryError) as e:
        # ENOTDIR for a symlink too: tell it apart from a file only on this rare path.
        if e.errno == errno.ENOTDIR and is_symlink_at(parent, name):
            raise UnsafeLayer(
                f"refused {what!r}: {rel!r} is a symlink, and the restore never goes "
                "through a symlink"
            ) from None
        return None


def is_symlink_at(parent: int, name: str) -> bool:
    try:
        return st.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode)
    except FileNotFoundError:
        return False


def fd_path(fd: int, name: str = "") -> str:
    """A path naming ``name`` in the directory ``fd`` for the few calls without a
    ``dir_fd`` form (xattrs of a symlink): ``/proc`` resolves the fd itself."""
    return f"/proc/self/fd/{fd}/{name}" if name else f"/proc/self/fd/{fd}"


class RootDirs:
    """Directory fds below one root, by root-relative path ("" is the root)."""

    def __init__(self, root: str, limit: int | None = None) -> None:
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds: dict[str, int] = {"": self.root_fd}
        self._limit = cache_limit() if limit is None else limit
        # Fds opened O_PATH: fine as ``dir_fd``, refused by fchmod and the like.
        self._path_only: set[int] = set()
        # Fds that work in flight still uses, with how many pieces of it; and
        # those of them dropped from the cache meanwhile, closed on release.
        self._held: dict[int, int] = {}
        self._dropped: set[int] = set()

    def _close(self, fd: int) -> None:
        if fd in self._held:
            self._dropped.add(fd)
            return
        self._path_only.discard(fd)
        os.close(fd)

    def hold(self, fd: int) -> None:
        """Keep ``fd`` open until as many ``release``s: work in flight uses it."""
        self._held[fd] = self._held.get(fd, 0) + 1

    def release(self, fd: int) -> None:
        n = self._held.pop(fd) - 1
        if n:
            self._held[fd] = n
        elif fd in self._dropped:
            self._dropped.discard(fd)
            self._close(fd)

    def meta_target(self, fd: int) -> int | str:
        """What to hand ``chmod``, ``chown``, ``utime`` and the xattr calls for the
        directory ``fd``: the fd itself, or for an ``O_PATH`` one the ``/proc``
        path that names it."""
        return fd_path(fd) if fd in self._path_only else fd

    def close(self) -> None:
        self._held.clear()
        for fd in [*self._fds.values(), *self._dropped]:
            with contextlib.suppress(OSError):
                self._close(fd)
        self._fds = {}
        self._dropped.clear()

    def __enter__(self) -> RootDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cached(self, rel: str) -> int | None:
        return self._fds.get(rel)

    def child(self, parent: int, rel: str, what: str) -> int | None:
        """Open (and cache) ``rel``, whose parent directory is the fd ``parent``."""
        name = rel.rpartition("/")[2]
        try:
            fd = open_dir_at(parent, name, rel, what)
        except PermissionError:  # a restore as a user who may not read it
            fd = open_dir_at(parent, name, rel, what, readable=False)
            if fd is not None:
                self._path_only.add(fd)
        if fd is not None:
            old = self._fds.get(rel)
            if old is not None:  # a stale one (the directory was replaced): drop it
                self._close(old)
            self._fds[rel] = fd
        return fd

    def get(self, rel: str, what: str) -> int | None:
        """The fd of the existing real directory ``rel``: None when it or one of
        its parents is missing or not a directory, ``UnsafeLayer`` when one of
        them is a symlink."""
        fd = self._fds.get(rel)
        if fd is not None:
            return fd
        # Up to the nearest cached ancestor, then down one component at a time.
        missing = [rel]
        head = rel.rpartition("/")[0]
        while (fd := self._fds.get(head)) is None:
            missing.append(head)
            head = head.rpartition("/")[0]
        for a in reversed(missing):
            fd = self.child(fd, a, what)
            if fd is None:
                return None
        return fd

    def forget(self, rel: str) -> None:
        """``rel`` was removed or replaced: drop its fd and those of everything below."""
        if not rel:
            raise ValueError("the root is never forgotten")
        prefix = rel + "/"
        for k in [k for k in self._fds if k == rel or k.startswith(prefix)]:
            self._close(self._fds.pop(k))

    def trim(self) -> None:
        """Close the oldest fds beyond the limit; call only between entries."""
        fds = self._fds
        if len(fds) <= self._limit:
            return
        held = self._held
        drop = [k for k in fds if k and fds[k] not in held][: len(fds) - self._limit // 2]
        for k in drop:
            self._close(fds.pop(k))
