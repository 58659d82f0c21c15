"""Starting a session: choose the checkpoint to start from, restore it, begin.

Without a named source the most recently updated valid checkpoint is restored.
One its session never finalized (force stop, OOM, spot reclamation) is fetched
and verified whole before anything is applied; if it is not sound it is marked
invalid and the next one is tried.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from agent.checkpoint.manifest import CheckpointState, LayerDesc, Manifest
from agent.checkpoint.names import auto_name, normalize_name
from agent.checkpoint.restore import LayerFile, RestoreStats, apply_layers
from agent.errors import AgentError, BlobMissing, CorruptLayer, DigestMismatch, NotFound
from agent.log import get_logger
from agent.session.local import LocalSession, LocalState
from agent.session.manifests import Manifests
from agent.session.records import (
    CheckpointInfo,
    Progress,
    ProgressFn,
    StartOutcome,
    info_of,
)
from agent.session.scope import Scope
from agent.store.base import Store
from agent.store.fetch import Fetch

log = get_logger("session")


class Starter:
    def __init__(
        self,
        studio: str,
        store: Store,
        root: Path,
        spool: Path,
        clock: Callable[[], float],
        local: LocalState,
        scope: Scope,
        manifests: Manifests,
    ) -> None:
        self._studio = studio
        self._store = store
        self._root = root
        self._spool = spool
        self._clock = clock
        self._local = local
        self._scope = scope
        self._manifests = manifests

    async def begin(self, chain: list[LayerDesc]) -> None:
        """A new session on the root as it is now, carrying on from ``chain``."""
        started = int(self._clock())
        # Two sessions started within one second would share a name: take the next free one.
        while await self._store.get_ref(self._studio, auto_name(self._studio, started)) is not None:
            started += 1
        local = LocalSession(
            studio=self._studio,
            session=uuid.uuid4().hex,
            started=started,
            name=auto_name(self._studio, started),
            chain=chain,
        )
        # The state dir first: its parents must not show up as the session's changes.
        self._local.state_dir.mkdir(parents=True, exist_ok=True)
        state = self._local.new_state()
        result = await asyncio.to_thread(self._scope.write_state, state)
        await asyncio.to_thread(self._local.save, local, state)
        log.info(
            "session.begin",
            session=local.session,
            checkpoint=local.name,
            layers=len(chain),
            entries=result.count,
        )

    async def start(
        self, restore_from: str, progress: ProgressFn | None, *, required: bool
    ) -> StartOutcome:
        t0 = time.monotonic()
        invalidated: list[CheckpointInfo] = []
        restored: CheckpointInfo | None = None
        stats: RestoreStats | None = None
        chain: list[LayerDesc] = []
        if restore_from:
            studio, name = self.split_source(restore_from)
            restored, manifest = await self._manifests.resolve(studio, name)
            if manifest.state is CheckpointState.INVALID:
                raise AgentError(f"checkpoint {studio}/{name} is marked invalid")
            unfinished = manifest.state is not CheckpointState.FINALIZED
            stats = await self.restore(manifest, progress, verify_first=unfinished)
            chain = list(manifest.layers)
        else:
            found = await self._restore_latest(progress, invalidated)
            if found is not None:
                restored, manifest, stats = found
                chain = list(manifest.layers)
            elif required:
                raise NotFound(f"studio {self._studio} has no valid checkpoint to restore")
        t_restore = time.monotonic()
        await self.begin(chain)
        if restored is not None:
            log.info(
                "restore.done",
                checkpoint=f"{restored.studio}/{restored.name}",
                layers=restored.layers,
                files=stats.files if stats else 0,
                restore_seconds=round(t_restore - t0, 3),
                baseline_seconds=round(time.monotonic() - t_restore, 3),
            )
        return StartOutcome(restored=restored, invalidated=invalidated, stats=stats)

    def split_source(self, source: str) -> tuple[str, str]:
        """``NAME`` (of this studio) or ``STUDIO/NAME``."""
        studio, slash, name = source.partition("/")
        if not slash:
            return self._studio, normalize_name(source)
        if not studio or "/" in name:
            raise AgentError(f"invalid checkpoint reference {source!r}: use NAME or STUDIO/NAME")
        return studio, normalize_name(name)

    async def _restore_latest(
        self, progress: ProgressFn | None, invalidated: list[CheckpointInfo]
    ) -> tuple[CheckpointInfo, Manifest, RestoreStats] | None:
        refs = await self._store.list_refs(self._studio)
        for name, ref in sorted(refs.items(), key=lambda kv: kv[1].updated, reverse=True):
            try:
                manifest = await self._manifests.read(ref.digest)
            except (BlobMissing, DigestMismatch, CorruptLayer) as e:
                log.warning("restore.manifest_unusable", checkpoint=name, error=str(e))
                continue
            info = info_of(self._studio, name, ref, manifest)
            if manifest.state is CheckpointState.INVALID:
                continue
            unfinished = manifest.state is not CheckpointState.FINALIZED
            try:
                stats = await self.restore(manifest, progress, verify_first=unfinished)
            except (BlobMissing, DigestMismatch) as e:
                if not unfinished:
                    raise
                # Left by a session that never finalized (force stop, OOM, spot
                # reclamation) and not sound: mark it, fall back to the next one.
                log.warning("restore.invalid", checkpoint=name, error=str(e))
                bad = await self._manifests.write(
                    self._studio, name, manifest.with_state(CheckpointState.INVALID), ref.digest
                )
                invalidated.append(bad)
                continue
            return info, manifest, stats
        return None

    async def restore(
        self, manifest: Manifest, progress: ProgressFn | None, *, verify_first: bool
    ) -> RestoreStats:
        """Fetch the chain (the store's ``Fetch``) and apply each layer as it arrives.

        With ``verify_first`` (for a checkpoint its session never finalized)
        every blob is fetched and verified before the first byte is applied, so
        an unsound chain is refused without touching the root; otherwise each
        layer is hashed while it is applied and a mismatch fails the restore.
        """
        layers = list(manifest.layers)
        if not layers:
            return RestoreStats()

        def on_fetched(done: int, total: int) -> None:
            if progress is not None:
                progress(Progress("download", done, total, 0, 0))

        blobs = [(layer.digest, layer.size) for layer in layers]
        async with Fetch(
            self._store, blobs, self._spool, verify=verify_first, progress=on_fetched
        ) as fetch:
            if verify_first:
                await fetch.wait()

            def get(index: int) -> LayerFile:
                # Applied as it arrives; unless verified already, hashed as it is read.
                layer = layers[index]
                expect = None if verify_first else layer.digest
                path = fetch.complete(index)
                if path is not None:
                    return LayerFile(path, expect, layer.size)
                return LayerFile(digest=expect, size=layer.size, opener=fetch.opener(index))

            def on_apply(done: int, total: int, b_done: int, b_total: int) -> None:
                if progress is not None:
                    progress(Progress("apply", b_done, b_total, done, total))

            totals = (sum(x.files for x in layers), sum(x.uncompressed for x in layers))
            return await asyncio.to_thread(
                apply_layers, self._root, len(layers), get, totals=totals, progress=on_apply
            )
