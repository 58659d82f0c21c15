"""A change watch over the root's own filesystem: which entries changed since the
last checkpoint, so that the next one reads only those (``watched.join_changed``).

One inotify watch per directory of the root, added walking the tree the way a
checkpoint walks it: never into a mount point, another filesystem, an excluded
path or through a symlink (each directory is opened ``O_NOFOLLOW``, checked to
be on the root's device, and watched through its descriptor), so a data mount
below the root, a FUSE mount above all, is never crawled.  A thread of its own
reads the events, a batch at a time, and keeps the names that changed by
directory; ``take`` hands them over and starts the next period.

The watch says whether it can be trusted for a period, and a checkpoint walks
the whole root when it cannot: for the first period (it began before every
directory was watched; a caller about to walk the root once ``ready`` is set
begins a sound one with ``restart``), after the kernel's queue overflowed
(``IN_Q_OVERFLOW``, after which everything is watched again), after a
checkpoint that used a period failed (``spoil``), and for good once a directory
cannot be watched (the limit ``fs.inotify.max_user_watches`` reached, or an
error: ``broken`` says which).

What inotify does not see, and only a full walk finds: writes through a shared
``mmap`` (no event at all), changes made while the agent was not running, and
changes to the same files made by a kernel other than this one (a network
filesystem's other clients).  The daemon walks fully at the final checkpoint
and every ``full_scan_every`` periodic ones for that reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from inotify_simple import INotify, flags

from agent.checkpoint.paths import RESTORE_TEMP_PREFIX
from agent.checkpoint.scan import Excluder, join_path, root_device
from agent.checkpoint.watched import Dirty

_NAMESPACE: Final = flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO
# Added through /proc/self/fd/N, which must be followed: to the very directory
# opened, whatever its path has become since.
_MASK: Final = _NAMESPACE | flags.MODIFY | flags.CLOSE_WRITE | flags.ATTRIB | flags.ONLYDIR
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
# A batch is read this long after its first event, so that the kernel merges a
# busy writer's repeated events into one: at most this many wake-ups a second.
_READ_DELAY: Final = 0.1
_WATCH_LIMIT: Final = Path("/proc/sys/fs/inotify/max_user_watches")


@dataclass(frozen=True, slots=True)
class Pending:
    """What the watch holds for the next checkpoint."""

    names: int  # changed entries (by name) since the last ``take``
    first: float | None  # when the first of them was seen (the watch's clock)
    last: float | None  # when the last one was
    sound: bool  # whether they are all that changed
    broken: str  # why the watch was given up ("": it was not)


class ChangeWatch:
    """Watches ``root`` below which ``excluder`` keeps nothing out of checkpoints.

    ``now`` is the clock the change times are read off (the daemon's, so that its
    timing logic can be tested); ``on_change`` (set before ``start``) is called,
    from the watch's thread, when a period's first change is seen.
    """

    def __init__(
        self,
        root: Path,
        excluder: Excluder,
        *,
        now: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self._excluder = excluder
        self._now = now
        self.on_change = on_change
        self._root_dev = root_device(self.root)
        self._lock = threading.Lock()
        self._dirty: dict[str, set[str]] = {}
        self._names = 0
        self._first: float | None = None
        self._last: float | None = None
        self._sound = False  # the current period: nothing was watched before it
        self._complete = False  # every directory is watched now
        self._broken = ""
        self._inotify: INotify | None = None
        self._paths: dict[int, str] = {}  # watch descriptor -> directory
        self._wds: dict[str, int] = {}  # directory -> watch descriptor
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self._rewatch = True
        self.ready = threading.Event()  # set once the first attempt to watch all is done
        self._thread = threading.Thread(target=self._run, name="change-watch", daemon=True)

    # -- what checkpoints ask --------------------------------------------------------

    def start(self) -> None:
        """Watch every directory (on the watch's thread) and follow their changes."""
        self._thread.start()

    def take(self) -> Dirty | None:
        """The changes since the last ``take`` (None: they cannot be trusted, walk
        the whole root), and a new period from now on."""
        with self._lock:
            self._drain()
            dirty, sound = self._dirty, self._sound and not self._broken
            self._dirty, self._names, self._first, self._last = {}, 0, None, None
            self._sound = self._complete and not self._broken
        return dirty if sound else None

    def restart(self) -> None:
        """Forget what was seen so far and begin a period from now, sound if every
        directory is watched: the caller reads the whole root itself next."""
        self.take()

    def spoil(self) -> None:
        """The last ``take``'s changes did not reach a checkpoint: the next walks fully."""
        with self._lock:
            self._sound = False

    def pending(self) -> Pending:
        with self._lock:
            sound = self._sound and not self._broken
            return Pending(self._names, self._first, self._last, sound, self._broken)

    @property
    def watched(self) -> int:
        """How many directories are watched."""
        with self._lock:
            return len(self._wds)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._close_inotify()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the watch's thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._follow()
        except Exception as e:  # never a dead watch taken for a quiet root
            with self._lock:
                self._give_up(f"the watch failed: {e!r}")
        finally:
            self.ready.set()

    def _follow(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                rewatch = self._rewatch and not self._broken
            if rewatch:
                self._watch_all()
                self.ready.set()
            with self._lock:
                ino = self._inotify
            poller = select.poll()  # (select would fail past descriptor 1023)
            poller.register(self._wake_r, select.POLLIN)
            if ino is not None:
                poller.register(ino.fileno(), select.POLLIN)
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                continue  # closing, or everything to watch anew
            time.sleep(_READ_DELAY)
            with self._lock:
                first = self._names == 0
                self._drain()
                call = first and self._names > 0 and self.on_change is not None
            if call:
                assert self.on_change is not None
                self.on_change()

    def _watch_all(self) -> None:
        """A new inotify instance watching every directory; replaces the last."""
        try:
            ino = INotify()
        except OSError as e:
            with self._lock:
                self._rewatch = False
                self._give_up(
                    f"cannot make an inotify instance: {e.strerror} (fs.inotify.max_user_instances)"
                )
            return
        paths: dict[int, str] = {}
        wds: dict[str, int] = {}
        broken = self._add_tree(ino, "", paths, wds)
        with self._lock:
            self._close_inotify()
            self._rewatch = False
            if broken:
                ino.close()
                self._give_up(broken)
                return
            self._inotify, self._paths, self._wds = ino, paths, wds
            self._complete = True

    def _close_inotify(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._paths, self._wds = {}, {}

    def _give_up(self, reason: str) -> None:
        self._broken = reason
        self._complete = self._sound = False
        self._close_inotify()

    def _add_tree(self, ino: INotify, top: str, paths: dict[int, str], wds: dict[str, int]) -> str:
        """Watch ``top`` and every directory below it a checkpoint would walk; why
        not, if one could not be watched ("" when all were)."""
        names_by_dir = self._excluder.names_by_dir
        glob = self._excluder.glob
        stack = [top]
        while stack:
            d = stack.pop()
            path = os.path.join(self.root, d) if d else str(self.root)
            try:
                fd = os.open(path, _OPEN_FLAGS if d else _OPEN_FLAGS & ~os.O_NOFOLLOW)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # gone or replaced meanwhile: its parent's events say so
                return f"cannot open {path}: {e.strerror}"
            try:
                if os.fstat(fd).st_dev != self._root_dev:
                    continue  # a mount point: another filesystem, never watched
                try:
                    wd = ino.add_watch(f"/proc/self/fd/{fd}", _MASK)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        return (
                            f"the inotify watch limit is reached ({_watch_limit()} watches, "
                            "fs.inotify.max_user_watches)"
                        )
                    return f"cannot watch {path}: {e.strerror}"
                old = paths.get(wd)
                if old is not None:
                    wds.pop(old, None)
                paths[wd] = d
                wds[d] = wd
                prefix = f"{d}/" if d else ""
                excluded = names_by_dir.get(d)
                with os.scandir(fd) as it:
                    for de in it:
                        name = de.name
                        if (
                            (excluded is not None and name in excluded)
                            or (glob is not None and glob.match(prefix + name))
                            or name.startswith(RESTORE_TEMP_PREFIX)
                        ):
                            continue
                        try:
                            is_dir = de.is_dir(follow_symlinks=False)
                        except OSError:
                            continue
                        if is_dir:
                            stack.append(prefix + name)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    return f"cannot list {path}: {e.strerror}"
            finally:
                os.close(fd)
        return ""

    def _drain(self) -> None:
        """Read and note every event queued (the lock held)."""
        ino = self._inotify
        if ino is None:
            return
        try:
            events = ino.read(timeout=0)
        except OSError as e:
            self._give_up(f"cannot read the inotify events: {e.strerror}")
            return
        if not events:
            return
        for wd, mask, _, name in events:
            if mask & flags.Q_OVERFLOW:
                # Events were lost, new directories perhaps among them: this period
                # cannot be trusted, and everything is watched anew.
                self._sound = self._complete = False
                self._rewatch = True
                os.write(self._wake_w, b"x")
                return
            if mask & flags.IGNORED:
                gone = self._paths.pop(wd, None)
                if gone is not None and self._wds.get(gone) == wd:
                    del self._wds[gone]
                continue
            d = self._paths.get(wd)
            if d is None:
                continue
            if name:
                self._event(d, name, mask)
            elif mask & flags.ATTRIB and d:  # the directory's own metadata
                head, _, base = d.rpartition("/")
                self._note(head, base)
        now = self._now()
        self._last = now
        if self._first is None and self._names:
            self._first = now

    def _event(self, d: str, name: str, mask: int) -> None:
        path = join_path(d, name)
        if self._excluder.excluded(path):
            return
        self._note(d, name)
        if not mask & _NAMESPACE:
            return
        if d:  # the directory's own mtime moved
            head, _, base = d.rpartition("/")
            self._note(head, base)
        if not mask & flags.ISDIR or self._inotify is None:
            return
        if mask & flags.MOVED_FROM:
            self._unwatch(path)
        elif mask & (flags.CREATE | flags.MOVED_TO):
            # Whatever was written into it before it was watched: the checkpoint
            # walks a new directory whole, its watch follows what comes next.
            broken = self._add_tree(self._inotify, path, self._paths, self._wds)
            if broken:
                self._give_up(broken)

    def _note(self, d: str, name: str) -> None:
        names = self._dirty.get(d)
        if names is None:
            names = self._dirty[d] = set()
        if name not in names:
            names.add(name)
            self._names += 1

    def _unwatch(self, top: str) -> None:
        """Stop watching a directory moved away and all below it (their paths are
        stale; wherever it went in the root, it is watched anew there)."""
        assert self._inotify is not None
        below = top + "/"
        for d in [d for d in self._wds if d == top or d.startswith(below)]:
            wd = self._wds.pop(d)
            if self._paths.get(wd) == d:
                del self._paths[wd]
                with contextlib.suppress(OSError):  # gone already
                    self._inotify.rm_watch(wd)


def _watch_limit() -> str:
    try:
        return _WATCH_LIMIT.read_text().strip()
    except OSError:
        return "?"
