"""Garbage collection: delete the blobs nothing reaches, beside live writers.

One gc at a time per work directory holds the gc lease (``lease.py``).  In order:

1. list every blob; those last written before the cutoff (now minus the grace
   period) are candidates.  Listing comes first: a blob stored later is no
   candidate, and one stored earlier was named in its writer's lease before.
2. mark: every unexpired session lease, then every ref of every studio, is a
   root; every manifest a root reaches is followed (``reach.py``), and what it
   lists (config, layers, manifests) is marked.  Leases come first: a writer
   drops its lease only after writing its ref, so what a lease read too late
   to see protected is reached by a ref read after it.
3. sweep, in batches: before each, renew the gc lease (a gc whose lease
   expired stops there) and read the session leases again; then delete the
   candidates nothing marked.
4. abort the incomplete uploads and remove the temporary files and objects
   older than the cutoff (and at least ``leftover_age``: a live upload looks
   the same), except those whose owner holds an unexpired session lease (a
   writer still uploading a layer, however long it takes).

Refs and manifests are hostile input.  One that cannot be read (a ref that
is not a ref document, a manifest that does not parse, a store error) might
protect anything, so gc then refuses to sweep and says which; a ref whose
manifest is gone is reported as broken (what it listed is unknown, nothing is
left to protect).  A ref that vanishes between the listing and its read is
looked for again under a fresh listing, since a rename writes the new ref
before it removes the old.

Memory is bounded by digests: the candidates (digest and size), the marked
set and the manifests already followed, never the objects themselves.
Deleting is best effort: a refusal (no s3:DeleteObject) is reported with the
blobs left behind, and the run goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.errors import AgentError, BlobMissing, PermissionDenied, RefConflict
from agent.log import get_logger
from agent.session.lease import SESSIONS, GcLease, GcLeaseLost, SessionLeaseDoc
from agent.session.reach import ManifestReader
from agent.store.base import Store

log = get_logger("gc")

Progress = Callable[[str], None]

BATCH = 256  # deletes between two renewals of the gc lease
CONCURRENCY = 16  # reads or deletes in flight
LEFTOVER_AGE = timedelta(hours=1)
RELIST = 5  # fresh listings of a studio whose refs keep vanishing under the reads


@dataclass
class GcReport:
    """What a gc run found and did; ``exit_code`` is the CLI's."""

    dry_run: bool
    grace: timedelta
    blobs: int = 0  # listed
    blob_bytes: int = 0
    studios: int = 0
    refs: int = 0
    leases: int = 0  # unexpired session leases read
    manifests: int = 0  # manifests followed
    doomed: list[tuple[str, int]] = field(default_factory=list)  # unreachable, old enough
    deleted: int = 0
    freed: int = 0
    left: list[str] = field(default_factory=list)  # could not be deleted
    left_bytes: int = 0
    errors: list[str] = field(default_factory=list)  # why, one line per distinct cause
    leftovers: list[tuple[str, int]] = field(default_factory=list)  # removed (or would be)
    problems: list[str] = field(default_factory=list)  # reported, not blocking
    refused: str | None = None  # why nothing was swept
    stopped: str | None = None  # why the sweep ended early
    seconds: float = 0.0

    @property
    def doomed_bytes(self) -> int:
        return sum(size for _, size in self.doomed)

    @property
    def exit_code(self) -> int:
        """Non-zero only when gc could delete nothing it had to."""
        if self.refused is not None:
            return 1
        if not self.dry_run and self.doomed and self.deleted == 0:
            return 1
        return 0


