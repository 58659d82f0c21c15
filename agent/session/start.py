"""Starting a session: choose the checkpoint to start from, restore it, begin.

Without a named source the most recently updated valid checkpoint is restored.
One its session never finalized (force stop, OOM, spot reclamation) is checked
first (verify.py: every blob there, with its size), then fetched and verified
whole before anything is applied; if it is not sound it is marked invalid and
the next one is tried.

The session lease names the checkpoint's manifest before its blobs are
fetched, so deleting that checkpoint (or the other studio's it was cloned
from) while the session runs never lets gc take the chain; a blob collected
before the lease stood fails the restore, which reads every one.
Every layer is verified before its first byte is applied, so a corrupt layer
never changes the root.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.checkpoint.manifest import CheckpointState, LayerDesc, Manifest
from agent.checkpoint.names import auto_name
from agent.checkpoint.state import check_state
from agent.checkpoint.writers import WritePolicy
from agent.errors import AgentError, BlobMissing, CorruptLayer, DigestMismatch, NotFound
from agent.log import get_logger
from agent.session.catalog import split_source
from agent.session.local import LocalSession
from agent.session.parts import Parts
from agent.session.records import (
    CheckpointInfo,
    Progress,
    ProgressFn,
    StartOutcome,
    info_of,
)
from agent.statedir import ensure_private_dir, protected_paths

# The restore engine, the verifier and the fetch load with the first restore: a
# baseline, which begins a session too, needs none of them.
if TYPE_CHECKING:
    from agent.checkpoint.restore import RestoreStats

log = get_logger("session")

# Awaited between the restore and the walk that records the root as the new
# session's parent state: a change watch made ready there leaves the first period
# after the start sound, so the first checkpoint need not walk again.
BeforeWalk = Callable[[], Awaitable[None]]


class Starter:
    def __init__(self, parts: Parts) -> None:
        self._lease = parts.lease
        self._studio = parts.settings.studio
        self._writing = WritePolicy(workers=parts.settings.restore_writers)
        self._store = parts.store
        self._root = parts.root
        self._spool = parts.spool
        self._clock = parts.clock
        self._local = parts.local
        self._scope = parts.scope
        self._manifests = parts.manifests

    async def begin(
        self,
        chain: list[LayerDesc],
        parent: Path | None = None,
        store: str = "",
        before_walk: BeforeWalk | None = None,
    ) -> None:
        """A new session carrying on from ``chain``, on the root as it is now or, with
        ``parent``, as that parent state file records it (what differs is unsaved work).
        ``before_walk`` is awaited just before the root is walked for its state.

        The automatic name is only a first choice: two sessions started within
        one second share it, and the first write of each decides (publish.py).
        """
        started = int(self._clock())
        local = LocalSession(
            studio=self._studio,
            session=uuid.uuid4().hex,
            started=started,
            name=auto_name(self._studio, started),
            chain=chain,
            store=store or self._store.url,
        )
        # The state dir first: its parents must not show up as the session's changes.
        ensure_private_dir(self._local.state_dir, self._root)
        entries: int | None = None  # a parent state carried on from was counted before
        if parent is None:
            if before_walk is not None:
                await before_walk()
            parent = self._local.new_state()
            entries = (await asyncio.to_thread(self._scope.write_state, parent)).count
        await asyncio.to_thread(self._local.save, local, parent)
        # The restored manifest (if any) stays the head; the lease now says whose.
        head = self._lease.manifests if chain else []
        await self._lease.hold(head, session=local.session, fence=False)
        log.info(
            "session.begin",
            session=local.session,
            checkpoint=local.name,
            layers=len(chain),
            entries=entries,
        )

    async def resume(self) -> LocalSession | None:
        """Begin a new session where the earlier one on this root left off, if there is one.

        A daemon killed and started again on the same root (a container restarted
        in place) finds the root as the earlier session left it, with work written
        after its last checkpoint: restoring would overwrite that, and a fresh
        parent state would count it as saved.  The new session takes the earlier
        one's chain and parent state instead, so its first checkpoint holds the work.
        """
        try:
            earlier = self._local.peek()
            if earlier is None:
                return None
            parent = self._local.parent_state(earlier)
            await asyncio.to_thread(check_state, parent)
        except AgentError as e:  # unreadable, another studio's, no parent state
            log.warning("session.not_resumed", reason=str(e))
            return None
        # (a chain in another store than this one's is seen to by the first checkpoint)
        await self.begin(list(earlier.chain), parent, earlier.store)
        log.info("session.resumed", earlier=earlier.session, layers=len(earlier.chain))
        return earlier

    async def start(
        self,
        restore_from: str,
        progress: ProgressFn | None,
        *,
        required: bool,
        before_walk: BeforeWalk | None = None,
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
            await self._lease.hold([restored.digest])
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
        await self.begin(chain, before_walk=before_walk)
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
        return split_source(self._studio, source)

    async def _restore_latest(
        self, progress: ProgressFn | None, invalidated: list[CheckpointInfo]
    ) -> tuple[CheckpointInfo, Manifest, RestoreStats] | None:
        from agent.session.verify import Verifier

        verifier = Verifier(self._store, self._spool)
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
            invalid = manifest.with_state(CheckpointState.INVALID)
            await self._lease.hold([ref.digest], [invalid.encode()[1]])
            unfinished = manifest.state is not CheckpointState.FINALIZED
            # Left by a session that never finalized (force stop, OOM, spot
            # reclamation): checked before use; if unsound, marked invalid and
            # passed over for the next one.
            why = await verifier.unsound(self._studio, name, ref.digest) if unfinished else ""
            if not why:
                try:
                    stats = await self.restore(manifest, progress, verify_first=unfinished)
                    return info, manifest, stats
                except (BlobMissing, DigestMismatch) as e:
                    if not unfinished:
                        raise
                    why = str(e)
            log.warning("restore.invalid", checkpoint=name, error=why)
            bad = await self._manifests.write(self._studio, name, invalid, ref.digest)
            invalidated.append(bad)
        return None

    async def restore(
        self, manifest: Manifest, progress: ProgressFn | None, *, verify_first: bool
    ) -> RestoreStats:
        """Fetch the chain (the store's ``Fetch``) and apply each layer once verified.

        With ``verify_first`` (for a checkpoint its session never finalized)
        every blob is fetched and verified before the first byte is applied, so
        an unsound chain is refused without touching the root; otherwise each
        layer is applied as soon as it is verified, newest first, while the
        older ones still download.
        """
        from agent.checkpoint.merge import read_order
        from agent.checkpoint.restore import LayerFile, RestoreStats, apply_layers
        from agent.store.fetch import Fetch

        layers = list(manifest.layers)
        if not layers:
            return RestoreStats()

        def on_fetched(done: int, total: int) -> None:
            if progress is not None:
                progress(Progress("download", done, total, 0, 0))

        blobs = [(layer.digest, layer.size) for layer in layers]
        continues = [layer.continues for layer in layers]
        order = read_order(len(layers), continues)
        ensure_private_dir(self._spool, self._root)
        async with Fetch(
            self._store, blobs, self._spool, progress=on_fetched, order=order
        ) as fetch:
            if verify_first:
                await fetch.wait()

            def get(index: int) -> LayerFile:
                # Verified whole before its first byte is applied.
                return LayerFile(fetch.wait_complete(index), size=layers[index].size)

            def on_apply(done: int, total: int, b_done: int, b_total: int) -> None:
                if progress is not None:
                    progress(Progress("apply", b_done, b_total, done, total))

            totals = (sum(x.files for x in layers), sum(x.uncompressed for x in layers))
            return await asyncio.to_thread(
                apply_layers,
                self._root,
                len(layers),
                get,
                totals=totals,
                progress=on_apply,
                protected=protected_paths(self._root, self._scope.own_paths()),
                writing=self._writing,
                continues=continues,
            )
