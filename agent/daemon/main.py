"""The session daemon: composes lifecycle, session, supervisor, API and reporting.

One session, start to exit::

    starting   restore (latest valid checkpoint, or the one asked for), mark the
               session's checkpoint empty, launch the IDE, wait until it answers
    running    periodic interim checkpoints; the IDE restarted when it exits
    stopping   SIGTERM/SIGINT/API: IDE group SIGTERM then SIGKILL, final checkpoint
    stopped    exit 0; errored (restore failed, IDE never ready or crash-looping): exit 1

Everything from the stop request to exit fits in ``stop_grace`` (the platform
sends SIGKILL 30 s after SIGTERM).  A final checkpoint that cannot finish in
time is abandoned before its ref is written, so the last interim checkpoint
stays the valid one, and the control plane is told.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from agent import __version__
from agent.checkpoint.manifest import CheckpointState
from agent.daemon.api import ApiServer, Busy
from agent.daemon.clock import Clock, SystemClock, with_timeout
from agent.daemon.control_plane import ControlPlane
from agent.daemon.lifecycle import Lifecycle, Status, Transition
from agent.daemon.metrics import Metrics
from agent.daemon.reaper import Reaper
from agent.daemon.resources import read_resources
from agent.daemon.supervisor import IdeFailed, RingBuffer, Supervisor
from agent.errors import AgentError, ConfigError
from agent.log import get_logger, setup_logging
from agent.session import CheckpointInfo, CheckpointResult, Progress, Session, StartOutcome
from agent.settings import Settings
from agent.store import Store, open_store

log = get_logger("daemon")

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERRORED = 1
EXIT_CONFIG = 2

_MAX_SKIPPED_REPORTED = 100

SessionFactory = Callable[[Settings, Store], Session]


def result_json(result: CheckpointResult) -> dict[str, Any]:
    return {
        "checkpoint": result.info.to_json(),
        "changed": result.changed,
        "layer_size": result.layer_size,
        "duration": round(result.duration, 6),
        "skipped": [
            {"path": s.path, "reason": s.reason} for s in result.skipped[:_MAX_SKIPPED_REPORTED]
        ],
        "skipped_total": len(result.skipped),
    }


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def probe_url(settings: Settings) -> str:
    prefix = "/" + settings.tool_path_prefix.strip("/")
    path = settings.ready_path.lstrip("/")
    base = prefix.rstrip("/")
    return f"http://127.0.0.1:{settings.tool_port}{base}/{path}"


def ide_environment(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The IDE's environment: the agent's, less its secrets, plus where to listen."""
    env = dict(os.environ if base is None else base)
    for secret in ("STUDIO_API_TOKEN", "STUDIO_CONTROL_PLANE_TOKEN"):
        env.pop(secret, None)
    port, prefix = str(settings.tool_port), settings.tool_path_prefix
    env.update(
        STUDIO_TOOL_PORT=port,
        CONNECT_TOOL_PORT=port,
        STUDIO_TOOL_PATH_PREFIX=prefix,
        CONNECT_TOOL_PATH_PREFIX=prefix,
    )
    return env


@dataclass(slots=True)
class _SessionCheckpoint:
    """What the status says about the session's own checkpoint."""

    info: CheckpointInfo | None = None
    duration: float | None = None
    changed: int | None = None
    last_attempt: datetime | None = None
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        i = self.info
        return {
            "name": i.name if i else None,
            "state": CheckpointState(i.state).value if i else None,
            "updated": _iso(i.updated) if i else None,
            "duration": round(self.duration, 6) if self.duration is not None else None,
            "size": i.size if i else None,
            "layers": i.layers if i else None,
            "changed": self.changed,
            "last_attempt": _iso(self.last_attempt) if self.last_attempt else None,
            "last_error": self.last_error,
        }


