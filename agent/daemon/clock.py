"""Time as a dependency, so intervals, backoffs and timeouts are testable without waiting.

Every timing decision in the daemon goes through a ``Clock``: the real one in
production, ``ManualClock`` in tests, which only moves when the test advances
it (the model is coder's quartz).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals and deadlines)."""

    def now(self) -> datetime:
        """Wall-clock time, timezone-aware (for reports only)."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that stands still until ``advance`` is called.

    Sleepers wake in deadline order when time passes their deadline, so a test
    can step through minutes of daemon time in microseconds.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._mono = 1000.0
        self._wall0 = start or datetime(2024, 10, 1, tzinfo=UTC)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return self._wall0 + timedelta(seconds=self._mono - 1000.0)

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if seconds <= 0:
            fut.set_result(None)
        else:
            heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), fut))
            self._changed.set()
        await fut

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        live = [d for d, _, f in self._sleepers if not f.done()]
        return min(live) - self._mono if live else None

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline has passed, in order."""
        target = self._mono + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._mono = max(self._mono, deadline)
            if not fut.done():
                fut.set_result(None)
                # let the woken task run (and perhaps sleep again) before time moves on
                for _ in range(5):
                    await asyncio.sleep(0)
        self._mono = target
        await asyncio.sleep(0)

    async def wait_for_sleepers(self, n: int = 1, timeout: float = 10.0) -> None:
        """Wait (in real time, bounded) until at least ``n`` sleeps are pending."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.sleepers < n:
            if loop.time() > end:
                raise TimeoutError(f"expected {n} pending sleeps, have {self.sleepers}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.05)


async def with_timeout(clock: Clock, seconds: float, aw: Awaitable[T]) -> T:
    """Await ``aw`` for at most ``seconds`` of ``clock`` time, else cancel it: TimeoutError."""
    task = asyncio.ensure_future(aw)
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        done, _ = await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        timer.cancel()
        raise
    if task in done:
        timer.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise TimeoutError(f"timed out after {seconds:g}s")
