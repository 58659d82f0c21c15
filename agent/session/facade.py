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
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.checkpoint.diff import report
from agent.checkpoint.manifest import CheckpointState, LayerDesc
from agent.errors import NotFound
from agent.session.catalog import Catalog
from agent.session.export import Exporter, ExportOutcome
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
)
from agent.session.scope import Scope
from agent.session.squash import Squasher, SquashOutcome
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
        self._starter = Starter(
            settings.studio,
            store,
            self.root,
            self.spool,
            clock,
            self._local,
            self._scope,
            manifests,
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
        )
        self._catalog = Catalog(settings.studio, store, self._local, manifests)
        self._verifier = Verifier(store, self.spool)
        self._squasher = Squasher(settings, store, self.spool, self._local, manifests, self._locked)
        self._exporter = Exporter(settings, store, self.spool, manifests)

    async def _locked(self, step: Callable[[], Awaitable[CheckpointInfo]]) -> CheckpointInfo:
        async with self._lock:
            return await step()

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

    # -- the catalog ----------------------------------------------------------------

    async def list_checkpoints(self) -> list[CheckpointInfo]:
        """This studio's checkpoints, most recently updated first."""
        return await self._catalog.list_checkpoints()

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

    # -- squashing -----------------------------------------------------------------

    async def squash(
        self,
        checkpoint: str | None = None,
        *,
        start: int = 0,
        cancel: threading.Event | None = None,
        low_priority: bool = False,
    ) -> SquashOutcome:
        """Squash a checkpoint's chain from layer ``start`` into one layer.

        ``checkpoint``: NAME of this studio's, or STUDIO/NAME (its ref is the one
        moved); default this session's own, else the studio's latest.  The long
        part runs without the lock, so checkpoints go on meanwhile (and are kept:
        the squash rebases onto them); only the manifest and ref step takes it."""
        if checkpoint:
            studio, name = self._starter.split_source(checkpoint)
        else:
            studio, name = self.studio, await self._default_squash_target()
        return await self._squasher.squash(
            studio, name, start=start, cancel=cancel, low_priority=low_priority
        )

    async def _default_squash_target(self) -> str:
        local = self._local.peek()
        if local is not None and local.name in local.refs:
            return local.name
        listed = await self.list_checkpoints()
        if not listed:
            raise NotFound(f"studio {self.studio} has no checkpoint to squash")
        return listed[0].name

    # -- exporting ------------------------------------------------------------------

    async def export(
        self,
        checkpoint: str,
        directory: Path,
        *,
        base: Path | None = None,
        tag: str = "",
        progress: ProgressFn | None = None,
    ) -> ExportOutcome:
        """Write a checkpoint (NAME or STUDIO/NAME; default this studio's most
        recently written) as an OCI image layout in ``directory``, on the image
        of the layout ``base`` when given.  Reads the store only: no lock."""
        if checkpoint:
            studio, name = self._starter.split_source(checkpoint)
        else:
            listed = await self.list_checkpoints()
            if not listed:
                raise NotFound(f"studio {self.studio} has no checkpoint to export")
            studio, name = self.studio, listed[0].name
        return await self._exporter.export(
            studio, name, directory, base=base, tag=tag, progress=progress
        )

    # -- what changed ---------------------------------------------------------------

    async def diff(self) -> DiffReport:
        """What changed since the parent state, largest first."""
        local = self._local.current()
        parent = await asyncio.to_thread(self._local.parent_entries, local)
        current = await asyncio.to_thread(self._scope.scan, parent)
        lines = report(parent, current.entries)
        return DiffReport(lines, [Skipped(p, r) for p, r in current.skipped])
