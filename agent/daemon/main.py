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

This module only wires the parts together: the checkpoint policy and the stop
budget are ``checkpointer``'s, the documents ``models``', the token
``api_token``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from agent import __version__
from agent.checkpoint.watch import ChangeWatch
from agent.daemon import models
from agent.daemon.api import ApiServer, Busy
from agent.daemon.api_token import api_token
from agent.daemon.checkpointer import Checkpointer, OwnCheckpoint, StopBudget
from agent.daemon.client import api_url
from agent.daemon.clock import Clock, SystemClock, with_timeout
from agent.daemon.compactor import Compactor
from agent.daemon.control_plane import ControlPlane
from agent.daemon.environ import forget_tokens
from agent.daemon.lifecycle import Lifecycle, Status, Transition
from agent.daemon.metrics import Metrics
from agent.daemon.reaper import Reaper
from agent.daemon.resources import read_resources
from agent.daemon.supervisor import IdeFailed, IdeState, RingBuffer, Supervisor
from agent.errors import AgentError, ConfigError
from agent.log import get_logger, setup_logging
from agent.session import CheckpointInfo, Progress, Session, StartOutcome
from agent.session.lease import SESSION_RENEW
from agent.session.owner import Owner, StateDirBusy
from agent.settings import Settings
from agent.store import Store, open_store

log = get_logger("daemon")

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERRORED = 1
EXIT_CONFIG = 2

REPORT_BUDGET = 2.0  # for the last events when the session ends without a stop request

# how long a checkpoint asked for while the session starts waits for it to run
START_WAIT = 60.0

SessionFactory = Callable[[Settings, Store], Session]


