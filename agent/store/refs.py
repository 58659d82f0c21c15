"""The ref document: which manifest a checkpoint name points at, and since when."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from agent.errors import InvalidName, InvalidRef
from agent.store.base import RefValue

__all__ = ["InvalidRef", "decode_ref", "encode_ref", "ref_path_parts"]


def encode_ref(value: RefValue) -> bytes:
    return json.dumps({"digest": value.digest, "updated": value.updated.isoformat()}).encode()


def decode_ref(data: bytes) -> RefValue:
    """A ref document; anything else (a ref is hostile input) raises ``ValueError``."""
    try:
        doc = json.loads(data)
        digest, updated = doc["digest"], datetime.fromisoformat(doc["updated"])
        if not isinstance(digest, str):
            raise TypeError(f"digest is {type(digest).__name__}, not a string")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"not a ref document ({e})") from e
    # A time without a zone would not compare with the others: take it as UTC.
    return RefValue(digest, updated if updated.tzinfo else updated.replace(tzinfo=UTC))


def ref_path_parts(studio: str, name: str) -> tuple[str, str]:
    """Refuse studio ids and names that could leave the refs directory."""
    for what, value in (("studio id", studio), ("checkpoint name", name)):
        if not value or value in (".", "..") or "/" in value or "\0" in value:
            raise InvalidName(f"invalid {what}: {value!r}")
    return studio, name
