"""The Session: one studio's session on one root, its parts composed.

Each concern has a module of its own (local state, scope, start, publish,
catalog, verify); this class wires them to one store and one state dir, and serialises
the operations that change the session or its checkpoints.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.checkpoint.diff import DiffLine
from agent.checkpoint.manifest import CheckpointState, LayerDesc
from agent.checkpoint.scan import MODE, Excluder, Stat
from agent.checkpoint.state import drop_unchanged
from agent.checkpoint.watched import ChangeSource
from agent.errors import AgentError, NotFound
from agent.log import get_logger
from agent.session.catalog import Catalog
from agent.session.lease import SessionLease
from agent.session.leftovers import (
    RESTORE_MARKER,
    begin_restore,
    clear_restore_temps,
    clear_state_dir,
    end_restore,
    spooled_uploads,
)
from agent.session.local import LocalState
from agent.session.manifests import Manifests
from agent.session.parts import Parts
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
from agent.session.start import BeforeWalk, Starter
from agent.settings import Settings
from agent.statedir import ensure_private_dir
from agent.store.base import Store

# Loaded by the commands that use them: a checkpoint, a baseline or a restore
# (a one-shot process each) needs none of them.
if TYPE_CHECKING:
    from agent.session.export import ExportOutcome
    from agent.session.squash import SquashOutcome
    from agent.session.verify import VerifyReport

log = get_logger("session")

SHOWN_PATHS = 5


class UnsavedChanges(AgentError):
    """A restore would overwrite changes no checkpoint holds."""


def describe_changes(lines: list[DiffLine]) -> str:
    """``3 changes (/a, /b, /c)``: how many, and the first few paths."""
    paths = ", ".join("/" + x.path for x in lines[:SHOWN_PATHS])
    more = ", ..." if len(lines) > SHOWN_PATHS else ""
    return f"{len(lines)} change{'s' if len(lines) != 1 else ''} ({paths}{more})"


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
        self._restore_interrupted = False
        self._local = LocalState(self.state_dir, settings.studio, self.root)
        self._scope = Scope(settings, self.root, self.state_dir)
        self._manifests = manifests = Manifests(store, self.spool, clock)
        self._lease = SessionLease(store, settings.studio, clock)
        parts = Parts(
            settings,
            store,
            self.root,
            self.spool,
            clock,
            self._local,
            self._scope,
            manifests,
            self._lease,
        )
        self._starter = Starter(parts)
        self._publisher = Publisher(parts, self._cancel)
        self._catalog = Catalog(settings.studio, store, self._local, manifests, self.spool)

    async def _locked(self, step: Callable[[], Awaitable[CheckpointInfo]]) -> CheckpointInfo:
        async with self._lock:
            return await step()

    def _own_dirs(self) -> None:
        """The state dir and spool, made or checked before anything is written there
        (by us, or by a store staging a blob): see ``agent.statedir``."""
        ensure_private_dir(self.state_dir, self.root)
        ensure_private_dir(self.spool, self.root)

    # -- identity -------------------------------------------------------------------

    def excluder(self) -> Excluder:
        """What checkpoints leave out of the root as of now (a change watch too)."""
        return self._scope.excluder()

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
            self._own_dirs()
            await self._starter.begin(chain=[])

    async def start(
        self,
        restore_from: str = "",
        progress: ProgressFn | None = None,
        *,
        required: bool = False,
        force: bool = False,
        resume: bool = False,
        before_walk: BeforeWalk | None = None,
    ) -> StartOutcome:
        """Restore a checkpoint (named, or the latest valid one), then begin a session.

        Refused (``UnsavedChanges``) when the root's session has changes no
        checkpoint holds, unless ``force``.  With ``resume`` (the daemon) an
        earlier session on the root is carried on instead: nothing is restored
        over its unsaved work, which the new session's first checkpoint holds;
        a ``restore_from`` is honoured only when there is no such work.
        ``before_walk`` is awaited once the root is restored, just before it is
        walked for the new parent state; never when the session carries on from
        an earlier parent state, or keeps unsaved entries out of the new one.
        """
        async with self._lock:
            # (after a killed restore the root is half-restored: restore it again)
            carry_on = resume and not restore_from and not self._restore_interrupted
            if carry_on and (earlier := await self._starter.resume()):
                return StartOutcome(None, [], resumed=earlier.session)
            lost, before = await self._unsaved()
            if self._restore_interrupted:
                lost = []  # what differs was written by the killed restore, not by the user
            if lost and resume:
                log.warning(
                    "session.restore_skipped",
                    checkpoint=restore_from,
                    reason=f"the root has unsaved changes: {describe_changes(lost)}",
                )
                if earlier := await self._starter.resume():
                    return StartOutcome(None, [], resumed=earlier.session)
            if lost and not force:
                raise UnsavedChanges(
                    f"the root {self.root} has changes no checkpoint holds, which a restore "
                    f"would lose: {describe_changes(lost)}; checkpoint them first, or "
                    "restore with --force"
                )
            self._own_dirs()
            begin_restore(self.state_dir)
            try:
                outcome = await self._starter.start(
                    restore_from,
                    progress,
                    required=required,
                    # (entries forgotten below are unsaved work no watch saw change)
                    before_walk=None if lost else before_walk,
                )
            except asyncio.CancelledError:
                raise  # abandoned: its thread may still write; the next start clears up
            except BaseException:
                end_restore(self.state_dir)
                raise
            end_restore(self.state_dir)
            if lost:
                # what the restore did not overwrite is still on the root, and still
                # unsaved: the new parent state must not count it as saved
                await asyncio.to_thread(self._forget, [x.path for x in lost], before)
            return outcome

    def _forget(self, paths: list[str], before: dict[str, Stat]) -> None:
        """Drop from the parent state the unsaved entries the restore left as they were."""
        local = self._local.current()
        drop = {p: before[p] for p in paths if p in before}
        if not drop:
            return
        parent = self._local.parent_state(local)
        fresh = self._local.new_state()
        try:
            dropped = drop_unchanged(parent, fresh, drop)
            if dropped:
                self._local.save(local, fresh)
        finally:
            if local.state_file != fresh.name:
                fresh.unlink(missing_ok=True)

    async def _unsaved(self) -> tuple[list[DiffLine], dict[str, Stat]]:
        """What changed on the root since its session's parent state (none: no session),
        and the records the scan read of what was added or modified."""
        try:
            local = self._local.peek()
            if local is None:
                return [], {}
            parent = self._local.parent_state(local)
            found: dict[str, Stat] = {}
            lines, _ = await asyncio.to_thread(self._scope.report, parent, found)
        except AgentError:  # another studio's session, no parent state or a corrupt one
            return [], {}
        # a directory whose entries changed is modified too, but holds nothing of its own
        lines = [
            x for x in lines if not (x.kind == "modified" and stat.S_ISDIR(found[x.path][MODE]))
        ]
        return lines, found

    async def clear_leftovers(self) -> None:
        """Remove what a killed process of this agent left (its spool files, partial
        blobs, a restore's temporaries in the root).  Only while holding the state
        dir's ``Owner`` lock: it proves that process is dead."""
        try:
            local = self._local.peek()
        except AgentError:
            local = None
        state_file = local.state_file if local is not None else None
        # a restore was killed half-way: what differs on the root is its doing
        self._restore_interrupted = (self.state_dir / RESTORE_MARKER).exists()
        # What the store kept of a killed checkpoint's upload, while its spool file
        # still names it.
        uploads = await asyncio.to_thread(spooled_uploads, self.spool)
        await self.store.clear_leftovers(uploads)
        await asyncio.to_thread(clear_state_dir, self.state_dir, self.spool, state_file)
        await asyncio.to_thread(
            clear_restore_temps, self.root, self.state_dir, self._scope.excluder()
        )

    # -- checkpoints ----------------------------------------------------------------

    async def checkpoint(
        self,
        name: str | None = None,
        state: CheckpointState = CheckpointState.FINALIZED,
        *,
        skip_unchanged: bool = False,
        progress: ProgressFn | None = None,
        changes_since: ChangeSource | None = None,
    ) -> CheckpointResult | None:
        """Write the changes since the parent state as a layer and point ``name`` at it
        (``changes_since``: what changed since then, when a change watch knows)."""
        async with self._lock:
            self._own_dirs()
            return await self._publisher.checkpoint(
                name,
                state,
                skip_unchanged=skip_unchanged,
                progress=progress,
                changes_since=changes_since,
            )

    async def mark(self, state: CheckpointState, name: str | None = None) -> CheckpointInfo:
        """Write this session's checkpoint with the current chain and ``state``, no scan."""
        async with self._lock:
            self._own_dirs()
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
        self._own_dirs()
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
            self._own_dirs()
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
        from agent.session.verify import Verifier, resolve

        if source:
            studio, name = self._starter.split_source(source)
            targets = await resolve(self.store, studio, name)
        else:
            targets = await resolve(self.store, self.studio, None)
            if not every:
                targets = targets[:1]
        verifier = Verifier(self.store, self.spool)
        return await verifier.verify(targets, read_data=read_data, progress=progress)

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
        from agent.session.squash import Squasher

        if checkpoint:
            studio, name = self._starter.split_source(checkpoint)
        else:
            studio, name = self.studio, await self._default_squash_target()
        squasher = Squasher(
            self.settings, self.store, self.spool, self._local, self._manifests, self._locked
        )
        return await squasher.squash(
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
        from agent.session.export import Exporter

        if checkpoint:
            studio, name = self._starter.split_source(checkpoint)
        else:
            listed = await self.list_checkpoints()
            if not listed:
                raise NotFound(f"studio {self.studio} has no checkpoint to export")
            studio, name = self.studio, listed[0].name
        exporter = Exporter(self.settings, self.store, self.spool, self._manifests)
        return await exporter.export(studio, name, directory, base=base, tag=tag, progress=progress)

    # -- what changed ---------------------------------------------------------------

    async def diff(self) -> DiffReport:
        """What changed since the parent state, largest first."""
        local = self._local.current()
        parent = self._local.parent_state(local)
        lines, current = await asyncio.to_thread(self._scope.report, parent)
        return DiffReport(lines, [Skipped(p, r) for p, r in current.skipped])
