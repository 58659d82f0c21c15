"""The ref document: which manifest a checkpoint name points at, and since when."""

from __future__ import annotations

import json
from datetime import datetime

from agent.errors import InvalidName, StoreError
from agent.store.base import RefValue


class InvalidRef(StoreError):
    """An object under refs/ that is not a ref document: what it protects is unknown."""


def encode_ref(value: RefValue) -> bytes:
    return json.dumps({"digest": value.digest, "updated": value.updated.isoformat()}).encode()


def decode_ref(data: bytes) -> RefValue:
    doc = json.loads(data)
    return RefValue(digest=str(doc["digest"]), updated=datetime.fromisoformat(doc["updated"]))


def ref_path_parts(studio: str, name: str) -> tuple[str, str]:
    """Refuse studio ids and names that could leave the refs directory."""
    for what, value in (("studio id", studio), ("checkpoint name", name)):
        if not value or value in (".", "..") or "/" in value or "\0" in value:
            raise InvalidName(f"invalid {what}: {value!r}")
    return studio, name
