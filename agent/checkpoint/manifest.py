"""Checkpoint manifests: OCI image manifests listing a chain of layers.

A checkpoint is an OCI manifest (``artifactType`` marks it as a checkpoint)
whose layers are the session changes, oldest first, and whose annotations say
which studio and session wrote it, when, and in what state.  The config is the
OCI empty descriptor: a checkpoint is the upper part of an image, exported by
stacking it on the base image's layers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from agent.errors import CorruptLayer

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"
ARTIFACT_TYPE = "application/vnd.studio-agent.checkpoint.v1"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest()

_A = "io.studio-agent."
A_STUDIO = _A + "studio"
A_SESSION = _A + "session"
A_STATE = _A + "state"
A_CREATED = "org.opencontainers.image.created"
A_FILES = _A + "files"
A_UNCOMPRESSED = _A + "uncompressed-size"


class CheckpointState(StrEnum):
    EMPTY = "empty"
    INTERIM = "interim"
    FINALIZED = "finalized"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class LayerDesc:
    digest: str
    size: int
    files: int = 0
    uncompressed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": self.digest,
            "size": self.size,
            "annotations": {A_FILES: str(self.files), A_UNCOMPRESSED: str(self.uncompressed)},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerDesc:
        ann = d.get("annotations") or {}
        if d.get("mediaType") != LAYER_MEDIA_TYPE:
            raise CorruptLayer(f"unsupported layer media type {d.get('mediaType')!r}")
        return cls(
            digest=str(d["digest"]),
            size=int(d["size"]),
            files=int(ann.get(A_FILES, 0)),
            uncompressed=int(ann.get(A_UNCOMPRESSED, 0)),
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    studio: str
    session: str
    state: CheckpointState
    created: datetime
    layers: tuple[LayerDesc, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def with_state(self, state: CheckpointState) -> Manifest:
        return Manifest(self.studio, self.session, state, self.created, self.layers)

    def encode(self) -> tuple[bytes, str]:
        """Canonical JSON bytes and their digest."""
        doc = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": 2},
            "layers": [layer.to_json() for layer in self.layers],
            "annotations": {
                A_STUDIO: self.studio,
                A_SESSION: self.session,
                A_STATE: self.state.value,
                A_CREATED: self.created.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            },
        }
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return data, "sha256:" + hashlib.sha256(data).hexdigest()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
            if (
                doc.get("mediaType") != MANIFEST_MEDIA_TYPE
                or doc.get("artifactType") != ARTIFACT_TYPE
            ):
                raise CorruptLayer("not a checkpoint manifest")
            ann = doc["annotations"]
            created = datetime.fromisoformat(ann[A_CREATED].replace("Z", "+00:00"))
            return cls(
                studio=str(ann[A_STUDIO]),
                session=str(ann[A_SESSION]),
                state=CheckpointState(ann[A_STATE]),
                created=created,
                layers=tuple(LayerDesc.from_json(d) for d in doc["layers"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptLayer(f"malformed checkpoint manifest: {e}") from e
