"""One agent process per state dir: an exclusive ``flock`` held for the process's life.

Two processes working on one root's session (a ``checkpoint`` beside the
daemon, a second ``run``) would each move the parent state under the other,
and from then on every checkpoint of one of them fails.  The lock file says
who holds it (pid, command, and the daemon's API address), so a second
process can name the holder, or send its request to the daemon's API.  The
kernel drops the lock when its holder dies, however it dies: holding it also
proves that no other process of this agent is live on the state dir, which
is what makes clearing a dead one's leftovers safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError

LOCK_FILE = "owner.lock"


class StateDirBusy(AgentError):
    """Another live process of this agent owns the state dir."""

    def __init__(self, message: str, holder: Holder | None, state_dir: Path) -> None:
        super().__init__(message)
        self.holder = holder
        self.state_dir = state_dir


@dataclass(frozen=True, slots=True)
class Holder:
    """What the lock file says about the process that holds it."""

    pid: int
    command: str
    api: str = ""  # the daemon's local API, http://host:port, once it listens

    def describe(self) -> str:
        what = "the session daemon" if self.command == "run" else f"'{self.command}'"
        return f"{what} (pid {self.pid})"


class Owner:
    """The lock of one state dir; ``acquire`` it, ``release`` it (or just exit)."""

    def __init__(self, state_dir: Path, command: str) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now or raise ``StateDirBusy`` naming its holder."""
        if self._fd is not None:
            return
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except (NotADirectoryError, FileExistsError):
            raise AgentError(f"the state dir {self.state_dir} is not a directory") from None
        except OSError as e:
            raise AgentError(f"cannot use the state dir {self.state_dir}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(self.state_dir)
            who = holder.describe() if holder else "another studio-agent process"
            raise StateDirBusy(
                f"{who} is using the state dir {self.state_dir}; only one agent process "
                "may work on a root at a time",
                holder,
                self.state_dir,
            ) from None
        self._fd = fd
        self._write(Holder(os.getpid(), self.command))

    def announce_api(self, url: str) -> None:
        """Say where the daemon's local API listens, for one-shot commands to find it."""
        if self._fd is not None:
            self._write(Holder(os.getpid(), self.command, url))

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor drops the lock

    def _write(self, holder: Holder) -> None:
        assert self._fd is not None
        data = json.dumps({"pid": holder.pid, "command": holder.command, "api": holder.api})
        with contextlib.suppress(OSError):  # the lock is what counts; the note only helps
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data.encode() + b"\n", 0)

    def __enter__(self) -> Owner:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(state_dir: Path) -> Holder | None:
    """Who the lock file names (it may be stale: only the flock tells whether it is held)."""
    try:
        doc: Any = json.loads((state_dir / LOCK_FILE).read_text() or "null")
        return Holder(int(doc["pid"]), str(doc["command"]), str(doc.get("api", "")))
    except (OSError, ValueError, TypeError, KeyError):
        return None