class _Marker:
    """The marked set and the manifests followed, filled from roots."""

    def __init__(
        self, store: Store, scratch: Path, report: GcReport, lease: GcLease | None
    ) -> None:
        self._store = store
        self._lease = lease
        self._reader = ManifestReader(store, scratch)
        self._report = report
        self.marked: set[str] = set()
        self._followed: set[str] = set()
        self._lease_tags: set[str] = set()
        self._limit = asyncio.Semaphore(CONCURRENCY)

    def refuse(self, why: str) -> None:
        if self._report.refused is None:
            self._report.refused = why
        log.warning("gc.refused", reason=why)

    async def follow(self, digest: str, where: str) -> None:
        """Mark a manifest and all it reaches; ``where`` names the root, for reports."""
        stack = [digest]
        while stack:
            d = stack.pop()
            self.marked.add(d)
            if d in self._followed:
                continue
            self._followed.add(d)
            try:
                async with self._limit:
                    _, kids = await self._reader.read(d)
            except BlobMissing:
                self._report.problems.append(
                    f"{where} is broken: its manifest {d} is missing (delete it)"
                )
                continue
            except AgentError as e:
                self.refuse(f"{where}: {e}")
                continue
            self._report.manifests += 1
            for kid in kids:
                self.marked.add(kid.digest)
                if kid.manifest:
                    stack.append(kid.digest)

    async def refs(self, progress: Progress) -> None:
        studios = await self._store.list_studios()
        self._report.studios = len(studios)
        done = 0

        async def one(studio: str) -> None:
            nonlocal done
            try:
                await self._studio(studio)
                if self._lease is not None:
                    await self._lease.keep()
            except GcLeaseLost as e:
                self._report.stopped = str(e)
            except AgentError as e:
                self.refuse(f"the refs of studio {studio} cannot be listed: {e}")
            done += 1
            if done % 100 == 0:
                progress(f"marked {done}/{len(studios)} studios, {self._report.refs} refs")

        await _gather_bounded((one(s) for s in studios), CONCURRENCY)

    async def _studio(self, studio: str) -> None:
        seen: set[str] = set()
        for _ in range(RELIST):
            async with self._limit:
                names = await self._store.list_ref_names(studio)
            fresh = [n for n in names if n not in seen]
            seen.update(fresh)
            vanished = await asyncio.gather(*(self._ref(studio, n) for n in fresh))
            if not any(vanished):
                return
        self.refuse(f"the refs of studio {studio} kept changing while gc read them; run gc again")

    async def _ref(self, studio: str, name: str) -> bool:
        """Mark what one ref reaches; True when it vanished before it was read."""
        try:
            async with self._limit:
                ref = await self._store.get_ref(studio, name)
        except AgentError as e:
            self.refuse(f"checkpoint {studio}/{name} cannot be read: {e}")
            return False
        if ref is None:
            return True
        self._report.refs += 1
        await self.follow(ref.digest, f"checkpoint {studio}/{name}")
        return False

    async def leases(self, now: float) -> list[tuple[str, str, float]]:
        """Mark what unexpired session leases name (each version once); return
        the expired ones as (name, tag, expiry)."""
        expired: list[tuple[str, str, float]] = []
        try:
            names = await self._store.list_leases(SESSIONS)
            leases = await asyncio.gather(*(self._store.get_lease(n) for n in names))
        except AgentError as e:
            self.refuse(f"the session leases cannot be read: {e}")
            return expired
        for name, lease in zip(names, leases, strict=True):
            if lease is None or lease.tag in self._lease_tags:
                continue
            try:
                doc = SessionLeaseDoc.decode(lease.body)
            except ValueError as e:
                self.refuse(f"session lease {name} is unreadable ({e}); remove it if it is junk")
                continue
            if doc.expires <= now:
                expired.append((name, lease.tag, doc.expires))
                continue
            self._lease_tags.add(lease.tag)
            self._report.leases += 1
            self.marked.update(doc.blobs)
            for m in doc.manifests:
                await self.follow(m, f"the lease of session {doc.session or doc.holder}")
        return expired


async def collect(
    store: Store,
    scratch: Path,
    *,
    grace: timedelta,
    dry_run: bool = False,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.time,
    lease_ttl: float | None = None,
    batch: int = BATCH,
    leftover_age: timedelta = LEFTOVER_AGE,
) -> GcReport:
    """One gc run (see the module's docstring).  Raises ``GcLeaseHeld`` when
    another gc runs; everything else it meets is in the report."""
    say: Progress = progress or (lambda _msg: None)
    report = GcReport(dry_run=dry_run, grace=grace)
    t0 = time.monotonic()
    lease: GcLease | None = None
    if not dry_run:
        lease = GcLease(store, clock) if lease_ttl is None else GcLease(store, clock, lease_ttl)
        await lease.take()
    try:
        start = clock()
        cutoff = start - grace.total_seconds()
        candidates = await _list(store, cutoff, report, lease, say)
        marker = _Marker(store, scratch, report, lease)
        # Leases before refs: a writer releases its lease only once its ref is
        # written, so a lease gone by now means its ref is there to be read.
        expired = await marker.leases(clock())
        await marker.refs(say)
        if report.stopped is not None:
            return report  # the lease lapsed while marking: nothing was deleted
        say(
            f"marked {len(marker.marked)} blobs from {report.refs} refs of {report.studios} "
            f"studios and {report.leases} session leases ({report.manifests} manifests)"
        )
        if report.refused is not None:
            return report
        report.doomed = [(d, s) for d, s in candidates.items() if d not in marker.marked]
        del candidates
        if not dry_run:
            assert lease is not None
            await _sweep(store, report, marker, lease, clock, batch, say)
            # What a lease read during the sweep saved was not doomed after all.
            report.doomed = [(d, s) for d, s in report.doomed if d not in marker.marked]
        before = min(cutoff, start - leftover_age.total_seconds())
        if report.stopped is None and report.refused is None:
            alive = await _alive(store, clock())
            if alive is not None:
                await _leftovers(store, report, lease, before, alive, say)
            if lease is not None:
                await _drop_expired(store, expired, cutoff)
        return report
    finally:
        report.seconds = time.monotonic() - t0
        if lease is not None:
            await lease.release()


