"""Reap orphans the agent adopts, without stealing its own children's exit status.

The agent is the container's entrypoint, and marks itself a child subreaper,
so processes the IDE leaves behind (a daemonized server, a kernel whose parent
died) become its children; unreaped they pile up as zombies.  A blanket
``waitpid(-1)`` would also collect the IDE and the agent's own helper
processes, whose waiters would then see a bogus exit code, so only zombies
outside the agent's session and not in ``managed`` are reaped (the IDE runs
in a session of its own, as do orphans it leaves); while ``managed`` returns
None (a child is being spawned, its pid not yet known) nothing is reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
from collections.abc import Callable, Collection

from agent.daemon.clock import Clock
from agent.log import get_logger

log = get_logger("daemon.reaper")

PR_SET_CHILD_SUBREAPER = 36

# Children this process spawned itself (the IDE of each supervisor in it): any
# other child in a session of its own was adopted, and is ended at stop.
_spawned: set[int] = set()


def spawned(pid: int) -> None:
    """Note a child this agent started (so it is never taken for an adopted one)."""
    _spawned.add(pid)


def exited(pid: int) -> None:
    _spawned.discard(pid)


def set_child_subreaper(on: bool = True) -> bool:
    """Ask Linux to give this process the orphans of its descendants; False if refused."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        rc = libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)
    except (OSError, AttributeError) as e:
        log.warning("reaper.subreaper_unavailable", error=str(e))
        return False
    if rc != 0:
        log.warning("reaper.subreaper_refused", errno=ctypes.get_errno())
        return False
    return True


def zombie_children() -> list[tuple[int, int]]:
    """(pid, session id) of this process's children that have exited but are not reaped."""
    return [(pid, sid) for pid, sid, zombie in children() if zombie]


def children() -> list[tuple[int, int, bool]]:
    """(pid, session id, whether a zombie) of this process's children."""
    me = os.getpid()
    out: list[tuple[int, int, bool]] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ..."; comm may hold spaces and parens
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) >= 4 and int(fields[1]) == me:
            out.append((int(entry), int(fields[3]), fields[0] == b"Z"))
    return out


class Reaper:
    def __init__(
        self,
        managed: Callable[[], Collection[int] | None],
        clock: Clock,
        interval: float = 5.0,
    ) -> None:
        self._managed = managed
        self._clock = clock
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._scheduled = False
        self._subreaper = False
        self.reaped = 0

    async def start(self) -> None:
        self._subreaper = set_child_subreaper(True)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signal.SIGCHLD, self._on_sigchld)
        self._task = asyncio.create_task(self._loop())
        log.info("reaper.started", subreaper=self._subreaper)

    def adopted(self) -> list[int]:
        """Live children this agent did not start: orphans of the IDE's that it adopted."""
        own_session = os.getsid(0)
        return [
            pid
            for pid, session, zombie in children()
            if not zombie and session != own_session and pid not in _spawned
        ]

    async def end_adopted(self, timeout: float) -> int:
        """SIGTERM every adopted process (its group when it leads one), SIGKILL what is
        left after ``timeout``, and reap them; how many there were.

        An IDE that double-forks a server of its own (``setsid``) leaves it outside
        the IDE's process group, so stopping the IDE does not reach it; as subreaper
        the agent is its parent, and the last one that can end it.
        """
        seen: set[int] = set()
        termed: set[int] = set()
        term_end = self._clock.monotonic() + timeout
        kill_end: float | None = None
        while True:
            self.reap()
            live = self.adopted()
            seen.update(live)
            now = self._clock.monotonic()
            if not live or (kill_end is not None and now >= kill_end):
                break
            if kill_end is None and now >= term_end:
                kill_end = now + 1.0  # SIGKILL ends them: only the reaping is left
            for pid in live:
                if kill_end is not None:
                    _signal(pid, signal.SIGKILL)
                elif pid not in termed:
                    log.info("reaper.ending_adopted", pid=pid)
                    _signal(pid, signal.SIGTERM)
                    termed.add(pid)
            await self._clock.sleep(0.05)
        return len(seen)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)
        for pid in self.adopted():  # a safety net: a stop has ended them already
            _signal(pid, signal.SIGKILL)
        if self._subreaper:
            set_child_subreaper(False)
        self.reap()

    def _on_sigchld(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._reap_soon)

    def _reap_soon(self) -> None:
        self._scheduled = False
        self.reap()

    async def _loop(self) -> None:
        while True:  # a safety net: signals coalesce, and an orphan may exit between scans
            await self._clock.sleep(self._interval)
            self.reap()

    def reap(self) -> int:
        """Reap adopted zombies now; returns how many."""
        own_session = os.getsid(0)
        pids = self._managed()
        if pids is None:  # a child is being spawned; the sweep comes back soon
            return 0
        managed = set(pids)
        n = 0
        for pid, session in zombie_children():
            if pid in managed or session == own_session:
                continue
            try:
                _, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            n += 1
            log.debug("reaper.reaped", pid=pid, exit=os.waitstatus_to_exitcode(status))
        self.reaped += n
        return n


def _signal(pid: int, sig: signal.Signals) -> None:
    """Signal ``pid``'s process group when it leads one (what it started goes too), else it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
