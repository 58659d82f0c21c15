"""A checkpoint's manifest read through its ref, or written and then pointed at.

Write order: the blobs a manifest names (the layers, written before; the config
here), then the manifest, then the ref, so every blob a listed checkpoint names
is in the store.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from agent.checkpoint.manifest import EMPTY_CONFIG, EMPTY_DIGEST, Manifest
from agent.errors import AgentError, CorruptLayer, NotFound
from agent.faults import crash_point
from agent.session.records import CheckpointInfo, info_of
from agent.store.base import RefValue, Store


class Manifests:
    def __init__(self, store: Store, spool: Path, clock: Callable[[], float]) -> None:
        self._store = store
        self._spool = spool
        self._clock = clock
        self._config_written = False

    async def read(self, digest: str) -> Manifest:
        """The manifest, verified; one that is not a checkpoint manifest, whatever
        its shape, raises ``CorruptLayer`` (it is input, not our own memory)."""
        data = await self._store.get_bytes(digest, self._spool)
        try:
            return Manifest.decode(data)
        except (AttributeError, RecursionError) as e:  # shapes decode does not expect
            raise CorruptLayer(f"malformed checkpoint manifest {digest}: {e}") from e

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
        """The config blob, the manifest blob, then the ref (compare-and-swap from ``expect``)."""
        data, digest = manifest.encode()
        if not self._config_written:  # content-addressed: once is enough for every manifest
            await self._store.put_bytes(EMPTY_CONFIG, EMPTY_DIGEST, self._spool)
            self._config_written = True
        await self._store.put_bytes(data, digest, self._spool)
        crash_point("manifest")
        await self._store.set_ref(studio, name, digest, expect)
        updated = datetime.fromtimestamp(self._clock(), UTC)
        return info_of(studio, name, RefValue(digest, updated), manifest)
