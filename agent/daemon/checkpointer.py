"""The checkpoint policy: which state a checkpoint gets, when one is written, and the stop budget.

The session's own checkpoint is ``empty`` from the start until something is
written, ``interim`` while the session runs (written every interval when
something changed, and when asked for through the API), and ``finalized`` by
the final checkpoint at stop.  An interim checkpoint may be unsound (the
session can die half-way), so the next start checks it and marks it invalid
if need be; a finalized one was written by a clean stop.  A checkpoint under
any other name has no later write to finalize it, so it is finalized at once.

A failed periodic checkpoint is retried at the next tick, never sooner, so a
store outage cannot turn into a busy loop against it, and never stops the IDE.

With a change watch, a periodic checkpoint reads only what the watch saw
change (nothing at all when it saw nothing), and one comes as soon as changes
have settled for ``SETTLE`` seconds, ``min_interval`` after the last at the
soonest, and ``min_interval`` after the first unsaved change at the latest
while changes go on: a kill loses at most that much work.  The final
checkpoint, every ``full_every``-th periodic one, and any after the watch
could not be trusted walk the whole root.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from agent.checkpoint.manifest import CheckpointState
from agent.checkpoint.watched import Dirty
from agent.daemon.clock import Clock, with_timeout
from agent.errors import AgentError
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.checkpoint.watch import ChangeWatch
    from agent.daemon.metrics import Metrics
    from agent.session import CheckpointInfo, CheckpointResult, Session

log = get_logger("daemon")  # as before the policy had a module of its own


class Kind(StrEnum):
    """Why a checkpoint is written (also the ``kind`` label of the checkpoint metrics)."""

    PERIODIC = "periodic"  # the daemon's interval
    MANUAL = "manual"  # asked for through the API
    FINAL = "final"  # the session stops
    COMMAND = "command"  # ``studio-agent checkpoint``, by hand


START_STATE = CheckpointState.EMPTY  # the session's own checkpoint before anything is written
SETTLE = 5.0  # seconds without a change before the changes are checkpointed


def state_for(kind: Kind, *, own: bool = True) -> CheckpointState:
    """The state a checkpoint of ``kind`` is written with (``own``: the session's own name)."""
    if kind is Kind.PERIODIC or (kind is Kind.MANUAL and own):
        return CheckpointState.INTERIM  # the final checkpoint will follow
    return CheckpointState.FINALIZED


@dataclass(slots=True)
class OwnCheckpoint:
    """What the status says about the session's own checkpoint."""

    info: CheckpointInfo | None = None
    duration: float | None = None
    changed: int | None = None
    scan: str | None = None  # "watch": only what the change watch named was read; "full"
    last_attempt: datetime | None = None
    last_error: str | None = None


class Reports(Protocol):
    """Where the control plane hears what became of a checkpoint."""

    def checkpoint_failed(self, reason: str) -> None: ...

    def final_checkpoint_failed(self, reason: str) -> None: ...

    def final_checkpoint_abandoned(self, reason: str, kept: CheckpointInfo | None) -> None: ...


class _Take:
    """What a checkpoint reads: the watch's changes, or (``full``) the whole root,
    the watch's period starting anew all the same."""

    def __init__(self, watch: ChangeWatch, full: bool) -> None:
        self._watch = watch
        self._full = full
        self.watched = False

    def take(self) -> Dirty | None:
        dirty = self._watch.take()
        self.watched = dirty is not None and not self._full
        return dirty if self.watched else None

    def spoil(self) -> None:
        self._watch.spoil()


class StopBudget:
    """The time from the stop request to exit, shared out between the steps of stopping.

    The platform sends SIGKILL ``grace`` seconds after SIGTERM.  The IDE gets at
    most half of what is left, the final checkpoint the rest but a margin for
    the last events and the exit itself.  The last events get a small share
    once the final checkpoint is safe: a control plane that accepts connections
    and never answers must not hold the exit for the rest of the grace.
    """

    REPORT_SHARE = 1.5  # seconds at most for the last events

    def __init__(self, clock: Clock, grace: float, since: float) -> None:
        self._clock = clock
        self.grace = grace
        self.since = since
        self.deadline = since + grace - min(2.0, grace * 0.1)

    def left(self) -> float:
        """What is left for the IDE and the final checkpoint."""
        return max(0.0, self.deadline - self._clock.monotonic())

    def ide_stop(self, stop_timeout: float) -> float:
        """How long the IDE may take to exit after SIGTERM before SIGKILL."""
        return min(stop_timeout, self.left() / 2)

    def ide_wait(self) -> float:
        """How long to wait for the IDE's supervisor to settle after the kill."""
        return max(1.0, self.left() / 4)

    def report(self) -> float:
        """How long the last events may take to reach the control plane."""
        left = self.since + self.grace - 0.5 - self._clock.monotonic()
        return max(0.2, min(self.REPORT_SHARE, left))


class Checkpointer:
    """Writes the session's checkpoints by the policy above, and keeps the record of its own."""

    def __init__(
        self,
        session: Session,
        *,
        clock: Clock,
        metrics: Metrics,
        interval: float,
        reports: Reports,
        after_periodic: Callable[[CheckpointResult | None], None] | None = None,
        min_interval: float = 0.0,
        full_every: int = 1,
    ) -> None:
        self._session = session
        self._min_interval = min_interval
        self._full_every = full_every
        self._watch: ChangeWatch | None = None
        self._since_full = 0  # periodic checkpoints since the last full walk
        self._told_broken = False
        self._last_start: float | None = None
        self._changed = asyncio.Event()  # a period's first change was seen
        self._periodic_lock = asyncio.Lock()
        self._after_periodic = after_periodic  # the background squash's cue
        self._clock = clock
        self._metrics = metrics
        self._interval = interval
        self._reports = reports
        self.own = OwnCheckpoint()
        # set once the final checkpoint was abandoned mid-flight: its worker thread
        # may still run, and must not hold up the exit
        self.abandoned = False
        # set once the final checkpoint failed: the work since the last one is in none
        self.final_failed = False
        self._periodic: asyncio.Task[CheckpointResult | None] | None = None

    async def start(self) -> None:
        """Mark the session's own checkpoint as started (empty), so the session is visible."""
        try:
            self.own.info = await self._session.mark(START_STATE)
        except AgentError as e:
            # the IDE matters more than this marker; the next checkpoint writes the ref
            log.error("checkpoint.mark_failed", error=str(e))
            self.own.last_error = str(e)
            self._reports.checkpoint_failed(f"cannot write the session's checkpoint: {e}")

    async def manual(self, name: str | None) -> CheckpointResult:
        own = name is None or name == self._session.auto_name
        result = await self._write(
            Kind.MANUAL, state_for(Kind.MANUAL, own=own), name=name, raise_errors=True
        )
        assert result is not None
        return result

    def follow(self, watch: ChangeWatch) -> Callable[[], None]:
        """Read what ``watch`` saw change from now on; what it calls (from its own
        thread, on the event loop's behalf) when a period's first change is seen."""
        self._watch = watch
        loop = asyncio.get_running_loop()

        def changed() -> None:
            loop.call_soon_threadsafe(self._changed.set)

        return changed

    async def run_periodic(self) -> None:
        """Interim checkpoints every interval; a failure waits for the next tick, never more."""
        while True:
            await self._clock.sleep(self._interval)
            await self._periodic_write()

    async def run_settled(self) -> None:
        """Interim checkpoints as soon as the watch's changes settle (see the module)."""
        watch = self._watch
        assert watch is not None
        while True:
            await self._changed.wait()
            self._changed.clear()
            while True:
                p = watch.pending()
                if p.broken or not p.names or p.first is None or p.last is None:
                    break  # nothing to write, or the interval's full walks take over
                due = min(p.last + SETTLE, p.first + self._min_interval)
                if self._last_start is not None:
                    due = max(due, self._last_start + self._min_interval)
                wait = due - self._clock.monotonic()
                if wait > 0:
                    await self._clock.sleep(wait)
                    continue
                await self._periodic_write()

    async def _periodic_write(self) -> None:
        async with self._periodic_lock:
            self._periodic = asyncio.create_task(
                self._write(Kind.PERIODIC, state_for(Kind.PERIODIC), skip_unchanged=True)
            )
            # shielded: stopping the ticker must not abandon a checkpoint half-way
            result = await asyncio.shield(self._periodic)
        if self._after_periodic is not None:
            self._after_periodic(result)

    async def final(self, budget: float) -> str:
        """The final checkpoint within ``budget`` seconds; a note for the status reason if not."""
        task = asyncio.ensure_future(self._write(Kind.FINAL, state_for(Kind.FINAL)))
        try:
            result = await with_timeout(self._clock, budget, asyncio.shield(task))
        except TimeoutError:
            cancel: Callable[[], None] | None = getattr(self._session, "cancel", None)
            if cancel is not None:
                cancel()
            task.cancel()
            self.abandoned = True
            self._metrics.checkpoint_failures.labels(Kind.FINAL.value).inc()
            kept = self.own.info
            kept_desc = f"{kept.name} ({CheckpointState(kept.state).value})" if kept else "none"
            msg = (
                f"the final checkpoint did not finish within {budget:.1f}s; "
                f"the last checkpoint stays valid: {kept_desc}"
            )
            log.error("checkpoint.final_incomplete", budget=round(budget, 3), kept=kept_desc)
            self._reports.final_checkpoint_abandoned(msg, kept)
            return f"; {msg}"
        if result is None:
            self.final_failed = True
            err = self.own.last_error or "unknown error"
            msg = f"the final checkpoint failed ({err}); the last checkpoint stays valid"
            self._reports.final_checkpoint_failed(msg)
            return f"; {msg}"
        return ""

    def renamed(self, old: str, info: CheckpointInfo) -> None:
        if self.own.info is not None and self.own.info.name == old:
            self.own.info = info

    async def _write(
        self,
        kind: Kind,
        state: CheckpointState,
        *,
        name: str | None = None,
        skip_unchanged: bool = False,
        raise_errors: bool = False,
    ) -> CheckpointResult | None:
        session, m = self._session, self._metrics
        own = name is None or name == session.auto_name
        if own:
            self.own.last_attempt = self._clock.now()
        self._last_start = self._clock.monotonic()
        source: _Take | None = None
        if self._watch is not None:
            broken = self._watch.pending().broken
            if broken and not self._told_broken:
                self._told_broken = True
                log.warning("watch.given_up", reason=broken, then="every checkpoint walks")
            full = kind is Kind.FINAL or (
                kind is Kind.PERIODIC and self._since_full + 1 >= self._full_every
            )
            source = _Take(self._watch, full)
        try:
            result = await session.checkpoint(
                name, state, skip_unchanged=skip_unchanged, changes_since=source
            )
        except AgentError as e:
            m.checkpoint_failures.labels(kind.value).inc()
            log.error("checkpoint.failed", kind=kind.value, error=str(e))
            if own:
                self.own.last_error = str(e)
            if kind is Kind.PERIODIC:
                self._reports.checkpoint_failed(f"periodic checkpoint failed: {e}")
            if raise_errors:
                raise
            return None
        if source is None or not source.watched:
            self._since_full = 0
        elif kind is Kind.PERIODIC:
            self._since_full += 1
        if result is None:
            m.checkpoint_unchanged.inc()
            log.debug("checkpoint.unchanged", kind=kind.value)
            if own:
                self.own.last_error = None
            return None
        m.checkpoint_duration.labels(kind.value).observe(result.duration)
        m.checkpoint_layer_bytes.labels(kind.value).observe(result.layer_size)
        if result.info.name == session.auto_name:
            m.checkpoint_size.set(result.info.size)
            self.own.info = result.info
            self.own.duration = result.duration
            self.own.changed = result.changed
            self.own.scan = "watch" if result.watched else "full"
            self.own.last_error = None
        log.info(
            "checkpoint.done",
            kind=kind.value,
            name=result.info.name,
            state=CheckpointState(result.info.state).value,
            changed=result.changed,
            layer_size=result.layer_size,
            size=result.info.size,
            seconds=round(result.duration, 3),
            skipped=len(result.skipped),
            scan="watch" if result.watched else "full",
        )
        return result
