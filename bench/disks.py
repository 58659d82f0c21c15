"""Fresh filesystems for the benchmark's restores, one per restore (needs root).

- ``tmpfs``: a fast disk, where creating files costs only CPU.
- ``slow``: a disk on which every write waits for the device: a new ext4 without
  a journal on a sparse loop file with direct I/O (so the host's page cache does
  not absorb the writes), mounted ``sync``.  Without a journal, writes in flight
  at once reach the device at once, as on a disk whose latency, not its
  bandwidth, is the limit.

A new filesystem each time matters on ext4 without a journal (this machine's
own disk is one): creating files within a minute or so of deleting as many
makes the kernel skip every recently freed inode, scanning the inode table
(``recently_deleted``), which can cost more CPU than the restore itself, and
penalises whichever step runs soonest after the last round's trees went.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

KINDS = ("scratch", "tmpfs", "slow")


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


class Disks:
    def __init__(self, kind: str, scratch: Path) -> None:
        if kind not in KINDS:
            raise ValueError(kind)
        self.kind = kind
        self.scratch = scratch
        self._mounted: list[tuple[Path, str | None]] = []  # mount point, loop device

    def new(self, name: str) -> Path:
        """An empty directory to restore into, on a filesystem of its own."""
        mnt = self.scratch / f"disk-{name}"
        mnt.mkdir(parents=True, exist_ok=True)
        if self.kind == "tmpfs":
            _run("mount", "-t", "tmpfs", "-o", "size=8g", "tmpfs", str(mnt))
            self._mounted.append((mnt, None))
        elif self.kind == "slow":
            image = self.scratch / f"disk-{name}.img"
            image.unlink(missing_ok=True)
            _run("truncate", "-s", "8G", str(image))
            _run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", str(image))
            loop = _run("losetup", "--direct-io=on", "-f", "--show", str(image))
            _run("mount", "-o", "sync", loop, str(mnt))
            self._mounted.append((mnt, loop))
        target = mnt / "target"
        target.mkdir()
        return target

    def release(self) -> None:
        """Unmount (and delete) every filesystem made so far."""
        while self._mounted:
            mnt, loop = self._mounted.pop()
            subprocess.run(["umount", str(mnt)], check=False)
            if loop is not None:
                subprocess.run(["losetup", "-d", loop], check=False)
                (mnt.parent / f"{mnt.name}.img").unlink(missing_ok=True)
            mnt.rmdir()
