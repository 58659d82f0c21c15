"""A restore's free-space guard: a layer that declares more than the disk holds
(a decompression bomb, or a checkpoint too big for this machine) stops with a
clear error before it fills the root's filesystem.

Each entry's size is known from its header before a byte of it is written, so
it is charged first.  The filesystem is asked (``fstatvfs``) only when what was
charged since the last look exceeds half of what that look found spare: a few
looks per restore, whatever its size, and more only as the disk gets full.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from agent.errors import NoSpace

# Charged per entry on top of its content: its inode, directory entry and the
# partly used last block.
ENTRY_OVERHEAD = 4096
# Left free: what the rest of the system needs to keep running.
RESERVE_FRACTION = 0.02
RESERVE_MAX = 256 << 20


def default_reserve(fd: int) -> int:
    v = os.fstatvfs(fd)
    return min(RESERVE_MAX, int(v.f_blocks * v.f_frsize * RESERVE_FRACTION))


class FreeSpace:
    """Charges what a restore writes against the free space (and inodes) of the
    filesystem holding ``fd``, keeping ``reserve`` bytes free.  ``unwritten``
    tells how many bytes already charged are still on their way to the disk
    (files writer threads are finishing), which a look cannot see gone yet."""

    def __init__(
        self, fd: int, reserve: int | None = None, unwritten: Callable[[], int] | None = None
    ) -> None:
        self._fd = fd
        self.reserve = default_reserve(fd) if reserve is None else reserve
        self._unwritten = unwritten
        self._bytes = 0  # may be charged before the next look
        self._inodes = 0

    def charge(self, size: int, what: str) -> None:
        self._bytes -= size + ENTRY_OVERHEAD
        self._inodes -= 1
        if self._bytes < 0 or self._inodes < 0:
            self._look(size, what)

    def budget(self) -> tuple[int, int]:
        """(bytes, inodes) that may be charged, entries' overhead included,
        before the filesystem is looked at again."""
        return self._bytes, self._inodes

    def charged(self, content: int, entries: int) -> None:
        """``entries`` of ``content`` bytes in all were written within ``budget``."""
        self._bytes -= content + entries * ENTRY_OVERHEAD
        self._inodes -= entries

    def _look(self, size: int, what: str) -> None:
        v = os.fstatvfs(self._fd)
        # What was charged before this entry is written already, so it is gone
        # from what the filesystem reports, but for what writers still hold;
        # this entry is not.
        spare = v.f_bavail * v.f_frsize - self.reserve - size - ENTRY_OVERHEAD
        if self._unwritten is not None:
            spare -= self._unwritten()
        if spare < 0:
            raise NoSpace(
                f"refused {what!r} ({size} bytes): the root's filesystem has "
                f"{v.f_bavail * v.f_frsize} bytes free and the restore keeps "
                f"{self.reserve} of them free (a layer larger than the disk, or a "
                "decompression bomb)"
            )
        self._bytes = spare // 2
        # Filesystems without an inode limit report 0 of them.
        if v.f_files:
            spare_inodes = v.f_favail - max(16, v.f_files // 100) - 1
            if spare_inodes < 0:
                raise NoSpace(
                    f"refused {what!r}: the root's filesystem has {v.f_favail} inodes free"
                )
            self._inodes = spare_inodes // 2
        else:
            self._inodes = 1 << 62
