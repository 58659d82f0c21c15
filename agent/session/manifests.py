"""A checkpoint's manifest read through its ref, or written and then pointed at."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from agent.checkpoint.manifest import Manifest
from agent.errors import AgentError, NotFound
from agent.faults import crash_point
from agent.session.records import CheckpointInfo, info_of
from agent.store.base import RefValue, Store


class Manifests:
    def __init__(self, store: Store, spool: Path, clock: Callable[[], float]) -> None:
        self._store = store
        self._spool = spool
        self._clock = clock

    async def read(self, digest: str) -> Manifest:
        return Manifest.decode(await self._store.get_bytes(digest, self._spool))

    async def resolve(self, studio: str, name: str) -> tuple[CheckpointInfo, Manifest]:
        ref = await self._store.get_ref(studio, name)
        if ref is None:
            raise NotFound(f"no checkpoint {name!r} in studio {studio}")
        manifest = await self.read(ref.digest)
        return info_of(studio, name, ref, manifest), manifest

    async def written_by(self, digest: str, session: str) -> bool:
        """Whether the manifest ``digest`` is readable and of ``session``."""
        try:
            return (await self.read(digest)).session == session
        except AgentError:
            return False

    async def write(
        self, studio: str, name: str, manifest: Manifest, expect: str | None
    ) -> CheckpointInfo:
        """The manifest blob, then the ref (compare-and-swap from ``expect``)."""
        data, digest = manifest.encode()
        await self._store.put_bytes(data, digest, self._spool)
        crash_point("manifest")
        await self._store.set_ref(studio, name, digest, expect)
        updated = datetime.fromtimestamp(self._clock(), UTC)
        return info_of(studio, name, RefValue(digest, updated), manifest)
