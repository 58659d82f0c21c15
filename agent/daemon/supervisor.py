"""The IDE as a supervised child: launch, readiness, output, restarts, stop.

The IDE runs in its own process group so a stop reaches everything it
started (kernels, language servers, terminals) with one signal, and leftovers
of a crashed IDE cannot hold its port against the restart.  Its status only
counts as ready once it answers HTTP: users then never meet the proxy's 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import aiohttp

from agent.backoff import Backoff
from agent.daemon import reaper
from agent.daemon.clock import Clock, with_timeout
from agent.errors import AgentError
from agent.log import get_logger

log = get_logger("daemon.ide")

_CHUNK = 64 << 10
PROBE_TIMEOUT = 5.0  # an answer slower than this counts as none
PROBE_NOTE_EVERY = 5.0  # how often a probe that gets no answer says so
PIPE_GRACE = 1.0  # how long the output pumps may drain after the IDE exited


class IdeState(StrEnum):
    PENDING = "pending"  # not launched yet
    STARTING = "starting"  # launched, not answering HTTP yet
    READY = "ready"
    BACKOFF = "backoff"  # exited; waiting before the next launch
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # crash-looped; given up


class IdeFailed(AgentError):
    """The IDE kept failing; ``last_output`` holds its final lines for the report."""

    def __init__(self, message: str, last_output: list[str]) -> None:
        super().__init__(message)
        self.last_output = last_output


@dataclass(frozen=True, slots=True)
class OutputLine:
    seq: int
    time: datetime
    stream: str
    text: str


class RingBuffer:
    """The IDE's recent output, bounded in lines and line length, with followers.

    Bounded so a chatty IDE cannot grow the agent's memory; followers (the
    logs API) wait on it without polling.
    """

    def __init__(self, clock: Clock, max_lines: int = 2000, max_line: int = 8192) -> None:
        self._clock = clock
        self._lines: deque[OutputLine] = deque(maxlen=max_lines)
        self._max_line = max_line
        self._seq = 0
        self._closed = False
        self._changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def closed(self) -> bool:
        return self._closed

    def append(self, stream: str, text: str) -> None:
        if len(text) > self._max_line:
            text = text[: self._max_line] + "...[truncated]"
        self._seq += 1
        self._lines.append(OutputLine(self._seq, self._clock.now(), stream, text))
        self._wake()

    def tail(self, n: int) -> list[OutputLine]:
        if n <= 0:
            return []
        return list(self._lines)[-n:]

    def after(self, seq: int) -> list[OutputLine]:
        return [line for line in self._lines if line.seq > seq]

    async def wait_after(self, seq: int) -> bool:
        """Wait for a line newer than ``seq``; False once the buffer is closed."""
        while self._seq <= seq and not self._closed:
            await self._changed.wait()
        return self._seq > seq

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        probe_url: str,
        *,
        clock: Clock,
        output: RingBuffer,
        ready_timeout: float,
        stop_timeout: float,
        max_failures: int,
        failure_window: float,
        probe_interval: float = 0.5,
        backoff: Backoff | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        if not argv:
            raise AgentError("no IDE command given")
        self.argv = list(argv)
        self._env = dict(env)
        self.probe_url = probe_url
        self._clock = clock
        self.output = output
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        # ide_max_restarts failed starts error the session; 0 means the first failure does
        self._max_failures = max(1, max_failures)
        self._window = failure_window
        self._probe_interval = probe_interval
        self._backoff = backoff or Backoff(0.5, 30.0)
        self._on_restart = on_restart

        self.state = IdeState.PENDING
        self.pid: int | None = None
        self.spawning = False  # between fork and knowing the pid
        self.restarts = 0
        self.last_exit: str | None = None
        self.ready = asyncio.Event()  # set once the IDE first answered; stays set
        self._failures: deque[float] = deque()
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._late_stop: asyncio.Task[None] | None = None

    # -- public -----------------------------------------------------------------

    def last_output(self, n: int = 20) -> list[str]:
        return [line.text for line in self.output.tail(n)]

    async def run(self) -> None:
        """Keep the IDE running until ``stop``; raise IdeFailed when it crash-loops."""
        try:
            while not self._stopping:
                started = self._clock.monotonic()
                exit_desc = await self._run_once()
                if self._stopping:
                    break
                self.last_exit = exit_desc
                now = self._clock.monotonic()
                self._failures.append(now)
                while self._failures and now - self._failures[0] > self._window:
                    self._failures.popleft()
                log.warning(
                    "ide.exited",
                    exit=exit_desc,
                    failures=len(self._failures),
                    window=self._window,
                    ran=round(now - started, 3),
                )
                if len(self._failures) >= self._max_failures:
                    self.state = IdeState.FAILED
                    raise IdeFailed(
                        f"the IDE failed {len(self._failures)} times within "
                        f"{self._window:g}s (last: {exit_desc})",
                        self.last_output(),
                    )
                if now - started > self._backoff.cap:
                    self._backoff.reset()
                delay = self._backoff.next()
                self.state = IdeState.BACKOFF
                log.info("ide.restart_scheduled", delay=delay, restarts=self.restarts + 1)
                with contextlib.suppress(TimeoutError):
                    await with_timeout(self._clock, delay, self._stop_requested.wait())
                if self._stopping:
                    break
                self.restarts += 1
                if self._on_restart is not None:
                    self._on_restart()
        finally:
            if self.state is not IdeState.FAILED:
                self.state = IdeState.STOPPED
            self.pid = None
            self._stopped.set()

    async def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the IDE's process group, SIGKILL it after ``timeout`` (default: stop timeout)."""
        self._stopping = True
        self._stop_requested.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self.state = IdeState.STOPPING
            await self._terminate(proc, "stop requested", timeout)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- one launch -------------------------------------------------------------

    async def _run_once(self) -> str:
        self.state = IdeState.STARTING
        self.spawning = True
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                start_new_session=True,  # own session and process group: pgid == pid
            )
        except OSError as e:
            msg = f"cannot start the IDE {self.argv[0]!r}: {e.strerror or e}"
            self.output.append("agent", msg)
            log.error("ide.spawn_failed", argv=self.argv, error=msg)
            return msg
        finally:
            self.spawning = False
        self._proc = proc
        self.pid = proc.pid
        reaper.spawned(proc.pid)
        log.info("ide.started", pid=proc.pid, argv=self.argv, restarts=self.restarts)
        if self._stopping:  # stop() came while we were spawning
            self._late_stop = asyncio.create_task(self._terminate(proc, "stop requested"))
        pumps = [
            asyncio.create_task(self._pump(proc.stdout, "stdout")),
            asyncio.create_task(self._pump(proc.stderr, "stderr")),
        ]
        probe = asyncio.create_task(self._probe(proc))
        try:
            code = await proc.wait()
            reaper.exited(proc.pid)
        finally:
            probe.cancel()
            await asyncio.wait([probe])
            if not probe.cancelled() and probe.exception() is not None:
                log.error("ide.probe_failed", error=repr(probe.exception()))
            # leftovers of the group (kernels, servers) would hold the port and the pipes
            _killpg(proc.pid, signal.SIGKILL)
            # a daemonized grandchild may still hold the pipes open: don't wait on it forever
            with contextlib.suppress(TimeoutError):
                await with_timeout(self._clock, PIPE_GRACE, asyncio.wait(pumps))
            for p in pumps:
                p.cancel()
            self._proc = None
            self.pid = None
        desc = describe_exit(code)
        log.info("ide.exit", pid=proc.pid, exit=desc, requested=self._stopping)
        return desc

    async def _terminate(
        self, proc: asyncio.subprocess.Process, why: str, timeout: float | None = None
    ) -> None:
        grace = self._stop_timeout if timeout is None else max(0.0, timeout)
        log.info("ide.sigterm", pid=proc.pid, why=why, timeout=grace)
        _killpg(proc.pid, signal.SIGTERM)
        try:
            await with_timeout(self._clock, grace, proc.wait())
        except TimeoutError:
            log.warning("ide.sigkill", pid=proc.pid, after=grace)
            _killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        _killpg(proc.pid, signal.SIGKILL)

    async def _pump(self, stream: asyncio.StreamReader | None, name: str) -> None:
        if stream is None:
            return
        partial = b""
        while True:
            chunk = await stream.read(_CHUNK)
            if not chunk:
                break
            partial += chunk
            *lines, partial = partial.split(b"\n")
            for raw in lines:
                self._line(name, raw)
            if len(partial) > _CHUNK:  # a line without end: emit it in pieces
                self._line(name, partial)
                partial = b""
        if partial:
            self._line(name, partial)

    def _line(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.output.append(stream, text)
        log.info("ide.output", stream=stream, line=text)

    async def _probe(self, proc: asyncio.subprocess.Process) -> None:
        """Poll the IDE over HTTP until it answers; after a restart, bound that by ready_timeout."""
        started = self._clock.monotonic()
        deadline = started + self._ready_timeout if self.ready.is_set() else None
        note_at = started + PROBE_NOTE_EVERY
        log.info("ide.probing", pid=proc.pid, url=self.probe_url)
        async with aiohttp.ClientSession() as http:
            while proc.returncode is None:
                try:
                    status = await with_timeout(
                        self._clock, PROBE_TIMEOUT, _probe_once(http, self.probe_url)
                    )
                except TimeoutError:
                    status = None
                now = self._clock.monotonic()
                if now >= note_at:
                    # an IDE on another port than tool_port looks like this until ready_timeout
                    log.info(
                        "ide.not_answering",
                        pid=proc.pid,
                        url=self.probe_url,
                        http_status=status,
                        waited=round(now - started, 1),
                    )
                    note_at = now + PROBE_NOTE_EVERY
                if status is not None and status < 500:
                    self.state = IdeState.READY
                    if not self.ready.is_set():
                        log.info("ide.ready", pid=proc.pid, http_status=status, url=self.probe_url)
                    else:
                        log.info("ide.ready_again", pid=proc.pid, restarts=self.restarts)
                    self.ready.set()
                    return
                if deadline is not None and self._clock.monotonic() >= deadline:
                    self.output.append(
                        "agent", f"the IDE did not answer within {self._ready_timeout:g}s"
                    )
                    await self._terminate(proc, "not ready in time")
                    return
                await self._clock.sleep(self._probe_interval)


async def _probe_once(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(url, allow_redirects=False) as resp:
            return resp.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
