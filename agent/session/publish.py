"""Writing a checkpoint: the layer, its manifest, then its ref.

Write order makes every checkpoint atomic (restic's data -> index -> snapshot):
the layer blob, then the manifest blob, then the ref (compare-and-swap), then
the local session file and parent state.  A crash or kill at any point leaves
the previous checkpoint listed and restorable; a half-written one is never
listed because nothing names it until its ref is written.  A session stopped
after its ref was written but before it recorded so finds its own manifest at
the ref and carries on from it.

Before the first blob is stored the session lease names it, the new manifest
and the chain's head, so gc keeps them until the ref reaches them
(``lease.py``); then the lease names the new manifest as the head.

The layer goes to the store through a ``BlobSink`` while it is written: the S3
store uploads its parts to a temporary key as they fill, so storing it
overlaps the walk and the compression, and only the last part, a copy inside
the store and the lease remain once the digest is known.  The lease stands
from the start of the walk (a one-shot command writes it then) and is renewed
while the checkpoint runs, so gc knows the temporary upload's owner is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, cast

from agent.checkpoint.diff import Changes, ParentBlocks
from agent.checkpoint.layer_writer import LayerResult
from agent.checkpoint.manifest import CheckpointState, LayerDesc, Manifest
from agent.checkpoint.names import normalize_name
from agent.checkpoint.pipeline import Pass, scan_and_write
from agent.checkpoint.scan import Scan
from agent.checkpoint.state import StateReader
from agent.checkpoint.watched import ChangeSource, Dirty
from agent.errors import AgentError, BlobMissing, RefConflict
from agent.faults import crash_point
from agent.log import get_logger
from agent.session.lease import SESSION_RENEW
from agent.session.leftovers import layer_spool_name
from agent.session.local import LocalSession
from agent.session.parts import Parts
from agent.session.records import (
    CheckpointInfo,
    CheckpointResult,
    Progress,
    ProgressFn,
    Skipped,
)
from agent.session.scope import log_skipped
from agent.session.segments import SegmentUploads
from agent.statedir import create_file, ensure_private_dir
from agent.store.base import BlobSink, Store

log = get_logger("session")


class Publisher:
    def __init__(self, parts: Parts, cancel: threading.Event) -> None:
        self._settings = parts.settings
        self._studio = parts.settings.studio
        self._store = parts.store
        self._root = parts.root
        self._spool = parts.spool
        self._clock = parts.clock
        self._local = parts.local
        self._scope = parts.scope
        self._manifests = parts.manifests
        self._cancel = cancel
        self._lease = parts.lease
        self._present: set[str] = set()  # blobs seen in the store by this process

    async def checkpoint(
        self,
        name: str | None,
        state: CheckpointState,
        *,
        skip_unchanged: bool,
        progress: ProgressFn | None,
        changes_since: ChangeSource | None = None,
    ) -> CheckpointResult | None:
        """Write the changes since the parent state as a layer and point ``name`` at it.

        ``changes_since``: what changed since the parent state, when known (the
        caller holds the session lock: no other checkpoint takes them meanwhile);
        then only that is read, and if it is nothing, nothing is."""
        t0 = time.monotonic()
        dirty = changes_since.take() if changes_since is not None else None
        try:
            return await self._checkpoint(t0, name, state, skip_unchanged, progress, dirty)
        except BaseException:
            if changes_since is not None:
                changes_since.spoil()
            raise

    async def _checkpoint(
        self,
        t0: float,
        name: str | None,
        state: CheckpointState,
        skip_unchanged: bool,
        progress: ProgressFn | None,
        dirty: Dirty | None,
    ) -> CheckpointResult | None:
        local = self._local.current()
        target = normalize_name(name) if name else local.name
        parent: Path | None = self._local.parent_state(local)
        local, note = await self._rebased(local)
        if note or parent is None:
            parent = None  # a new chain: its first layer holds the whole root
            dirty = None
        if dirty is not None and not dirty and skip_unchanged:
            return None  # the watch saw nothing change: not even the state is read
        # The store readies itself (an S3 client takes a while) while the root
        # is walked and the layer compressed, mostly outside the GIL.
        ready = asyncio.ensure_future(self._store.prepare())
        upload = f"{self._lease.holder}/{uuid.uuid4().hex}"
        tmp = self._spool / layer_spool_name(upload)
        # The next parent state, written as the walk goes; named by session.json
        # only once the checkpoint is published.  When the watch saw nothing
        # change, it is the parent state itself: nothing is read or written.
        same = parent is not None and dirty is not None and not dirty
        next_state = parent if same and parent is not None else self._local.new_state()
        saved = False
        sink: BlobSink | None = None
        segments: SegmentUploads | None = None
        try:
            async with self._leased(local) as standing:

                async def cover_segments(digests: list[str]) -> None:
                    await standing
                    await self.cover(local, digests, None)

                try:
                    try:
                        if self._store.segment_size:
                            segments = SegmentUploads(
                                self._store, self._spool, self._lease.holder, cover_segments
                            )
                        sink = self._open_sink(tmp, upload, segments)
                        if same:
                            done = Pass(Scan(), Changes(), None, 0.0, next_state, watched=True)
                        else:
                            done = await self._scan_and_write(
                                parent, next_state, sink, progress, dirty, segments
                            )
                    finally:
                        await ready
                    current, changes, layer = done.scan, done.changes, done.layer
                    skipped = [Skipped(p, r) for p, r in current.skipped]
                    if not changes and skip_unchanged:
                        return None
                    chain = list(local.chain)
                    if layer is not None:
                        skipped.extend(Skipped(p, r) for p, r in layer.skipped)
                        for s in layer.skipped:
                            log.warning("checkpoint.skipped", path=s[0], reason=s[1])
                        chain.extend(
                            LayerDesc(
                                seg.digest,
                                seg.size,
                                seg.entries,
                                seg.uncompressed,
                                changes.replaced if i == 0 else 0,
                                continues=i > 0,
                            )
                            for i, seg in enumerate(layer.segments)
                        )
                    manifest = self._manifest(local, target, chain, state)
                    await standing
                    if layer is not None:
                        last = segments.sinks[-1] if segments is not None else sink
                        await self._store_layer(last, local, layer, manifest, progress, segments)
                        crash_point("layer")
                        self._present.update(seg.digest for seg in layer.segments)
                    else:
                        await self.cover(local, [], manifest)
                    t_layer = time.monotonic()
                    info = await self.publish(local, target, manifest)
                finally:
                    # After the ref: what the store tidies up of the upload runs meanwhile.
                    if segments is not None:
                        await segments.discard()
                    elif sink is not None:
                        await sink.discard()
                    tmp.unlink(missing_ok=True)
            crash_point("ref")
            local.chain = chain
            await asyncio.to_thread(self._local.save, local, next_state)
            saved = True
        finally:
            if not saved and not same:  # (the parent state stays the parent)
                next_state.unlink(missing_ok=True)
        duration = time.monotonic() - t0
        log.info(
            "checkpoint.written",
            checkpoint=info.name,
            state=state.value,
            changed=len(changes),
            layer_size=layer.size if layer else 0,
            size=info.size,
            layers=info.layers,
            seconds=round(duration, 3),
            walk_seconds=round(done.walk_seconds, 3),
            scan="watch" if done.watched else "full",
            layer_seconds=round(t_layer - t0, 3),
        )
        return CheckpointResult(
            info=info,
            changed=len(changes),
            layer_size=layer.size if layer else 0,
            duration=duration,
            skipped=skipped,
            note=note,
            watched=done.watched,
        )

    def _open_sink(self, tmp: Path, upload: str, segments: SegmentUploads | None) -> BlobSink:
        """The store's sink for the layer, spooled in ``tmp`` (a new private file),
        or the first segment's when the layer is cut."""
        try:
            ensure_private_dir(self._spool, self._root)
            if segments is not None:
                return cast(BlobSink, segments.open())
            fd = create_file(tmp)
        except OSError as e:
            raise AgentError(f"cannot write the layer to {self._spool}: {e.strerror or e}") from e
        return self._store.open_blob(fd, tmp, upload)

    async def _scan_and_write(
        self,
        parent: Path | None,
        state: Path,
        sink: BlobSink,
        progress: ProgressFn | None,
        dirty: Dirty | None,
        segments: SegmentUploads | None,
    ) -> Pass:
        """Walk the root against the parent state ``parent`` (or read what ``dirty``
        names again), in one pass writing its changes to ``sink`` (and the
        segments after the first to theirs) and the next parent state to ``state``."""

        def on_progress(phase: str, done: int, total: int, b_done: int, b_total: int) -> None:
            if progress is not None:
                progress(Progress(phase, b_done, b_total, done, total))

        def run() -> Pass:
            with contextlib.ExitStack() as stack:
                blocks: ParentBlocks = []  # no parent: the whole root is new
                if parent is not None:
                    blocks = stack.enter_context(StateReader(parent)).blocks()
                done = scan_and_write(
                    self._root,
                    self._scope.excluder(),
                    blocks,
                    cast(BinaryIO, sink),  # all a layer writer asks of its output: write
                    state=state,
                    level=self._settings.compression_level,
                    threads=self._settings.compression_threads,
                    progress=on_progress,
                    cancel=self._cancel,
                    dirty=dirty,
                    keep_paths=False,
                    segment_bytes=self._store.segment_size,
                    next_segment=segments.next_segment if segments is not None else None,
                )
            log_skipped(done.scan)
            return done

        try:
            return await asyncio.to_thread(run)
        except OSError as e:  # the spool's disk is full or read-only
            raise AgentError(f"cannot write the layer to {self._spool}: {e.strerror or e}") from e

    async def _store_layer(
        self,
        sink: BlobSink,
        local: LocalSession,
        layer: LayerResult,
        manifest: Manifest,
        progress: ProgressFn | None,
        segments: SegmentUploads | None,
    ) -> None:
        """The layer under its digest, named in the lease first; what is left of
        its upload runs while the lease is written.  A cut layer's earlier
        segments are stored, or being stored, already: ``sink`` is the last's."""
        if progress is not None:
            progress(Progress("upload", 0, layer.size, 0, 1))
        tail = asyncio.ensure_future(sink.finish())
        digests = [seg.digest for seg in layer.segments]
        try:
            if segments is None:
                await self.cover(local, digests, manifest)
            else:
                await segments.cover_last(lambda: self.cover(local, digests, manifest))
        except BaseException:
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)
            raise
        await tail
        last = layer.segments[-1]
        await sink.commit(last.digest, last.size)
        if segments is not None:
            await segments.stored()
        if progress is not None:
            progress(Progress("upload", layer.size, layer.size, 1, 1))

    @contextlib.asynccontextmanager
    async def _leased(self, local: LocalSession) -> AsyncIterator[asyncio.Future[None]]:
        """The session lease, written now (the future the body awaits before it
        stores anything) and renewed while the body runs: a layer is uploaded
        under its holder's name as it is written, and gc spares the uploads of
        live holders however long they take.  A one-shot command holds no lease
        yet: it names the chain's layers, as ``cover`` does for it, and checks
        that the chain is whole, since nothing kept it before."""

        async def hold() -> None:
            if self._lease.held:
                return
            chain = [layer.digest for layer in local.chain]
            if await self._lease.hold([], chain, session=local.session):
                await check_chain(self._store, [], chain)

        async def renew() -> None:
            while True:
                await asyncio.sleep(SESSION_RENEW)
                try:
                    await self._lease.renew()
                except AgentError as e:  # the next try, or the checkpoint's own write
                    log.warning("lease.renew_failed", error=str(e))

        held = asyncio.ensure_future(hold())
        renewing = asyncio.ensure_future(renew())
        try:
            yield held
        finally:
            renewing.cancel()
            # Never cut short: a lease written but not recorded could not be released.
            await asyncio.gather(held, renewing, return_exceptions=True)

    async def _rebased(self, local: LocalSession) -> tuple[LocalSession, str]:
        """The session to write from: a copy with a new chain when this store does not
        hold the session's chain (saved only once the checkpoint is written), and why."""
        url = self._store.url
        if local.store and local.store != url:
            why = f"this session's chain is in {local.store}, not in {url}"
            # the refs this session wrote are the other store's: none here yet
            work = replace(local, chain=[], refs={}, created={}, store=url)
        else:
            missing = await self.missing(local.chain)
            if not missing:
                local.store = url
                return local, ""
            why = (
                f"{len(missing)} of the {len(local.chain)} layers of this session's chain "
                f"are missing from {url} (first: {missing[0].digest})"
            )
            work = replace(local, chain=[], store=url)
        log.warning("checkpoint.new_chain", reason=why, store=url)
        return work, f"{why}: this checkpoint starts a new chain there, with the whole root"

    async def missing(self, chain: list[LayerDesc]) -> list[LayerDesc]:
        """The layers of ``chain`` the store does not have (each found once is remembered:
        blobs are write-once)."""
        todo = [layer for layer in chain if layer.digest not in self._present]
        limit = asyncio.Semaphore(8)

        async def has(layer: LayerDesc) -> bool:
            async with limit:
                return await self._store.has_blob(layer.digest)

        found = await asyncio.gather(*(has(layer) for layer in todo))
        self._present.update(layer.digest for layer, ok in zip(todo, found, strict=True) if ok)
        return [layer for layer, ok in zip(todo, found, strict=True) if not ok]

    async def mark(self, state: CheckpointState, name: str | None) -> CheckpointInfo:
        """Write this session's checkpoint with the current chain and ``state``, no scan."""
        local = self._local.current()
        target = normalize_name(name) if name else local.name
        manifest = self._manifest(local, target, list(local.chain), state)
        await self.cover(local, [], manifest)
        info = await self.publish(local, target, manifest)
        await asyncio.to_thread(self._local.save, local, None)
        return info

    def _manifest(
        self, local: LocalSession, name: str, chain: list[LayerDesc], state: CheckpointState
    ) -> Manifest:
        now = datetime.fromtimestamp(self._clock(), UTC)
        created = datetime.fromisoformat(local.created.get(name, now.isoformat()))
        return Manifest(self._studio, local.session, state, created, tuple(chain))

    async def cover(self, local: LocalSession, blobs: list[str], manifest: Manifest | None) -> None:
        """Name the blobs about to be stored in the lease, beside what the chain
        needs, and make sure gc cannot take them (``SessionLease.hold``).

        Without a head manifest (a one-shot command knows none) the lease names
        the chain's layers themselves.  A lease that was not standing protected
        nothing: the chain is checked for every blob before it is extended.
        """
        chain = [layer.digest for layer in local.chain]
        head = self._lease.manifests if chain else []  # a new chain extends nothing
        new = [*blobs, manifest.encode()[1]] if manifest is not None else blobs
        pending = [*new, *([] if head else chain)]
        if await self._lease.hold(head, pending, session=local.session):
            await check_chain(self._store, head, chain)

    async def publish(self, local: LocalSession, name: str, manifest: Manifest) -> CheckpointInfo:
        """Manifest blob, then the ref: the moment the checkpoint exists.

        Never while a layer of the chain is missing from the store: that
        checkpoint could not be restored.  The session's own automatic name is
        claimed by its first write: when another session holds it (two started
        within one second), the compare-and-swap picks the next free suffix.
        """
        missing = await self.missing(list(manifest.layers))
        if missing:
            raise BlobMissing(
                f"checkpoint {name!r} not written: {len(missing)} layers of its chain are "
                f"missing from {self._store.url} (first: {missing[0].digest})"
            )
        own_unclaimed = name == local.name and name not in local.refs
        base, n = name, 1
        while True:
            try:
                info = await self._write_one(local, name, manifest)
                break
            except _TakenByOther:
                if not own_unclaimed or n >= _MAX_SUFFIX:
                    raise RefConflict(
                        f"checkpoint {name!r} already exists in studio {self._studio}; "
                        "names are unique per studio"
                    ) from None
                n += 1
                name = f"{base}_{n}"
        if own_unclaimed and name != local.name:
            log.info("checkpoint.name_taken", wanted=local.name, name=name)
            local.name = name
        return info

    async def _write_one(
        self, local: LocalSession, name: str, manifest: Manifest
    ) -> CheckpointInfo:
        expect = local.refs.get(name)
        try:
            info = await self._manifests.write(self._studio, name, manifest, expect)
        except RefConflict:
            current = await self._store.get_ref(self._studio, name)
            if current is None and expect is not None:
                # Deleted while the session ran: the session's work goes on, and
                # its checkpoint with it.
                log.info("checkpoint.recreated", checkpoint=name)
                info = await self._manifests.write(self._studio, name, manifest, None)
            elif current is None or not await self._manifests.written_by(
                current.digest, local.session
            ):
                if expect is None:
                    raise _TakenByOther(name) from None
                raise
            else:
                # We wrote it but were stopped before recording so: carry on from it.
                info = await self._manifests.write(self._studio, name, manifest, current.digest)
        local.refs[name] = info.digest
        local.created.setdefault(name, manifest.created.isoformat())
        # The new manifest reaches all the lease named: it is the head now.
        await self._lease.hold([info.digest], session=local.session, fence=False)
        return info


async def check_chain(store: Store, manifests: list[str], layers: list[str]) -> None:
    """Refuse to extend a chain that lost a blob while no lease protected it."""
    limit = asyncio.Semaphore(16)

    async def present(digest: str) -> bool:
        async with limit:
            return await store.has_blob(digest)

    wanted = [*manifests, *layers]
    found = await asyncio.gather(*(present(d) for d in wanted))
    missing = [d for d, ok in zip(wanted, found, strict=True) if not ok]
    if missing:
        raise AgentError(
            f"the chain this session extends lost {len(missing)} blob(s), e.g. {missing[0]} "
            "(its checkpoint was deleted and collected while no session lease kept it); "
            "restore a checkpoint to start a new session"
        )


_MAX_SUFFIX = 1000


class _TakenByOther(Exception):
    """The name is another session's checkpoint."""