async def _list(
    store: Store, cutoff: float, report: GcReport, lease: GcLease | None, say: Progress
) -> dict[str, int]:
    candidates: dict[str, int] = {}
    pages = 0
    async for page in store.iter_blobs():
        pages += 1
        for b in page:
            report.blobs += 1
            report.blob_bytes += b.size
            if b.modified.timestamp() < cutoff:
                candidates[b.digest] = b.size
        if lease is not None:
            await lease.keep()
        if pages % 20 == 0:
            say(f"listed {report.blobs} blobs")
    say(f"listed {report.blobs} blobs in {pages} pages; {len(candidates)} older than the grace")
    return candidates


async def _sweep(
    store: Store,
    report: GcReport,
    marker: _Marker,
    lease: GcLease,
    clock: Callable[[], float],
    batch: int,
    say: Progress,
) -> None:
    todo = report.doomed
    total = len(todo)
    for i in range(0, total, batch):
        chunk = todo[i : i + batch]
        try:
            await lease.renew("delete")
        except GcLeaseLost as e:
            report.stopped = str(e)
            _leave(report, todo[i:])
            return
        await marker.leases(clock())
        if report.refused is not None:
            report.stopped = report.refused
            _leave(report, todo[i:])
            return
        chunk = [(d, s) for d, s in chunk if d not in marker.marked]
        refused = await _delete(store, report, chunk)
        say(f"deleted {report.deleted}/{total} blobs ({report.freed} bytes)")
        if chunk and refused == len(chunk):
            report.stopped = "every delete of a batch was refused; the rest is left as well"
            _leave(report, todo[i + batch :])
            return


async def _delete(store: Store, report: GcReport, chunk: list[tuple[str, int]]) -> int:
    """Delete a batch; return how many deletes were refused for lack of permission."""
    limit = asyncio.Semaphore(CONCURRENCY)
    refused = 0

    async def one(digest: str, size: int) -> None:
        nonlocal refused
        try:
            async with limit:
                await store.delete_blob(digest)
        except AgentError as e:
            refused += isinstance(e, PermissionDenied)
            report.left.append(digest)
            report.left_bytes += size
            _note(report, e)
            return
        report.deleted += 1
        report.freed += size

    await asyncio.gather(*(one(d, s) for d, s in chunk))
    return refused


def _leave(report: GcReport, rest: list[tuple[str, int]]) -> None:
    report.left.extend(d for d, _ in rest)
    report.left_bytes += sum(s for _, s in rest)


def _note(report: GcReport, e: AgentError) -> None:
    """One line per distinct cause: a thousand refusals say the same thing."""
    text = str(e)
    key = text.split(" on ", 1)[0] if isinstance(e, PermissionDenied) else text
    if not any(line.startswith(key) for line in report.errors):
        report.errors.append(text)


async def _alive(store: Store, now: float) -> set[str] | None:
    """The holders of the unexpired session leases, read now: writers whose uploads
    are in flight however old (None when the leases cannot be read: then no
    leftover is taken, as any might be a live one's)."""
    try:
        names = await store.list_leases(SESSIONS)
        leases = await asyncio.gather(*(store.get_lease(n) for n in names))
    except AgentError as e:
        log.warning("gc.leftovers_kept", reason=f"the session leases cannot be read: {e}")
        return None
    alive: set[str] = set()
    for lease in leases:
        if lease is None:
            continue
        try:
            doc = SessionLeaseDoc.decode(lease.body)
        except ValueError:
            return None  # unreadable: it might be anyone's
        if doc.expires > now:
            alive.add(doc.holder)
    return alive


async def _leftovers(
    store: Store,
    report: GcReport,
    lease: GcLease | None,
    before: float,
    alive: set[str],
    say: Progress,
) -> None:
    when = datetime.fromtimestamp(before, UTC)
    async for item in store.iter_leftovers(when):
        if item.owner and item.owner in alive:
            continue  # a live writer's upload, only slow
        if lease is None:
            report.leftovers.append((item.what, item.size))
            continue
        try:
            await lease.renew("delete")
            await store.remove_leftover(item)
        except GcLeaseLost as e:
            report.stopped = str(e)
            return
        except AgentError as e:
            _note(report, e)
            continue
        report.leftovers.append((item.what, item.size))
    if report.leftovers:
        say(f"removed {len(report.leftovers)} leftovers of interrupted writes")


async def _drop_expired(
    store: Store, expired: Iterable[tuple[str, str, float]], cutoff: float
) -> None:
    """Remove session leases that expired before the cutoff: their sessions are
    gone (one that comes back writes its lease afresh and checks its chain)."""
    for name, tag, expires in expired:
        if expires < cutoff:
            try:
                await store.delete_lease(name, tag)
            except (RefConflict, AgentError) as e:
                log.info("gc.lease_kept", lease=name, reason=str(e))


async def _gather_bounded(coros: Iterable[Awaitable[None]], limit: int) -> None:
    """Run coroutines at most ``limit`` at a time (the roots of a thousand studios)."""
    pending: set[asyncio.Future[None]] = set()
    for c in coros:
        if len(pending) >= limit:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                f.result()
        pending.add(asyncio.ensure_future(c))
    if pending:
        done, _ = await asyncio.wait(pending)
        for f in done:
            f.result()
