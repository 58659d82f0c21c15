"""A studio's checkpoints as a catalog: listing, renaming and deleting them.

Operations on checkpoints as stored, whichever session wrote them; when this
machine's session wrote one, its local record follows the change.  Deleting
removes refs only (by compare-and-swap); blobs go only through gc, once
nothing reaches them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from agent.checkpoint.names import normalize_name
from agent.errors import (
    AgentError,
    BlobMissing,
    CorruptLayer,
    DigestMismatch,
    NotFound,
    RefConflict,
)
from agent.log import get_logger
from agent.session.local import LocalState
from agent.session.manifests import Manifests
from agent.session.records import CheckpointInfo, StudioDeletion, info_of
from agent.session.sizes import Sizes
from agent.store.base import RefValue, Store

log = get_logger("session")


def split_source(studio: str, source: str) -> tuple[str, str]:
    """``NAME`` (of ``studio``) or ``STUDIO/NAME``."""
    other, slash, name = source.partition("/")
    if not slash:
        return studio, normalize_name(source)
    if not other or "/" in name:
        raise AgentError(f"invalid checkpoint reference {source!r}: use NAME or STUDIO/NAME")
    return other, normalize_name(name)


class Catalog:
    def __init__(
        self, studio: str, store: Store, local: LocalState, manifests: Manifests, spool: Path
    ) -> None:
        self._studio = studio
        self._store = store
        self._local = local
        self._manifests = manifests
        self._spool = spool

    async def list_checkpoints(self, *, sizes: bool = False) -> list[CheckpointInfo]:
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
        if sizes:
            frees = await Sizes(self._store, self._spool).frees(
                self._studio, {i.name: i.digest for i in out}
            )
            out = [dataclasses.replace(i, frees=frees.get(i.name, 0)) for i in out]
        return out

    async def delete(self, source: str) -> CheckpointInfo | None:
        """Remove one ref, if it still points where it did when read; return the
        checkpoint as it was (None when its manifest could not be read)."""
        studio, name = split_source(self._studio, source)
        ref = await self._store.get_ref(studio, name)
        if ref is None:
            raise NotFound(f"no checkpoint {name!r} in studio {studio}")
        try:
            await self._store.delete_ref(studio, name, ref.digest)
        except RefConflict:
            raise RefConflict(
                f"checkpoint {studio}/{name} was written again while being deleted; "
                "it is kept: list the checkpoints and delete it again if you mean to"
            ) from None
        await self._forget(studio, [name])
        try:
            return info_of(studio, name, ref, await self._manifests.read(ref.digest))
        except AgentError:
            return None

    async def delete_studio(self, studio: str) -> StudioDeletion:
        """Remove every ref of a studio (each by compare-and-swap)."""
        names = await self._store.list_ref_names(studio)
        if not names:
            raise NotFound(f"studio {studio} has no checkpoints")

        async def one(name: str) -> str | None:
            """None when deleted, else why not."""
            try:
                ref = await self._store.get_ref(studio, name)
                if ref is not None:
                    await self._store.delete_ref(studio, name, ref.digest)
            except AgentError as e:
                return f"{studio}/{name}: {e}"
            return None

        results = await asyncio.gather(*(one(n) for n in names))
        deleted = [n for n, why in zip(names, results, strict=True) if why is None]
        await self._forget(studio, deleted)
        return StudioDeletion(studio, deleted, [why for why in results if why is not None])

    async def _forget(self, studio: str, names: list[str]) -> None:
        """This machine's session no longer owns refs that were deleted: its next
        checkpoint writes its own anew."""
        local = self._local.peek() if studio == self._studio else None
        if local is None or not any(n in local.refs for n in names):
            return
        for n in names:
            local.refs.pop(n, None)
            local.created.pop(n, None)
        await asyncio.to_thread(self._local.save, local, None)

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
