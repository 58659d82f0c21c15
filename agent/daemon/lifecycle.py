"""The session's status: a state machine that only moves forward.

starting -> running -> stopping -> stopped, and errored (a failed session,
which the platform counts as stopped).  A status never goes back, so a late
report from a slow task (say, "IDE ready" arriving after a stop began) cannot
resurrect a session the user already saw stopping; such a move is refused and
logged, not raised.  Listeners hear every transition at once, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from agent.daemon.clock import Clock
from agent.log import get_logger

log = get_logger("daemon.lifecycle")


class Status(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERRORED = "errored"


_RANK = {
    Status.STARTING: 0,
    Status.RUNNING: 1,
    Status.STOPPING: 2,
    Status.STOPPED: 3,
    Status.ERRORED: 3,
}

TERMINAL = frozenset({Status.STOPPED, Status.ERRORED})


@dataclass(frozen=True, slots=True)
class Transition:
    previous: Status | None
    status: Status
    reason: str
    at: datetime


Listener = Callable[[Transition], None]


class Lifecycle:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._status = Status.STARTING
        self._reason = "agent started"
        self._since = clock.now()
        self._history: list[Transition] = [
            Transition(None, Status.STARTING, self._reason, self._since)
        ]
        self._listeners: list[Listener] = []

    @property
    def status(self) -> Status:
        return self._status

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def since(self) -> datetime:
        return self._since

    @property
    def history(self) -> list[Transition]:
        return list(self._history)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def can_move(self, status: Status) -> bool:
        return self._status not in TERMINAL and _RANK[status] > _RANK[self._status]

    def move(self, status: Status, reason: str) -> bool:
        """Move forward to ``status``; False (and nothing happens) if that is not forward."""
        if not self.can_move(status):
            log.debug(
                "lifecycle.refused", current=self._status.value, wanted=status.value, reason=reason
            )
            return False
        t = Transition(self._status, status, reason, self._clock.now())
        self._status, self._reason, self._since = status, reason, t.at
        self._history.append(t)
        report = log.error if status is Status.ERRORED else log.info
        report("lifecycle.status", status=status.value, previous=t.previous, reason=reason)
        for listener in self._listeners:
            try:
                listener(t)
            except Exception:
                log.exception("lifecycle.listener_failed", status=status.value)
        return True
