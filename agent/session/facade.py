"""The Session: one studio's session on one root, its parts composed.

Each concern has a module of its own (local state, scope, start, publish,
catalog); this class wires them to one store and one state dir, and serialises
the operations that change the session or its checkpoints.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.checkpoint.manifest import CheckpointState, LayerDesc
from agent.session.catalog import Catalog
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
from agent.session.start import Starter
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

    # -- what changed ---------------------------------------------------------------

    async def diff(self) -> DiffReport:
        """What changed since the parent state, largest first."""
        local = self._local.current()
        parent = self._local.parent_state(local)
        lines, current = await asyncio.to_thread(self._scope.report, parent)
        return DiffReport(lines, [Skipped(p, r) for p, r in current.skipped])
