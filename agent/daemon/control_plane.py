"""The control plane client: heartbeats on the server's interval, status events at once.

It never blocks or fails the session: when the control plane is unreachable
it retries with backoff and, once it is back, sends only the latest state.
Pending events are kept one per kind (the newest status, the newest notice of
each other kind), so an outage of any length holds a handful of documents,
not a queue.  Heartbeat bodies are built fresh at each send, so they are
always current too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from agent.backoff import Backoff
from agent.daemon.clock import Clock, with_timeout
from agent.daemon.metrics import Metrics
from agent.log import get_logger

log = get_logger("daemon.control_plane")

Snapshot = Callable[[], Awaitable[dict[str, Any]]]

MIN_INTERVAL = 0.1
MAX_INTERVAL = 3600.0


class ControlPlane:
    def __init__(
        self,
        url: str,
        token: str,
        studio: str,
        *,
        clock: Clock,
        interval: float,
        snapshot: Snapshot,
        metrics: Metrics,
        backoff: Backoff | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        base = url.rstrip("/") + f"/studios/{studio}"
        self.heartbeat_url = base + "/heartbeat"
        self.events_url = base + "/events"
        self._token = token
        self._clock = clock
        self.interval = interval
        self._snapshot = snapshot
        self._metrics = metrics
        self._backoff = backoff or Backoff(1.0, 60.0)
        self._request_timeout = request_timeout
        self._pending: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self.reachable: bool | None = None
        self.last_error = ""
        self.heartbeats_sent = 0
        self.events_sent = 0

    def event(self, kind: str, body: dict[str, Any]) -> None:
        """Queue ``body`` for the events endpoint, replacing any unsent one of the same kind."""
        doc = {"type": kind, **body}
        self._pending.pop(kind, None)
        self._pending[kind] = doc
        self._drained.clear()
        self._wake.set()

    async def flush(self, timeout: float) -> bool:
        """Wait (at most ``timeout``) until every pending event is sent; False if not."""
        try:
            await with_timeout(self._clock, timeout, self._drained.wait())
        except TimeoutError:
            log.warning("control_plane.unflushed", pending=list(self._pending))
            return False
        return True

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        async with aiohttp.ClientSession(headers=headers) as http:
            next_heartbeat = self._clock.monotonic()
            while True:
                if self._pending:
                    kind, doc = next(iter(self._pending.items()))
                    ok, _ = await self._post(http, self.events_url, doc, "event")
                    if ok or ok is None:  # None: refused for good; retrying cannot help
                        if self._pending.get(kind) is doc:
                            del self._pending[kind]
                        if ok:
                            self.events_sent += 1
                        if not self._pending:
                            self._drained.set()
                        continue
                    self._metrics.event_failures.inc()
                    await self._pause(self._backoff.next())
                    continue
                now = self._clock.monotonic()
                if now >= next_heartbeat:
                    try:
                        body = await self._snapshot()
                    except Exception:  # a bug in a report must not end reporting
                        log.exception("control_plane.snapshot_failed")
                        next_heartbeat = now + self.interval
                        continue
                    ok, reply = await self._post(http, self.heartbeat_url, body, "heartbeat")
                    if ok:
                        self.heartbeats_sent += 1
                        self._take_interval(reply)
                        next_heartbeat = self._clock.monotonic() + self.interval
                    else:
                        self._metrics.heartbeat_failures.inc()
                        next_heartbeat = self._clock.monotonic() + min(
                            self._backoff.next(), self.interval
                        )
                    continue
                await self._pause(next_heartbeat - now)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when an event is queued."""
        self._wake.clear()
        if self._pending and self.reachable is not False:
            return
        with contextlib.suppress(TimeoutError):
            await with_timeout(self._clock, seconds, self._wake.wait())

    def _take_interval(self, reply: Any) -> None:
        if not isinstance(reply, dict):
            return
        value = reply.get("heartbeat_interval")
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            new = min(MAX_INTERVAL, max(MIN_INTERVAL, float(value)))
            if new != self.interval:
                log.info("control_plane.interval", old=self.interval, new=new)
                self.interval = new

    async def _post(
        self, http: aiohttp.ClientSession, url: str, body: dict[str, Any], what: str
    ) -> tuple[bool | None, Any]:
        """(True, reply) on success, (False, None) to retry, (None, None) when refused for good."""
        try:
            status, reply, text = await with_timeout(
                self._clock, self._request_timeout, _request(http, url, body)
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
            retry = True
        else:
            if 200 <= status < 300:
                self._up()
                return True, reply
            error = f"HTTP {status}: {text}"
            retry = status >= 500 or status in (408, 429)
        self._down(what, url, error)
        if not retry and what == "event":
            log.error("control_plane.event_refused", url=url, error=error, kind=body.get("type"))
            return None, None
        return False, None

    def _up(self) -> None:
        if self.reachable is not True:
            log.info("control_plane.reachable")
        self.reachable = True
        self.last_error = ""
        self._backoff.reset()

    def _down(self, what: str, url: str, error: str) -> None:
        if self.reachable is not False or error != self.last_error:
            log.warning("control_plane.unreachable", what=what, url=url, error=error)
        self.reachable = False
        self.last_error = error


async def _request(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, Any, str]:
    """(status, JSON reply or None, start of the text of a refusal)."""
    async with http.post(url, json=body) as resp:
        if 200 <= resp.status < 300:
            reply: Any = None
            if resp.content_type == "application/json":
                with contextlib.suppress(ValueError, aiohttp.ClientError):
                    reply = await resp.json()
            return resp.status, reply, ""
        return resp.status, None, (await resp.text())[:200]
