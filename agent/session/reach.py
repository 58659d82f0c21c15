"""What a manifest reaches, read generically: any OCI manifest or index.

gc and the catalog's sizes follow every descriptor a manifest holds (its
config, its layers, an index's manifests, a subject), whatever it is a
manifest of, so a squashed checkpoint, or any other shape a later writer
chooses, is covered without a change here.  Manifests are hostile input: one
that is not a JSON object of descriptors is refused whole (``BadManifest``),
never half read, because what it would protect is then unknown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.store.base import Store

# Descriptor fields whose targets are blobs, and those whose targets are
# manifests in turn (followed).
_BLOB_FIELDS = ("config", "layers", "blobs")
_MANIFEST_FIELDS = ("manifests", "subject")
MAX_MANIFEST = 16 << 20


class BadManifest(AgentError):
    """A manifest whose descriptors cannot be read: what it reaches is unknown."""


@dataclass(frozen=True, slots=True)
class Child:
    digest: str
    size: int
    manifest: bool  # followed: a manifest (an index's entry, a subject)


def children(data: bytes) -> list[Child]:
    """Every descriptor of a manifest; ``BadManifest`` unless all are well formed."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise BadManifest(f"not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise BadManifest("not a JSON object")
    out: list[Child] = []
    for field_name in (*_BLOB_FIELDS, *_MANIFEST_FIELDS):
        if field_name not in doc:
            continue
        value = doc[field_name]
        items = value if isinstance(value, list) else [value]
        for d in items:
            out.append(_descriptor(d, field_name, field_name in _MANIFEST_FIELDS))
    return out


def _descriptor(d: Any, field_name: str, manifest: bool) -> Child:
    if not isinstance(d, dict):
        raise BadManifest(f"{field_name}: a descriptor is not an object")
    digest, size = d.get("digest"), d.get("size", 0)
    if not isinstance(digest, str) or not digest:
        raise BadManifest(f"{field_name}: a descriptor has no digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadManifest(f"{field_name}: descriptor {digest} has no valid size")
    return Child(digest, size, manifest)


class ManifestReader:
    """Reads manifests by digest into ``scratch`` and parses their descriptors."""

    def __init__(self, store: Store, scratch: Path) -> None:
        self._store = store
        self._scratch = scratch

    async def read(self, digest: str) -> tuple[int, list[Child]]:
        """The manifest's size and its descriptors.

        Raises ``BlobMissing`` when it is not there, ``BadManifest`` when it
        is there but unreadable as a manifest, or any store error.
        """
        data = await self._store.get_bytes(digest, self._scratch, MAX_MANIFEST)
        try:
            return len(data), children(data)
        except BadManifest as e:
            raise BadManifest(f"manifest {digest} is malformed: {e}") from None