class StillStarting(AgentError):
    """The session did not reach running in time for the request (503: try again)."""


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
        self.checkpointer: Checkpointer | None = None
        self.compactor: Compactor | None = None
        self.outcome: StartOutcome | None = None
        self.token = ""
        # set once the final checkpoint or restore was abandoned mid-flight: its
        # worker thread may still run, and must not hold up the exit
        self.abandoned_work = False

        self._started = False  # Session.start succeeded
        self._session_started_at: datetime | None = None
        self._progress: Progress | None = None  # written from worker threads
        self._stop_requested = asyncio.Event()
        self._left_starting = asyncio.Event()
        self._stop_reason = ""
        self._budget: StopBudget | None = None
        self._ide_failure: IdeFailed | None = None
        self._ticker_task: asyncio.Task[None] | None = None
        self._settled_task: asyncio.Task[None] | None = None
        self._watch: ChangeWatch | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._reaper: Reaper | None = None
        self._owner: Owner | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    # -- the API backend ----------------------------------------------------------------

    @property
    def status_value(self) -> str:
        return self.lifecycle.status.value

    @property
    def own_checkpoint(self) -> OwnCheckpoint:
        return self.checkpointer.own if self.checkpointer else OwnCheckpoint()

    def request_stop(self, reason: str) -> None:
        if not self._stop_requested.is_set():
            log.info("daemon.stop_requested", reason=reason)
            self._stop_reason = reason
            self._budget = StopBudget(self.clock, self.settings.stop_grace, self.clock.monotonic())
            self._stop_requested.set()
            self.lifecycle.move(Status.STOPPING, reason)  # at once: the user sees it stopping

    async def heartbeat(self) -> models.Heartbeat:
        sup = self.supervisor
        resources = await asyncio.to_thread(
            read_resources, self.settings.root, sup.pid if sup else None
        )
        return models.Heartbeat(
            studio=self.settings.studio,
            status=self.lifecycle.status,
            reason=self.lifecycle.reason,
            since=self.lifecycle.since,
            ide=self._ide_doc(),
            session=self._session_doc(),
            restore=self._restore_doc(),
            resources=resources,
        )

    async def status(self) -> models.Status:
        cp = self.control_plane
        return models.Status(
            **dict(await self.heartbeat()),
            control_plane=models.ControlPlane(
                url=self.settings.control_plane_url,
                reachable=cp.reachable,
                last_error=cp.last_error,
                heartbeat_interval=cp.interval,
            )
            if cp
            else None,
        )

    async def checkpoint_now(self, name: str | None) -> models.CheckpointResult:
        if self.lifecycle.status is Status.STARTING:
            # asked for as soon as the API answers (a quickstart script): wait for the session
            with contextlib.suppress(TimeoutError):
                await with_timeout(self.clock, START_WAIT, self._left_starting.wait())
            if self.lifecycle.status is Status.STARTING:
                raise StillStarting(
                    f"the session is still starting after {START_WAIT:g}s "
                    f"({self.lifecycle.reason}); try again once its status is running"
                )
        ckpt = self.checkpointer
        if self.lifecycle.status is not Status.RUNNING or ckpt is None:
            raise Busy(f"cannot checkpoint while the session is {self.lifecycle.status.value}")
        return models.CheckpointResult.of(await ckpt.manual(name))

    async def list_checkpoints(self) -> list[models.CheckpointInfo]:
        session = self.session
        if session is None:
            raise Busy("the session has not started yet")
        infos = await session.list_checkpoints(sizes=True)
        return [models.CheckpointInfo.of(i) for i in infos]

    async def rename_checkpoint(self, old: str, new: str) -> models.CheckpointInfo:
        session, ckpt = self.session, self.checkpointer
        if session is None or ckpt is None or not self._started:
            raise Busy(f"cannot rename while the session is {self.lifecycle.status.value}")
        info = await session.rename(old, new)
        ckpt.renamed(old, info)
        log.info("checkpoint.renamed", old=old, new=info.name)
        return models.CheckpointInfo.of(info)

    async def delete_checkpoint(self, name: str) -> None:
        session, ckpt = self.session, self.checkpointer
        if session is None or ckpt is None or not self._started:
            raise Busy(f"cannot delete while the session is {self.lifecycle.status.value}")
        info = await session.delete(name)
        own = ckpt.own.info
        if (
            info is not None
            and own is not None
            and (own.studio, own.name)
            == (
                info.studio,
                info.name,
            )
        ):
            ckpt.own.info = None  # gone from the store until the next checkpoint writes it
        log.info("checkpoint.deleted", checkpoint=name)

    async def _keep_lease(self) -> None:
        """Renew the session lease while the session runs, so gc keeps the chain
        the next checkpoint extends even when nothing changes to checkpoint."""
        assert self.session is not None
        while True:
            await self.clock.sleep(SESSION_RENEW)
            try:
                await self.session.renew_lease()
            except AgentError as e:  # the next checkpoint checks its chain
                log.warning("lease.renew_failed", error=str(e))

    # -- documents ------------------------------------------------------------------------

    def _ide_doc(self) -> models.Ide:
        sup = self.supervisor
        failed = self._ide_failure
        return models.Ide(
            state=sup.state if sup else IdeState.PENDING,
            pid=sup.pid if sup else None,
            restarts=sup.restarts if sup else 0,
            last_exit=sup.last_exit if sup else None,
            command=self.argv,
            probe_url=probe_url(self.settings),
            last_output=failed.last_output if failed else [],
        )

    def _session_doc(self) -> models.Session:
        session, outcome = self.session, self.outcome
        return models.Session(
            id=session.session_id if session is not None and self._started else None,
            started=self._session_started_at,
            restored=models.CheckpointInfo.of(outcome.restored)
            if outcome and outcome.restored
            else None,
            invalidated=[models.CheckpointInfo.of(i) for i in outcome.invalidated]
            if outcome
            else [],
            checkpoint=models.SessionCheckpoint.of(self.own_checkpoint),
        )

    def _restore_doc(self) -> models.Progress | None:
        p = self._progress
        if p is None or self._started:
            return None
        return models.Progress.of(p)

    def _on_progress(self, p: Progress) -> None:
        self._progress = p  # one reference store: safe from any thread

    def _status_event(self, t: Transition) -> models.StatusEvent:
        return models.StatusEvent(
            studio=self.settings.studio,
            status=t.status,
            previous=t.previous,
            reason=t.reason,
            time=t.at,
            session=self._session_doc(),
            ide=self._ide_doc(),
        )

    def _on_transition(self, t: Transition) -> None:
        if t.status is not Status.STARTING:
            self._left_starting.set()
        self.metrics.status.state(t.status.value)
        self._send(self._status_event(t))

    def _send(self, event: models.Event) -> None:
        if self.control_plane is not None:
            self.control_plane.event(event.type, event.model_dump(mode="json"))

    def _notice(self, kind: models.NoticeKind, reason: str) -> dict[str, Any]:
        """The fields every notice carries besides a status change."""
        return {
            "type": kind,
            "studio": self.settings.studio,
            "status": self.lifecycle.status,
            "reason": reason,
            "time": self.clock.now(),
            "session": self._session_doc(),
        }

    # the checkpointer's reports (checkpointer.Reports)

    def checkpoint_failed(self, reason: str) -> None:
        if self.control_plane is not None:
            self._send(models.Notice(**self._notice("checkpoint_failed", reason)))

    def final_checkpoint_failed(self, reason: str) -> None:
        if self.control_plane is not None:
            self._send(models.Notice(**self._notice("final_checkpoint_incomplete", reason)))

    def final_checkpoint_abandoned(self, reason: str, kept: CheckpointInfo | None) -> None:
        if self.control_plane is not None:
            self._send(
                models.FinalIncompleteNotice(
                    **self._notice("final_checkpoint_incomplete", reason),
                    checkpoint=models.CheckpointInfo.of(kept) if kept else None,
                )
            )

    # -- run ------------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            return await self._run()
        except (ConfigError, StateDirBusy):
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
        # One agent process per root's state dir, for the life of this one.
        self._owner = Owner(s.state_path, "run")
        self._owner.acquire()
        store = self._store or open_store(s)
        self._store = store
        self.session = self._session_factory(s, store)
        self.compactor = Compactor(self.session, s.squash_layers)
        self.checkpointer = Checkpointer(
            self.session,
            clock=self.clock,
            metrics=self.metrics,
            interval=s.checkpoint_interval,
            reports=self,
            after_periodic=self.compactor.after_checkpoint,
            min_interval=s.checkpoint_min_interval,
            full_every=s.full_scan_every,
        )
        self.token = api_token(s)
        self.api = ApiServer(self, self.token, s.api_host, s.api_port)
        if s.control_plane_url:
            self.control_plane = ControlPlane(
                s.control_plane_url,
                s.control_plane_token,
                s.studio,
                clock=self.clock,
                interval=s.heartbeat_interval,
                snapshot=self._heartbeat_body,
                metrics=self.metrics,
            )
            self._spawn(self.control_plane.run(), "control plane")
            self._send(self._status_event(self.lifecycle.history[0]))
        try:
            await self.api.start()
        except ConfigError as e:
            self.lifecycle.move(Status.ERRORED, str(e))
            return await self._finish()
        self._owner.announce_api(api_url(s.api_host, self.api.port))
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
        self._lease_task = self._spawn(self._keep_lease(), "session lease")
        if s.change_watch and self._watch is None:  # (resumed: its first period walks)
            self._watch_changes()

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
            ticker = self.checkpointer.run_periodic()
            self._ticker_task = self._spawn(ticker, "checkpoint ticker")
            if self._watch is not None and s.checkpoint_min_interval > 0:
                settled = self.checkpointer.run_settled()
                self._settled_task = self._spawn(settled, "settled checkpoints")
            failure = await self._wait_running(sup_task)
        return await self._shutdown(failure)

    async def _start_session(self) -> bool:
        session = self.session
        assert session is not None
        t0 = self.clock.monotonic()
        start = asyncio.ensure_future(self._clear_then_start(session))
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
            resumed=self.outcome.resumed or None,
            invalidated=[i.name for i in self.outcome.invalidated],
            seconds=round(elapsed, 3),
        )
        if self.outcome.invalidated and self.control_plane is not None:
            names = ", ".join(i.name for i in self.outcome.invalidated)
            reason = f"unsound interim checkpoints marked invalid: {names}"
            self._send(
                models.InvalidatedNotice(
                    **self._notice("checkpoints_invalidated", reason),
                    invalidated=[models.CheckpointInfo.of(i) for i in self.outcome.invalidated],
                )
            )
        assert self.checkpointer is not None
        await self.checkpointer.start()
        return True

    async def _clear_then_start(self, session: Session) -> StartOutcome:
        """Clear what an earlier, killed agent left, then restore or resume."""
        await session.clear_leftovers()
        return await session.start(
            self.settings.restore_from,
            progress=self._on_progress,
            resume=True,
            before_walk=self._watch_before_walk if self.settings.change_watch else None,
        )

    async def _watch_before_walk(self) -> None:
        """Watch the restored root before it is walked for the session's parent state:
        what changes from then on is the watch's, what changed before is the walk's,
        so the first checkpoint need not walk the root again."""
        watch = self._watch_changes()
        await asyncio.to_thread(watch.ready.wait)
        watch.restart()

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
        if self._budget is None:
            self._budget = StopBudget(self.clock, self.settings.stop_grace, self.clock.monotonic())
        budget = self._budget
        reason = failure or self._stop_reason
        self.lifecycle.move(Status.STOPPING, reason)

        if self._ticker_task is not None:
            self._ticker_task.cancel()
        if self._settled_task is not None:
            self._settled_task.cancel()
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self.compactor is not None:
            self.compactor.cancel()  # a squash in progress lets go while the IDE stops
        sup = self.supervisor
        if sup is not None:
            await sup.stop(timeout=budget.ide_stop(self.settings.ide_stop_timeout))
            with contextlib.suppress(TimeoutError):
                await with_timeout(self.clock, budget.ide_wait(), sup.wait_stopped())
        if self._reaper is not None:
            # what the IDE left outside its process group (a setsid'd server of its own)
            await self._reaper.end_adopted(timeout=min(2.0, budget.left() / 4))

        note = ""
        if self.compactor is not None:
            await self.compactor.stop()  # the final checkpoint goes first
        if self._started and self.checkpointer is not None:
            note = await self.checkpointer.final(budget.left())
            self.abandoned_work = self.abandoned_work or self.checkpointer.abandoned
        self.output.close()
        lost = self.checkpointer is not None and self.checkpointer.final_failed
        if self._started and self.session is not None and not lost:
            # only refs keep this session's blobs from now on
            try:
                await with_timeout(
                    self.clock, min(2.0, budget.left()), self.session.release_lease()
                )
            except (AgentError, TimeoutError) as e:  # it expires by itself
                log.warning("lease.release_failed", error=str(e))
        final = Status.ERRORED if failure or lost else Status.STOPPED
        self.lifecycle.move(final, reason + note)
        return await self._finish()

    async def _finish(self) -> int:
        """Tell the control plane the outcome (within the grace), and pick the exit code."""
        if self.control_plane is not None:
            budget = self._budget.report() if self._budget else REPORT_BUDGET
            await self.control_plane.flush(budget)
        status = self.lifecycle.status
        log.info("daemon.exit", status=status.value, reason=self.lifecycle.reason)
        return EXIT_OK if status is Status.STOPPED else EXIT_ERRORED

    def _watch_changes(self) -> ChangeWatch:
        """Follow the root's changes from now on (the restore is done), so that the
        periodic checkpoints read only those (the first period is sound only when
        the root is walked once everything is watched: ``_watch_before_walk``)."""
        assert self.session is not None and self.checkpointer is not None
        watch = ChangeWatch(self.session.root, self.session.excluder(), now=self.clock.monotonic)
        watch.on_change = self.checkpointer.follow(watch)
        watch.start()
        self._watch = watch
        return watch

    async def _cleanup(self) -> None:
        if self._watch is not None:
            await asyncio.to_thread(self._watch.close)
        self.output.close()
        self._remove_signals()
        if self.supervisor is not None and self.supervisor.pid is not None:
            await self.supervisor.stop(timeout=1.0)  # only after a bug: never leave the IDE
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await with_timeout(self.clock, 5.0, asyncio.wait(self._tasks))
        if self.api is not None:
            await self.api.stop()
        if self._reaper is not None:
            await self._reaper.stop()
        if self._store is not None and not self.abandoned_work:
            with contextlib.suppress(Exception):
                await self._store.close()
        if self._owner is not None and not self.abandoned_work:
            # (abandoned work still runs in a thread: the lock goes with the process)
            self._owner.release()

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

    async def _heartbeat_body(self) -> dict[str, Any]:
        return (await self.heartbeat()).model_dump(mode="json")

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
        print(f"studio-agent: error: {e}", file=sys.stderr)  # the log may go unread
        return EXIT_CONFIG
    except StateDirBusy as e:  # another agent runs on this root: it is not ours to report
        log.error("daemon.state_dir_busy", error=str(e))
        print(f"studio-agent: error: {e}", file=sys.stderr)
        return EXIT_ERRORED


async def run_daemon(settings: Settings, ide_argv: list[str]) -> int:
    """Run one session to its end; the exit code (0 stopped, 1 errored, 2 bad configuration)."""
    return await _serve(Daemon(settings, ide_argv))


def run(settings: Settings, ide_argv: list[str]) -> int:
    """``studio-agent run``: JSON logs on stdout, the daemon on an event loop, its exit code."""
    setup_logging(settings.log_level)
    forget_tokens()  # read into settings already; no child, nor /proc, shows them now
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
