"""Writing a checkpoint: the layer, its manifest, then its ref.

Write order makes every checkpoint atomic (restic's data -> index -> snapshot):
the layer blob, then the manifest blob, then the ref (compare-and-swap), then
the local session file and parent state.  A crash or kill at any point leaves
the previous checkpoint listed and restorable; a half-written one is never
listed because nothing names it until its ref is written.  A session stopped
after its ref was written but before it recorded so finds its own manifest at
the ref and carries on from it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from agent.checkpoint.layer_writer import LayerResult
from agent.checkpoint.manifest import CheckpointState, LayerDesc, Manifest
from agent.checkpoint.names import normalize_name
from agent.checkpoint.pipeline import Pass, scan_and_write
from agent.checkpoint.state import StateReader
from agent.errors import AgentError, RefConflict
from agent.log import get_logger
from agent.session.local import LocalSession, LocalState
from agent.session.manifests import Manifests
from agent.session.records import (
    CheckpointInfo,
    CheckpointResult,
    Progress,
    ProgressFn,
    Skipped,
)
from agent.session.scope import Scope, log_skipped
from agent.settings import Settings
from agent.store.base import Store

log = get_logger("session")


class Publisher:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        root: Path,
        spool: Path,
        clock: Callable[[], float],
        local: LocalState,
        scope: Scope,
        manifests: Manifests,
        cancel: threading.Event,
    ) -> None:
        self._settings = settings
        self._studio = settings.studio
        self._store = store
        self._root = root
        self._spool = spool
        self._clock = clock
        self._local = local
        self._scope = scope
        self._manifests = manifests
        self._cancel = cancel

    async def checkpoint(
        self,
        name: str | None,
        state: CheckpointState,
        *,
        skip_unchanged: bool,
        progress: ProgressFn | None,
    ) -> CheckpointResult | None:
        """Write the changes since the parent state as a layer and point ``name`` at it."""
        t0 = time.monotonic()
        local = self._local.current()
        target = normalize_name(name) if name else local.name
        parent = self._local.parent_state(local)
        # The store readies itself (an S3 client takes a while) while the root
        # is walked and the layer compressed, mostly outside the GIL.
        ready = asyncio.ensure_future(self._store.prepare())
        tmp = self._spool / f"layer-{uuid.uuid4().hex}.tmp"
        # The next parent state, written as the walk goes; named by session.json
        # only once the checkpoint is published.
        next_state = self._local.new_state()
        saved = False
        try:
            try:
                try:
                    done = await self._scan_and_write(parent, next_state, tmp, progress)
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
                    await self._upload(tmp, layer, progress)
                    chain.append(
                        LayerDesc(layer.digest, layer.size, layer.entries, layer.uncompressed)
                    )
            finally:
                tmp.unlink(missing_ok=True)
            t_layer = time.monotonic()
            info = await self.publish(local, target, chain, state)
            local.chain = chain
            await asyncio.to_thread(self._local.save, local, next_state)
            saved = True
        finally:
            if not saved:
                next_state.unlink(missing_ok=True)
        duration = time.monotonic() - t0
        log.info(
            "checkpoint.written",
            checkpoint=target,
            state=state.value,
            changed=len(changes),
            layer_size=layer.size if layer else 0,
            size=info.size,
            layers=info.layers,
            seconds=round(duration, 3),
            walk_seconds=round(done.walk_seconds, 3),
            layer_seconds=round(t_layer - t0, 3),
        )
        return CheckpointResult(
            info=info,
            changed=len(changes),
            layer_size=layer.size if layer else 0,
            duration=duration,
            skipped=skipped,
        )

    async def _scan_and_write(
        self, parent: Path, state: Path, tmp: Path, progress: ProgressFn | None
    ) -> Pass:
        """Walk the root against the parent state ``parent``, in one pass writing its
        changes to the spool file ``tmp`` and the next parent state to ``state``."""

        def on_progress(phase: str, done: int, total: int, b_done: int, b_total: int) -> None:
            if progress is not None:
                progress(Progress(phase, b_done, b_total, done, total))

        def run() -> Pass:
            self._spool.mkdir(parents=True, exist_ok=True)
            with StateReader(parent) as previous, open(tmp, "wb") as f:
                done = scan_and_write(
                    self._root,
                    self._scope.excluder(),
                    previous.blocks(),
                    f,
                    state=state,
                    level=self._settings.compression_level,
                    threads=self._settings.compression_threads,
                    progress=on_progress,
                    cancel=self._cancel,
                )
            log_skipped(done.scan)
            return done

        try:
            return await asyncio.to_thread(run)
        except OSError as e:  # the spool's disk is full or read-only
            raise AgentError(f"cannot write the layer to {self._spool}: {e.strerror or e}") from e

    async def _upload(self, tmp: Path, layer: LayerResult, progress: ProgressFn | None) -> None:
        if progress is not None:
            progress(Progress("upload", 0, layer.size, 0, 1))
        await self._store.put_blob(tmp, layer.digest, layer.size)
        if progress is not None:
            progress(Progress("upload", layer.size, layer.size, 1, 1))

    async def mark(self, state: CheckpointState, name: str | None) -> CheckpointInfo:
        """Write this session's checkpoint with the current chain and ``state``, no scan."""
        local = self._local.current()
        target = normalize_name(name) if name else local.name
        info = await self.publish(local, target, list(local.chain), state)
        await asyncio.to_thread(self._local.save, local, None)
        return info

    async def publish(
        self, local: LocalSession, name: str, chain: list[LayerDesc], state: CheckpointState
    ) -> CheckpointInfo:
        """Manifest blob, then the ref: the moment the checkpoint exists."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        created = datetime.fromisoformat(local.created.get(name, now.isoformat()))
        manifest = Manifest(self._studio, local.session, state, created, tuple(chain))
        expect = local.refs.get(name)
        try:
            info = await self._manifests.write(self._studio, name, manifest, expect)
        except RefConflict:
            current = await self._store.get_ref(self._studio, name)
            if current is None or not await self._manifests.written_by(
                current.digest, local.session
            ):
                if expect is None:
                    raise RefConflict(
                        f"checkpoint {name!r} already exists in studio {self._studio}; "
                        "names are unique per studio"
                    ) from None
                raise
            # We wrote it but were stopped before recording so: carry on from it.
            info = await self._manifests.write(self._studio, name, manifest, current.digest)
        local.refs[name] = info.digest
        local.created.setdefault(name, created.isoformat())
        return info