class Daemon:
    """One session of one studio.  ``run`` returns the process exit code."""

    def __init__(
        self,
        settings: Settings,
        ide_argv: list[str],
        *,
        store: Store | None = None,
        clock: Clock | None = None,
        session_factory: SessionFactory = Session,
        handle_signals: bool = True,
        reap_orphans: bool = True,
    ) -> None:
        self.settings = settings
        self.argv = list(ide_argv) or list(settings.ide_command)
        self.clock: Clock = clock or SystemClock()
        self._store = store
        self._session_factory = session_factory
        self._handle_signals = handle_signals
        self._reap_orphans = reap_orphans

        self.metrics = Metrics()
        self.output = RingBuffer(self.clock)
        self.lifecycle = Lifecycle(self.clock)
        self.lifecycle.subscribe(self._on_transition)
        self.api: ApiServer | None = None
        self.control_plane: ControlPlane | None = None
        self.supervisor: Supervisor | None = None
        self.session: Session | None = None
        self.outcome: StartOutcome | None = None
        self.token = ""
        # set once the final checkpoint or restore was abandoned mid-flight: its
        # worker thread may still run, and must not hold up the exit
        self.abandoned_work = False

        self._started = False  # Session.start succeeded
        self._session_started_at: datetime | None = None
        self._progress: Progress | None = None  # written from worker threads
        self._ckpt = _SessionCheckpoint()
        self._stop_requested = asyncio.Event()
        self._stop_reason = ""
        self._stop_at: float | None = None
        self._ide_failure: IdeFailed | None = None
        self._periodic: asyncio.Task[CheckpointResult | None] | None = None
        self._ticker_task: asyncio.Task[None] | None = None
        self._reaper: Reaper | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    # -- the API backend ----------------------------------------------------------------

    @property
    def status_value(self) -> str:
        return self.lifecycle.status.value

    def request_stop(self, reason: str) -> None:
        if not self._stop_requested.is_set():
            log.info("daemon.stop_requested", reason=reason)
            self._stop_reason = reason
            self._stop_at = self.clock.monotonic()
            self._stop_requested.set()
            self.lifecycle.move(Status.STOPPING, reason)  # at once: the user sees it stopping

    async def status_json(self, *, with_control_plane: bool = True) -> dict[str, Any]:
        sup = self.supervisor
        resources = await asyncio.to_thread(
            read_resources, self.settings.root, sup.pid if sup else None
        )
        doc: dict[str, Any] = {
            "studio": self.settings.studio,
            "status": self.lifecycle.status.value,
            "reason": self.lifecycle.reason,
            "since": _iso(self.lifecycle.since),
            "ide": self._ide_json(),
            "session": self._session_json(),
            "restore": self._restore_json(),
            "resources": resources.to_json(),
        }
        if with_control_plane:
            cp = self.control_plane
            doc["control_plane"] = (
                {
                    "url": self.settings.control_plane_url,
                    "reachable": cp.reachable,
                    "last_error": cp.last_error,
                    "heartbeat_interval": cp.interval,
                }
                if cp
                else None
            )
        return doc

    async def checkpoint_now(self, name: str | None) -> dict[str, Any]:
        if self.lifecycle.status is not Status.RUNNING or self.session is None:
            raise Busy(f"cannot checkpoint while the session is {self.lifecycle.status.value}")
        own = name is None or name == self.session.auto_name
        state = CheckpointState.INTERIM if own else CheckpointState.FINALIZED
        result = await self._checkpoint("manual", state, name=name, raise_errors=True)
        assert result is not None
        return result_json(result)

    async def list_checkpoints(self) -> list[dict[str, Any]]:
        session = self.session
        if session is None:
            raise Busy("the session has not started yet")
        return [i.to_json() for i in await session.list_checkpoints()]

    async def rename_checkpoint(self, old: str, new: str) -> dict[str, Any]:
        session = self.session
        if session is None or not self._started:
            raise Busy(f"cannot rename while the session is {self.lifecycle.status.value}")
        info = await session.rename(old, new)
        if self._ckpt.info is not None and self._ckpt.info.name == old:
            self._ckpt.info = info
        log.info("checkpoint.renamed", old=old, new=info.name)
        return info.to_json()

    # -- status pieces ------------------------------------------------------------------

    def _ide_json(self) -> dict[str, Any]:
        sup = self.supervisor
        failed = self._ide_failure
        return {
            "state": sup.state.value if sup else "pending",
            "pid": sup.pid if sup else None,
            "restarts": sup.restarts if sup else 0,
            "last_exit": sup.last_exit if sup else None,
            "command": self.argv,
            "probe_url": probe_url(self.settings),
            "last_output": failed.last_output if failed else [],
        }

    def _session_json(self) -> dict[str, Any]:
        session, outcome = self.session, self.outcome
        return {
            "id": session.session_id if session is not None and self._started else None,
            "started": _iso(self._session_started_at) if self._session_started_at else None,
            "restored": outcome.restored.to_json() if outcome and outcome.restored else None,
            "invalidated": [i.to_json() for i in outcome.invalidated] if outcome else [],
            "checkpoint": self._ckpt.to_json(),
        }

    def _restore_json(self) -> dict[str, Any] | None:
        p = self._progress
        if p is None or self._started:
            return None
        return p.to_json()

    def _on_progress(self, p: Progress) -> None:
        self._progress = p  # one reference store: safe from any thread

    def _event_body(self, t: Transition) -> dict[str, Any]:
        return {
            "studio": self.settings.studio,
            "status": t.status.value,
            "previous": t.previous.value if t.previous else None,
            "reason": t.reason,
            "time": _iso(t.at),
            "session": self._session_json(),
            "ide": self._ide_json(),
        }

    def _on_transition(self, t: Transition) -> None:
        self.metrics.status.state(t.status.value)
        if self.control_plane is not None:
            self.control_plane.event("status", self._event_body(t))

    def _notify(self, kind: str, reason: str, **extra: Any) -> None:
        """A notice for the control plane besides a status change."""
        if self.control_plane is None:
            return
        body = {
            "studio": self.settings.studio,
            "status": self.lifecycle.status.value,
            "reason": reason,
            "time": _iso(self.clock.now()),
            "session": self._session_json(),
            **extra,
        }
        self.control_plane.event(kind, body)

    # -- checkpoints --------------------------------------------------------------------

    async def _checkpoint(
        self,
        kind: str,
        state: CheckpointState,
        *,
        name: str | None = None,
        skip_unchanged: bool = False,
        raise_errors: bool = False,
    ) -> CheckpointResult | None:
        session = self.session
        assert session is not None
        own = name is None or name == session.auto_name
        if own:
            self._ckpt.last_attempt = self.clock.now()
        try:
            result = await session.checkpoint(name, state, skip_unchanged=skip_unchanged)
        except AgentError as e:
            self.metrics.checkpoint_failures.labels(kind).inc()
            log.error("checkpoint.failed", kind=kind, error=str(e))
            if own:
                self._ckpt.last_error = str(e)
            if kind == "periodic":
                self._notify("checkpoint_failed", f"periodic checkpoint failed: {e}")
            if raise_errors:
                raise
            return None
        if result is None:
            self.metrics.checkpoint_unchanged.inc()
            log.debug("checkpoint.unchanged", kind=kind)
            if own:
                self._ckpt.last_error = None
            return None
        self.metrics.checkpoint_duration.labels(kind).observe(result.duration)
        self.metrics.checkpoint_layer_bytes.labels(kind).observe(result.layer_size)
        if result.info.name == session.auto_name:
            self.metrics.checkpoint_size.set(result.info.size)
            self._ckpt.info = result.info
            self._ckpt.duration = result.duration
            self._ckpt.changed = result.changed
            self._ckpt.last_error = None
        log.info(
            "checkpoint.done",
            kind=kind,
            name=result.info.name,
            state=CheckpointState(result.info.state).value,
            changed=result.changed,
            layer_size=result.layer_size,
            size=result.info.size,
            seconds=round(result.duration, 3),
            skipped=len(result.skipped),
        )
        return result

    async def _ticker(self) -> None:
        """Interim checkpoints every interval; a failure waits for the next tick, never more."""
        while True:
            await self.clock.sleep(self.settings.checkpoint_interval)
            self._periodic = asyncio.create_task(
                self._checkpoint("periodic", CheckpointState.INTERIM, skip_unchanged=True)
            )
            # shielded: stopping the ticker must not abandon a checkpoint half-way
            await asyncio.shield(self._periodic)

    # -- run ------------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            return await self._run()
        except ConfigError:
            raise
        except Exception as e:  # never leave without telling what became of the session
            if isinstance(e, AgentError):
                log.error("daemon.failed", error=str(e))
            else:
                log.exception("daemon.crashed")
            self.lifecycle.move(Status.ERRORED, f"the agent failed: {e}")
            with contextlib.suppress(Exception):
                await self._finish()
            return EXIT_ERRORED
        finally:
            await self._cleanup()

    async def _run(self) -> int:
        s = self.settings
        if not self.argv:
            raise ConfigError(
                "no IDE command: pass it after '--' (studio-agent run -- CMD ...) "
                "or set STUDIO_IDE_COMMAND"
            )
        store = self._store or open_store(s)
        self._store = store
        self.session = self._session_factory(s, store)
        self.token = self._api_token()
        self.api = ApiServer(self, self.token, s.api_host, s.api_port)
        if s.control_plane_url:
            self.control_plane = ControlPlane(
                s.control_plane_url,
                s.control_plane_token,
                s.studio,
                clock=self.clock,
                interval=s.heartbeat_interval,
                snapshot=lambda: self.status_json(with_control_plane=False),
                metrics=self.metrics,
            )
            self._spawn(self.control_plane.run(), "control plane")
            self.control_plane.event("status", self._event_body(self.lifecycle.history[0]))
        try:
            await self.api.start()
        except ConfigError as e:
            self.lifecycle.move(Status.ERRORED, str(e))
            return await self._finish()
        if self._reap_orphans:
            self._reaper = Reaper(self._managed_pids, self.clock)
            await self._reaper.start()
        self._install_signals()
        log.info(
            "daemon.started",
            version=__version__,
            studio=s.studio,
            root=str(s.root),
            store=store.url,
            api_port=self.api.port,
            ide=self.argv,
            control_plane=s.control_plane_url or None,
        )

        # -- restore, then the session's own checkpoint
        if not await self._start_session():
            return await self._finish()

        if self._stop_requested.is_set():  # stopped while restoring: no IDE to start
            return await self._shutdown(None)

        # -- the IDE
        self.supervisor = Supervisor(
            self.argv,
            ide_environment(s),
            probe_url(s),
            clock=self.clock,
            output=self.output,
            ready_timeout=s.ready_timeout,
            stop_timeout=s.ide_stop_timeout,
            max_failures=s.ide_max_restarts,
            failure_window=s.ide_restart_window,
            on_restart=self.metrics.ide_restarts.inc,
        )
        sup_task = self._spawn(self.supervisor.run(), "ide supervisor")
        failure = await self._wait_ready(sup_task)
        if failure is None and not self._stop_requested.is_set():
            self._ticker_task = self._spawn(self._ticker(), "checkpoint ticker")
            failure = await self._wait_running(sup_task)
        return await self._shutdown(failure)

    async def _start_session(self) -> bool:
        session = self.session
        assert session is not None
        t0 = self.clock.monotonic()
        start = asyncio.ensure_future(
            session.start(self.settings.restore_from, progress=self._on_progress)
        )
        stop = asyncio.ensure_future(self._stop_requested.wait())
        await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not start.done():
            start.cancel()
            self.abandoned_work = True
            self.lifecycle.move(Status.STOPPED, f"{self._stop_reason} (during restore)")
            return False
        try:
            self.outcome = start.result()
        except AgentError as e:
            self.lifecycle.move(Status.ERRORED, f"restore failed: {e}")
            return False
        self._started = True
        self._session_started_at = self.clock.now()
        elapsed = self.clock.monotonic() - t0
        self.metrics.restore_duration.set(elapsed)
        if self._progress is not None:
            self.metrics.restore_bytes.set(self._progress.bytes_total)
        restored = self.outcome.restored
        log.info(
            "session.started",
            session=session.session_id,
            checkpoint=session.auto_name,
            restored=f"{restored.studio}/{restored.name}" if restored else None,
            invalidated=[i.name for i in self.outcome.invalidated],
            seconds=round(elapsed, 3),
        )
        if self.outcome.invalidated:
            names = ", ".join(i.name for i in self.outcome.invalidated)
            self._notify(
                "checkpoints_invalidated",
                f"unsound interim checkpoints marked invalid: {names}",
                invalidated=[i.to_json() for i in self.outcome.invalidated],
            )
        try:
            self._ckpt.info = await session.mark(CheckpointState.EMPTY)
        except AgentError as e:
            # the IDE matters more than this marker; the next checkpoint writes the ref
            log.error("checkpoint.mark_failed", error=str(e))
            self._ckpt.last_error = str(e)
            self._notify("checkpoint_failed", f"cannot write the session's checkpoint: {e}")
        return True

    async def _wait_ready(self, sup_task: asyncio.Task[None]) -> str | None:
        """None once the IDE answers (status running) or a stop came; else why it failed."""
        sup = self.supervisor
        assert sup is not None
        ready = asyncio.ensure_future(sup.ready.wait())
        stop = asyncio.ensure_future(self._stop_requested.wait())
        timer = asyncio.ensure_future(self.clock.sleep(self.settings.ready_timeout))
        try:
            await asyncio.wait({ready, stop, timer, sup_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (ready, stop, timer):
                f.cancel()
        if sup.ready.is_set():
            self.lifecycle.move(Status.RUNNING, f"the IDE answers at {sup.probe_url}")
            return None
        if self._stop_requested.is_set():
            return None
        if sup_task.done():
            return self._ide_failed(sup_task)
        self._ide_failure = IdeFailed("", sup.last_output())
        return f"the IDE did not answer at {sup.probe_url} within {self.settings.ready_timeout:g}s"

    async def _wait_running(self, sup_task: asyncio.Task[None]) -> str | None:
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({stop, sup_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if self._stop_requested.is_set():
            return None
        return self._ide_failed(sup_task)

    def _ide_failed(self, sup_task: asyncio.Task[None]) -> str:
        exc = sup_task.exception() if not sup_task.cancelled() else None
        if isinstance(exc, IdeFailed):
            self._ide_failure = exc
            tail = " | ".join(exc.last_output[-5:])
            return f"{exc}; last output: {tail}" if tail else str(exc)
        if exc is not None:
            log.error("ide.supervisor_crashed", error=repr(exc))
            return f"IDE supervision failed: {exc!r}"
        return "the IDE supervisor ended unexpectedly"

    async def _shutdown(self, failure: str | None) -> int:
        """Stop the IDE, write the final checkpoint, settle the status: all within the grace."""
        if self._stop_at is None:
            self._stop_at = self.clock.monotonic()
        reason = failure or self._stop_reason
        self.lifecycle.move(Status.STOPPING, reason)
        s = self.settings
        margin = min(2.0, s.stop_grace * 0.1)  # for the last event and the exit itself
        deadline = self._stop_at + s.stop_grace - margin

        def left() -> float:
            return max(0.0, deadline - self.clock.monotonic())

        if self._ticker_task is not None:
            self._ticker_task.cancel()
        sup = self.supervisor
        if sup is not None:
            # leave at least half the remaining time for the final checkpoint
            await sup.stop(timeout=min(s.ide_stop_timeout, left() / 2))
            with contextlib.suppress(TimeoutError):
                await with_timeout(self.clock, max(1.0, left() / 4), sup.wait_stopped())

        note = ""
        if self._started:
            note = await self._final_checkpoint(left())
        self.output.close()
        final = Status.ERRORED if failure else Status.STOPPED
        self.lifecycle.move(final, reason + note)
        return await self._finish()

    async def _final_checkpoint(self, budget: float) -> str:
        session = self.session
        assert session is not None
        task = asyncio.ensure_future(self._checkpoint("final", CheckpointState.FINALIZED))
        try:
            result = await with_timeout(self.clock, budget, asyncio.shield(task))
        except TimeoutError:
            cancel: Callable[[], None] | None = getattr(session, "cancel", None)
            if cancel is not None:
                cancel()
            task.cancel()
            self.abandoned_work = True
            self.metrics.checkpoint_failures.labels("final").inc()
            kept = self._ckpt.info
            kept_desc = f"{kept.name} ({CheckpointState(kept.state).value})" if kept else "none"
            msg = (
                f"the final checkpoint did not finish within {budget:.1f}s; "
                f"the last checkpoint stays valid: {kept_desc}"
            )
            log.error("checkpoint.final_incomplete", budget=round(budget, 3), kept=kept_desc)
            self._notify(
                "final_checkpoint_incomplete",
                msg,
                checkpoint=kept.to_json() if kept else None,
            )
            return f"; {msg}"
        if result is None:
            err = self._ckpt.last_error or "unknown error"
            msg = f"the final checkpoint failed ({err}); the last checkpoint stays valid"
            self._notify("final_checkpoint_incomplete", msg)
            return f"; {msg}"
        return ""

    async def _finish(self) -> int:
        """Tell the control plane the outcome (within the grace), and pick the exit code."""
        if self.control_plane is not None:
            budget = 5.0
            if self._stop_at is not None:
                end = self._stop_at + self.settings.stop_grace - 0.5
                budget = max(0.2, end - self.clock.monotonic())
            await self.control_plane.flush(budget)
        status = self.lifecycle.status
        log.info("daemon.exit", status=status.value, reason=self.lifecycle.reason)
        return EXIT_OK if status is Status.STOPPED else EXIT_ERRORED

    async def _cleanup(self) -> None:
        self.output.close()
        self._remove_signals()
        if self.supervisor is not None and self.supervisor.pid is not None:
            await self.supervisor.stop(timeout=1.0)  # only after a bug: never leave the IDE
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        if self.api is not None:
            await self.api.stop()
        if self._reaper is not None:
            await self._reaper.stop()
        if self._store is not None and not self.abandoned_work:
            with contextlib.suppress(Exception):
                await self._store.close()

    # -- helpers ------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[T], name: str) -> asyncio.Task[T]:
        async def wrapped() -> T:
            return await coro

        task = asyncio.create_task(wrapped(), name=name)
        self._tasks.append(task)
        return task

    def _managed_pids(self) -> list[int] | None:
        sup = self.supervisor
        if sup is None:
            return []
        if sup.spawning:
            return None  # a new IDE's pid is not known yet: it must not be taken for an orphan
        return [sup.pid] if sup.pid is not None else []

    def _api_token(self) -> str:
        token = self.settings.token()
        if token:
            return token
        # no token configured: make one, readable only by root, for local tools
        token = secrets.token_urlsafe(32)
        path = self.settings.state_path / "api-token"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            log.info("api.token_generated", path=str(path))
        except OSError as e:
            log.warning("api.token_not_saved", path=str(path), error=str(e))
        return token

    def _install_signals(self) -> None:
        if not self._handle_signals:
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"received {sig.name}")

    def _remove_signals(self) -> None:
        if not self._handle_signals:
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


async def _serve(daemon: Daemon) -> int:
    try:
        return await daemon.run()
    except ConfigError as e:
        log.error("daemon.config_error", error=str(e))
        return EXIT_CONFIG


async def run_daemon(settings: Settings, ide_argv: list[str]) -> int:
    """Run one session to its end; the exit code (0 stopped, 1 errored, 2 bad configuration)."""
    return await _serve(Daemon(settings, ide_argv))


def run(settings: Settings, ide_argv: list[str]) -> int:
    """``studio-agent run``: JSON logs on stdout, the daemon on an event loop, its exit code."""
    setup_logging(settings.log_level)
    daemon = Daemon(settings, ide_argv)
    loop = asyncio.new_event_loop()
    code = EXIT_ERRORED
    try:
        code = loop.run_until_complete(_serve(daemon))
    finally:
        if daemon.abandoned_work:
            # the abandoned checkpoint or restore thread would hold the interpreter's
            # exit past the grace period: leave without waiting for it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    return code
