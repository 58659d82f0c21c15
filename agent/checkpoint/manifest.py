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
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

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
# Bytes of older versions (in lower layers or the image) the layer's changes
# replaced or deleted, as known when it was written: the squash policy's estimate.
A_REPLACED = _A + "replaced-size"
# On a layer that goes on the checkpoint of the layer below it: a large
# checkpoint's layer is cut into segments, each stored as soon as it is complete
# (``layer_writer``), so the squash policy counts them as one.
A_CONTINUES = _A + "continues"

# A manifest is small (a few hundred bytes per layer): anything much bigger is
# not one of ours, and is refused before it is parsed.
MAX_MANIFEST_BYTES = 4 << 20
MAX_LAYERS = 10_000
MAX_BLOB_SIZE = (1 << 63) - 1

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:`` and 64 lowercase hex digits, else ``CorruptLayer``:
    a digest names files and keys, so nothing else may reach a path."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise CorruptLayer(f"not a sha256 digest: {str(digest)[:100]!r}")
    return digest


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
    replaced: int = 0
    continues: bool = False  # a later segment of the checkpoint below

    def to_json(self) -> dict[str, Any]:
        annotations = {A_FILES: str(self.files), A_UNCOMPRESSED: str(self.uncompressed)}
        if self.replaced:
            annotations[A_REPLACED] = str(self.replaced)
        if self.continues:
            annotations[A_CONTINUES] = "true"
        return {
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": self.digest,
            "size": self.size,
            "annotations": annotations,
        }

    @classmethod
    def from_json(cls, d: Any) -> LayerDesc:
        """One descriptor, validated like a manifest's (``CorruptLayer`` if not)."""
        try:
            desc = _Descriptor.model_validate(d)
        except ValidationError as e:
            raise CorruptLayer(f"malformed layer descriptor: {_first_error(e)}") from None
        return _layer_desc(0, desc)


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
        """Parse and validate a stored manifest; anything else is ``CorruptLayer``
        in one line (the manifest's bytes are anyone's with write access to the store)."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptLayer(
                f"malformed checkpoint manifest: {len(data)} bytes, more than {MAX_MANIFEST_BYTES}"
            )
        try:
            doc = _Document.model_validate_json(data)
        except ValidationError as e:
            raise CorruptLayer(f"malformed checkpoint manifest: {_first_error(e)}") from None
        ann = doc.annotations
        try:
            created = datetime.fromisoformat(ann[A_CREATED].replace("Z", "+00:00"))
            return cls(
                studio=ann[A_STUDIO],
                session=ann[A_SESSION],
                state=CheckpointState(ann[A_STATE]),
                created=created,
                layers=tuple(_layer_desc(i, d) for i, d in enumerate(doc.layers)),
            )
        except KeyError as e:
            raise CorruptLayer(f"malformed checkpoint manifest: no annotation {e}") from None
        except ValueError as e:
            raise CorruptLayer(f"malformed checkpoint manifest: {e}") from None


# -- the stored document's schema -------------------------------------------------------


def _valid_digest(d: str) -> str:
    if not _DIGEST.fullmatch(d):
        raise ValueError(f"not a sha256 digest: {d[:100]!r}")
    return d


_Digest = Annotated[str, AfterValidator(_valid_digest)]


# Validators are built when a manifest is first parsed, not at import: a command
# that reads none (a checkpoint with the chain's head cached) does not pay for them.
class _Descriptor(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", defer_build=True)
    mediaType: str = Field(max_length=256)
    digest: _Digest
    size: int = Field(ge=0, le=MAX_BLOB_SIZE)
    annotations: dict[str, str] = Field(default_factory=dict, max_length=64)


class _Document(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", defer_build=True)
    schemaVersion: Literal[2]
    mediaType: Literal["application/vnd.oci.image.manifest.v1+json"]
    artifactType: Literal["application/vnd.studio-agent.checkpoint.v1"]
    config: _Descriptor
    layers: list[_Descriptor] = Field(max_length=MAX_LAYERS)
    annotations: dict[str, str] = Field(max_length=64)


def _first_error(e: ValidationError) -> str:
    """One line: where in the document, and what is wrong (never the input itself)."""
    err = e.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def _layer_desc(index: int, d: _Descriptor) -> LayerDesc:
    if d.mediaType != LAYER_MEDIA_TYPE:
        raise CorruptLayer(f"layer {index + 1}: unsupported layer media type {d.mediaType!r}")
    return LayerDesc(
        digest=d.digest,
        size=d.size,
        files=_count(d.annotations.get(A_FILES, "0"), index, A_FILES),
        uncompressed=_count(d.annotations.get(A_UNCOMPRESSED, "0"), index, A_UNCOMPRESSED),
        replaced=_count(d.annotations.get(A_REPLACED, "0"), index, A_REPLACED),
        continues=_flag(d.annotations.get(A_CONTINUES, "false"), index, A_CONTINUES),
    )


def _flag(value: str, index: int, key: str) -> bool:
    if value not in ("true", "false"):
        raise CorruptLayer(
            f"layer {index + 1}: annotation {key} is not true or false: {value[:40]!r}"
        )
    return value == "true"


def _count(value: str, index: int, key: str) -> int:
    if not value.isdigit() or len(value) > 19:
        raise CorruptLayer(f"layer {index + 1}: annotation {key} is not a count: {value[:40]!r}")
    return int(value)
