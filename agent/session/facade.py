"""The Session: one studio's session on one root, its parts composed.

Each concern has a module of its own (local state, scope, start, publish,
catalog, verify); this class wires them to one store and one state dir, and serialises
the operations that change the session or its checkpoints.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.checkpoint.diff import report
from agent.checkpoint.manifest import CheckpointState, LayerDesc
from agent.session.catalog import Catalog
from agent.session.lease import SessionLease
from agent.session.local import LocalState
from agent.session.manifests import Manifests
from agent.session.publish import Publisher
from agent.session.records import (
    CheckpointInfo,
    CheckpointResult,
    DiffReport,
    ProgressFn,
    Skipped,
    StartOutcome,
    StudioDeletion,
)
from agent.session.scope import Scope
from agent.session.start import Starter
from agent.session.verify import Verifier, VerifyReport, resolve
from agent.settings import Settings
from agent.store.base import Store


class Session:
    """Checkpoint operations of one studio session on one root."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.root = Path(os.path.abspath(settings.root))
        self.state_dir = Path(os.path.abspath(settings.state_path))
        self.spool = self.state_dir / "spool"
        self._lock = asyncio.Lock()
        self._cancel = threading.Event()
        self._local = LocalState(self.state_dir, settings.studio, self.root)
        self._scope = Scope(settings, self.root, self.state_dir)
        manifests = Manifests(store, self.spool, clock)
        self._lease = SessionLease(store, settings.studio, clock)
        self._starter = Starter(
            settings.studio,
            store,
            self.root,
            self.spool,
            clock,
            self._local,
            self._scope,
            manifests,
            self._lease,
        )
        self._publisher = Publisher(
            settings,
            store,
            self.root,
            self.spool,
            clock,
            self._local,
            self._scope,
            manifests,
            self._cancel,
            self._lease,
        )
        self._catalog = Catalog(settings.studio, store, self._local, manifests, self.spool)
        self._verifier = Verifier(store, self.spool)

    # -- identity -------------------------------------------------------------------

    @property
    def studio(self) -> str:
        return self.settings.studio

    @property
    def session_id(self) -> str:
        return self._local.current().session

    @property
    def auto_name(self) -> str:
        """The name of this session's own checkpoint (``<studio>_<start epoch>``, or as renamed)."""
        return self._local.current().name

    @property
    def chain(self) -> list[LayerDesc]:
        return list(self._local.current().chain)

    # -- starting -------------------------------------------------------------------

    async def baseline(self) -> None:
        """Begin a new session on the root as it is now (nothing restored)."""
        async with self._lock:
            await self._starter.begin(chain=[])

    async def start(
        self,
        restore_from: str = "",
        progress: ProgressFn | None = None,
        *,
        required: bool = False,
    ) -> StartOutcome:
        """Restore a checkpoint (named, or the latest valid one), then begin a session."""
        async with self._lock:
            return await self._starter.start(restore_from, progress, required=required)

    # -- checkpoints ----------------------------------------------------------------

    async def checkpoint(
        self,
        name: str | None = None,
        state: CheckpointState = CheckpointState.FINALIZED,
        *,
        skip_unchanged: bool = False,
        progress: ProgressFn | None = None,
    ) -> CheckpointResult | None:
        """Write the changes since the parent state as a layer and point ``name`` at it."""
        async with self._lock:
            return await self._publisher.checkpoint(
                name, state, skip_unchanged=skip_unchanged, progress=progress
            )

    async def mark(self, state: CheckpointState, name: str | None = None) -> CheckpointInfo:
        """Write this session's checkpoint with the current chain and ``state``, no scan."""
        async with self._lock:
            return await self._publisher.mark(state, name)

    def cancel(self) -> None:
        """Abandon a checkpoint in progress (its ref is never written)."""
        self._cancel.set()

    # -- the session lease ----------------------------------------------------------

    async def renew_lease(self) -> None:
        """Push the session lease's expiry out (``lease.SESSION_RENEW`` apart at
        most), so gc keeps the chain while nothing changes to checkpoint.  A
        lease that had lapsed is written again; the next checkpoint checks the
        chain.  Does nothing before the session started or after a release."""
        await self._lease.renew()

    async def release_lease(self) -> None:
        """Remove the session lease, at a clean stop after the last checkpoint:
        from then on only refs keep this session's blobs."""
        await self._lease.release()

    # -- the catalog ----------------------------------------------------------------

    async def list_checkpoints(self, *, sizes: bool = False) -> list[CheckpointInfo]:
        """This studio's checkpoints, most recently updated first; with ``sizes``
        each says what deleting it would free (which reads every studio's refs)."""
        return await self._catalog.list_checkpoints(sizes=sizes)

    async def delete(self, checkpoint: str) -> CheckpointInfo | None:
        """Remove a checkpoint's ref (``NAME`` or ``STUDIO/NAME``); its blobs go
        at the next gc if nothing else reaches them."""
        async with self._lock:
            return await self._catalog.delete(checkpoint)

    async def delete_studio(self, studio: str) -> StudioDeletion:
        """Remove every ref of a studio: its checkpoints, not its blobs."""
        async with self._lock:
            return await self._catalog.delete_studio(studio)

    async def rename(self, old: str, new: str) -> CheckpointInfo:
        async with self._lock:
            return await self._catalog.rename(old, new)

    async def verify(
        self,
        source: str = "",
        *,
        every: bool = False,
        read_data: bool = False,
        progress: ProgressFn | None = None,
    ) -> VerifyReport:
        """Check checkpoints as stored: ``source`` (NAME or STUDIO/NAME), every one of
        this studio (``every``), or else this studio's most recently written one."""
        if source:
            studio, name = self._starter.split_source(source)
            targets = await resolve(self.store, studio, name)
        else:
            targets = await resolve(self.store, self.studio, None)
            if not every:
                targets = targets[:1]
        return await self._verifier.verify(targets, read_data=read_data, progress=progress)

    # -- what changed ---------------------------------------------------------------

    async def diff(self) -> DiffReport:
        """What changed since the parent state, largest first."""
        local = self._local.current()
        parent = await asyncio.to_thread(self._local.parent_entries, local)
        current = await asyncio.to_thread(self._scope.scan, parent)
        lines = report(parent, current.entries)
        return DiffReport(lines, [Skipped(p, r) for p, r in current.skipped])
