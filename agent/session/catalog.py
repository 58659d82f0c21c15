"""A studio's checkpoints as a catalog: listing and renaming them.

Operations on checkpoints as stored, whichever session wrote them; when this
machine's session wrote one, its local record follows the change.
"""

from __future__ import annotations

import asyncio

from agent.checkpoint.names import normalize_name
from agent.errors import BlobMissing, CorruptLayer, DigestMismatch, NotFound, RefConflict
from agent.log import get_logger
from agent.session.local import LocalState
from agent.session.manifests import Manifests
from agent.session.records import CheckpointInfo, info_of
from agent.store.base import RefValue, Store

log = get_logger("session")


class Catalog:
    def __init__(self, studio: str, store: Store, local: LocalState, manifests: Manifests) -> None:
        self._studio = studio
        self._store = store
        self._local = local
        self._manifests = manifests

    async def list_checkpoints(self) -> list[CheckpointInfo]:
        """This studio's checkpoints, most recently updated first."""
        refs = await self._store.list_refs(self._studio)

        async def one(name: str, ref: RefValue) -> CheckpointInfo | None:
            try:
                return info_of(self._studio, name, ref, await self._manifests.read(ref.digest))
            except (BlobMissing, DigestMismatch, CorruptLayer) as e:
                log.warning("checkpoint.unreadable", checkpoint=name, error=str(e))
                return None

        infos = await asyncio.gather(*(one(n, r) for n, r in refs.items()))
        out = [i for i in infos if i is not None]
        out.sort(key=lambda i: i.updated, reverse=True)
        return out

    async def rename(self, old: str, new: str) -> CheckpointInfo:
        """Point ``new`` at ``old``'s manifest, then remove ``old`` (both by
        compare-and-swap: a name taken meanwhile is a conflict)."""
        old_n, new_n = normalize_name(old), normalize_name(new)
        studio = self._studio
        ref = await self._store.get_ref(studio, old_n)
        if ref is None:
            raise NotFound(f"no checkpoint {old_n!r} in studio {studio}")
        if old_n == new_n:
            return info_of(studio, old_n, ref, await self._manifests.read(ref.digest))
        try:
            await self._store.set_ref(studio, new_n, ref.digest, None)
        except RefConflict:
            raise RefConflict(f"checkpoint {new_n!r} already exists in studio {studio}") from None
        await self._store.delete_ref(studio, old_n, ref.digest)
        local = self._local.peek()
        if local is not None and old_n in local.refs:
            local.refs[new_n] = local.refs.pop(old_n)
            if old_n in local.created:
                local.created[new_n] = local.created.pop(old_n)
            if local.name == old_n:
                local.name = new_n
            await asyncio.to_thread(self._local.save, local, None)
        manifest = await self._manifests.read(ref.digest)
        new_ref = await self._store.get_ref(studio, new_n)
        return info_of(studio, new_n, new_ref or ref, manifest)
