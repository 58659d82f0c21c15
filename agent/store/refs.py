"""The ref document: which manifest a checkpoint name points at, and since when.

Refs live where other studios, other agents and anyone with the work
directory's credentials can write, so a ref is decoded by one schema, with a
bounded size, before any value of it is used: whatever the bytes, the answer is
a ``RefValue`` or ``InvalidRef``, never a ``KeyError`` or a naive time that
breaks sorting later.  A listing skips (and logs) a bad ref instead of failing,
so one bad ref can't make every restore of its studio fail.
"""

from __future__ import annotations

import json
from datetime import UTC

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from agent.errors import InvalidName, InvalidRef
from agent.log import get_logger
from agent.store.base import RefValue

__all__ = ["InvalidRef", "decode_ref", "encode_ref", "ref_path_parts", "skip_invalid"]

log = get_logger("store")

# A ref is about 110 bytes; anything much larger is not one (and is not parsed).
MAX_REF_BYTES = 4096


class _RefDoc(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    updated: AwareDatetime


def encode_ref(value: RefValue) -> bytes:
    return json.dumps({"digest": value.digest, "updated": value.updated.isoformat()}).encode()


def decode_ref(data: bytes, what: str = "the ref") -> RefValue:
    """The ref in ``data``; anything else is ``InvalidRef``, its message naming
    ``what`` (which ref, and where it lies) and the first thing wrong."""
    if len(data) > MAX_REF_BYTES:
        reason = f"{len(data)} bytes, more than a ref's {MAX_REF_BYTES}"
    else:
        try:
            doc = _RefDoc.model_validate_json(data)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            reason = f"{field + ': ' if field else ''}{first['msg']}"
        else:
            return RefValue(digest=doc.digest, updated=doc.updated.astimezone(UTC))
    raise InvalidRef(f"{what} is not a valid ref: {reason}")


def skip_invalid(error: InvalidRef | OSError, what: str) -> None:
    """A listing passes over a ref it can't use, and says so."""
    log.warning("ref.skipped", ref=what, error=str(error))


def ref_path_parts(studio: str, name: str) -> tuple[str, str]:
    """Refuse studio ids and names that could leave the refs directory."""
    for what, value in (("studio id", studio), ("checkpoint name", name)):
        if not value or value in (".", "..") or "/" in value or "\0" in value:
            raise InvalidName(f"invalid {what}: {value!r}")
    return studio, name
