"""Leases: how writers and the garbage collector stay out of each other's way.

A running session keeps a lease object, ``leases/sessions/<studio>/<holder>``,
naming what its next checkpoint needs that no ref may reach: the manifest its
chain extends (the chain's head; after a restore, the checkpoint restored,
whose ref may be deleted while the session runs) and the blobs it is about to
store or find present.  The lease carries an expiry; the session renews it
and removes it at a clean stop.  One collector at a time holds
``leases/gc``, taken by exclusive create.

Why a new blob is safe: gc lists the blobs before it reads any root, and a
writer names a blob in its lease before it stores it.  A blob listed was
stored before gc read the leases, so gc reads the lease naming it; a blob
stored later is not listed, so it is not a candidate.

Why a blob found present (a deduplicated layer, a restored chain) is safe: gc
reads the session leases again right before each batch of deletes, and
replaces its own lease (a new tag, phase ``delete``) right before that read.
A writer that named a blob in its lease then waits while a gc lease in phase
``delete`` keeps the tag it saw (``wait_out_gc``): once the tag changes, the
batch that may have worked from an older view of the leases is over, and every
later batch sees this writer's lease.  Only then does the writer trust that a
blob it finds is there to stay.  The wait is one batch at most, and none when
no gc runs.

A lease that lapsed (the session was suspended past its expiry) or was never
held (a one-shot command) protected nothing for a while: its holder checks
that its chain is still whole once the lease stands again (``hold`` says so).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.errors import AgentError, RefConflict
from agent.log import get_logger
from agent.store.base import Lease, Store

log = get_logger("lease")

GC_LEASE = "gc"
SESSIONS = "sessions"
# A session lease outlives a few missed renewals; a session renews it every
# SESSION_RENEW seconds (and rewrites it with every checkpoint).
SESSION_TTL = 3600.0
SESSION_RENEW = 300.0
# A gc renews its lease before every batch of deletes and while it lists.
GC_TTL = 300.0
# How often a writer looks at a gc lease it waits out.
FENCE_POLL = 0.2

Clock = Callable[[], float]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _time(v: Any) -> float:
    if not isinstance(v, str):
        raise ValueError(f"not a time: {v!r}")
    return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _digests(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(d, str) for d in v):
        raise ValueError("not a list of digests")
    return list(v)


@dataclass(frozen=True, slots=True)
class SessionLeaseDoc:
    """What a session lease says: the manifests gc must follow and the blobs it
    must keep, until ``expires``."""

    studio: str
    holder: str
    manifests: list[str]
    blobs: list[str]
    expires: float
    written: float
    session: str = ""
    host: str = ""

    def encode(self) -> bytes:
        return json.dumps(
            {
                "studio": self.studio,
                "holder": self.holder,
                "session": self.session,
                "host": self.host,
                "manifests": self.manifests,
                "blobs": self.blobs,
                "written": _iso(self.written),
                "expires": _iso(self.expires),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> SessionLeaseDoc:
        """Raises ValueError for anything that is not a session lease."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            return cls(
                studio=str(doc["studio"]),
                holder=str(doc["holder"]),
                session=str(doc.get("session", "")),
                host=str(doc.get("host", "")),
                manifests=_digests(doc["manifests"]),
                blobs=_digests(doc["blobs"]),
                written=_time(doc["written"]),
                expires=_time(doc["expires"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a session lease: {e}") from e


@dataclass(frozen=True, slots=True)
class GcLeaseDoc:
    holder: str
    host: str
    pid: int
    started: float
    expires: float
    phase: str  # "mark" (nothing deleted on this view) or "delete"
    batch: int = 0

    def encode(self) -> bytes:
        return json.dumps(
            {
                "holder": self.holder,
                "host": self.host,
                "pid": self.pid,
                "started": _iso(self.started),
                "expires": _iso(self.expires),
                "phase": self.phase,
                "batch": self.batch,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> GcLeaseDoc:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            return cls(
                holder=str(doc["holder"]),
                host=str(doc.get("host", "")),
                pid=int(doc.get("pid", 0)),
                started=_time(doc["started"]),
                expires=_time(doc["expires"]),
                phase=str(doc["phase"]),
                batch=int(doc.get("batch", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a gc lease: {e}") from e

    def describe(self) -> str:
        return (
            f"taken by {self.host or 'an unknown host'} (pid {self.pid}) at {_when(self.started)}, "
            f"expires at {_when(self.expires)}"
        )


# -- the writer's side ------------------------------------------------------------------


async def wait_out_gc(store: Store, clock: Clock = time.time, poll: float = FENCE_POLL) -> None:
    """Return once no gc can delete on a view of the leases older than now.

    A gc deleting (phase ``delete``) may be in a batch it chose before this
    caller's lease was written; it replaces its lease before its next batch,
    and re-reads the session leases after that.  So: wait for the tag to
    change, the lease to go, or its expiry (a gc stops deleting when its lease
    expires).
    """
    seen = await store.get_lease(GC_LEASE)
    if seen is None:
        return
    try:
        doc = GcLeaseDoc.decode(seen.body)
    except ValueError:
        return  # not a gc's: no gc takes a lease it cannot read
    if doc.phase != "delete" or doc.expires <= clock():
        return
    log.info("lease.waiting_for_gc", gc=doc.describe())
    while clock() < doc.expires:
        await asyncio.sleep(poll)
        now = await store.get_lease(GC_LEASE)
        if now is None or now.tag != seen.tag:
            return


@dataclass
class SessionLease:
    """The lease of one session process (or of one one-shot command)."""

    store: Store
    studio: str
    clock: Clock = time.time
    ttl: float = SESSION_TTL
    holder: str = field(default_factory=lambda: uuid.uuid4().hex)
    _tag: str | None = None
    _written: float = 0.0
    _doc: SessionLeaseDoc | None = None
    # One write at a time: a renewal must never put back what a checkpoint's
    # newer write just named.
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return f"{SESSIONS}/{self.studio}/{self.holder}"

    @property
    def held(self) -> bool:
        return self._tag is not None

    @property
    def manifests(self) -> list[str]:
        return list(self._doc.manifests) if self._doc else []

    async def hold(
        self,
        manifests: Sequence[str],
        blobs: Sequence[str] = (),
        *,
        session: str = "",
        fence: bool = True,
    ) -> bool:
        """Make the lease name ``manifests`` and ``blobs``; True when it had
        lapsed or was not held, so what it names may have been collected before
        now and the caller must check that it is still there.

        With ``fence`` returns only once no gc can delete on an older view of
        the leases (``wait_out_gc``): after that, a blob named here that is
        present stays present while the lease is renewed.  Without, the caller
        only narrows what it names to what an earlier, fenced hold covered.
        """
        async with self._lock:
            lapsed = await self._hold(manifests, blobs, session)
        if fence:
            await wait_out_gc(self.store, self.clock)
        return lapsed

    async def _hold(self, manifests: Sequence[str], blobs: Sequence[str], session: str) -> bool:
        now = self.clock()
        lapsed = self._tag is None or now >= self._written + self.ttl
        doc = SessionLeaseDoc(
            studio=self.studio,
            holder=self.holder,
            session=session,
            host=socket.gethostname(),
            manifests=sorted(set(manifests)),
            blobs=sorted(set(blobs)),
            written=now,
            expires=now + self.ttl,
        )
        return not await self._write(doc) or lapsed

    async def _write(self, doc: SessionLeaseDoc) -> bool:
        """Write the lease; False when it had to be created afresh."""
        body = doc.encode()
        tag: str | None = None
        if self._tag is not None:
            try:
                tag = await self.store.replace_lease(self.name, body, self._tag)
            except RefConflict:
                tag = None  # removed by a gc that found it expired: create it again
        fresh = tag is None
        if tag is None:
            tag = await self.store.create_lease(self.name, body)
            if tag is None:  # our own name: only an earlier try of ours stands there
                current = await self.store.get_lease(self.name)
                if current is None:
                    raise AgentError(f"cannot write the session lease {self.name}")
                tag = await self.store.replace_lease(self.name, body, current.tag)
        self._tag, self._written, self._doc = tag, doc.written, doc
        return not fresh

    async def renew(self) -> bool:
        """Push the expiry out, naming the same as before; True when it had lapsed.
        A lease not held (before the session started, after a release) stays so."""
        async with self._lock:
            if self._doc is None:
                return False
            d = self._doc
            return await self._hold(d.manifests, d.blobs, d.session)

    async def release(self) -> None:
        """Remove the lease (a clean stop): gc no longer keeps what only it names."""
        async with self._lock:
            tag, self._tag, self._doc = self._tag, None, None
            if tag is None:
                return
            try:
                await self.store.delete_lease(self.name, tag)
            except AgentError as e:  # it expires by itself
                log.warning("lease.release_failed", lease=self.name, error=str(e))


# -- the collector's side ---------------------------------------------------------------


class GcLeaseHeld(AgentError):
    """Another gc holds the lease of this work directory."""


class GcLeaseLost(AgentError):
    """This gc's lease expired or was taken over: it must not delete anything more."""


@dataclass
class GcLease:
    """The one gc lease of a work directory, held by this collector."""

    store: Store
    clock: Clock = time.time
    ttl: float = GC_TTL
    holder: str = field(default_factory=lambda: uuid.uuid4().hex)
    _tag: str | None = None
    _doc: GcLeaseDoc | None = None
    _renewed: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one renewal at a time

    @property
    def expires(self) -> float:
        return self._doc.expires if self._doc else 0.0

    def _new(self, phase: str, batch: int, started: float | None = None) -> GcLeaseDoc:
        now = self.clock()
        return GcLeaseDoc(
            holder=self.holder,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now if started is None else started,
            expires=now + self.ttl,
            phase=phase,
            batch=batch,
        )

    async def take(self) -> None:
        """Take the lease, or a stale (expired) one over; ``GcLeaseHeld`` otherwise."""
        doc = self._new("mark", 0)
        tag = await self.store.create_lease(GC_LEASE, doc.encode())
        if tag is None:
            current = await self.store.get_lease(GC_LEASE)
            if current is None:  # released meanwhile: try once more
                tag = await self.store.create_lease(GC_LEASE, doc.encode())
                if tag is None:
                    raise GcLeaseHeld("another gc took the lease of this work directory just now")
            else:
                tag = await self._take_over(current, doc)
        self._tag, self._doc, self._renewed = tag, doc, self.clock()

    async def _take_over(self, current: Lease, doc: GcLeaseDoc) -> str:
        try:
            other = GcLeaseDoc.decode(current.body)
        except ValueError:
            raise GcLeaseHeld(
                f"the gc lease {GC_LEASE!r} of this work directory is unreadable; if no gc "
                "is running, remove it (leases/gc under the checkpoints) and run gc again"
            ) from None
        if other.expires > self.clock():
            raise GcLeaseHeld(
                f"another gc holds the lease of this work directory ({other.describe()})"
            )
        try:
            tag = await self.store.replace_lease(GC_LEASE, doc.encode(), current.tag)
        except RefConflict:
            raise GcLeaseHeld(
                "another gc took over the stale lease of this work directory first"
            ) from None
        log.info("gc.lease_taken_over", stale=other.describe())
        return tag

    async def renew(self, phase: str) -> None:
        """Before a batch of deletes (and now and then while listing): a new tag,
        a new expiry.  ``GcLeaseLost`` when it expired first or is not ours now."""
        async with self._lock:
            await self._renew(phase)

    async def _renew(self, phase: str) -> None:
        if self._tag is None or self._doc is None:
            raise GcLeaseLost("the gc lease is not held")
        if self.clock() >= self._doc.expires:
            raise GcLeaseLost(
                f"the gc lease expired at {_when(self._doc.expires)} (this gc was held up); "
                "another gc may run now"
            )
        doc = self._new(phase, self._doc.batch + 1, self._doc.started)
        try:
            tag = await self.store.replace_lease(GC_LEASE, doc.encode(), self._tag)
        except RefConflict:
            raise GcLeaseLost("the gc lease was taken over by another gc") from None
        self._tag, self._doc, self._renewed = tag, doc, self.clock()

    async def keep(self) -> None:
        """Renew when a third of the lease has gone by (long listings and marks)."""
        async with self._lock:
            if self._doc is not None and self.clock() - self._renewed >= self.ttl / 3:
                await self._renew(self._doc.phase)

    async def release(self) -> None:
        tag, self._tag = self._tag, None
        if tag is None:
            return
        try:
            await self.store.delete_lease(GC_LEASE, tag)
        except AgentError as e:
            log.warning("gc.lease_release_failed", error=str(e))
