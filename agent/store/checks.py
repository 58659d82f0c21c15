"""The checks both stores make before they trust a blob's bytes or replace a ref.

One definition each, so a local and an S3 workdir refuse the same things with
the same words.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from agent.errors import DigestMismatch, InvalidName, RefConflict
from agent.store.base import RefValue

# Bytes read from disk per step when hashing: what one check holds in memory.
CHUNK = 1 << 20


def hex_of(digest: str) -> str:
    """The hex part of a sha256 digest; anything else is refused, as it could
    name a path or key outside the blobs."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise DigestMismatch(f"not a sha256 digest: {digest!r}")
    return hexpart


def check_size(digest: str, found: int, size: int | None, where: str = "") -> None:
    """Raise DigestMismatch when ``size`` is known and ``found`` is not it."""
    if size is not None and found != size:
        raise DigestMismatch(f"blob {digest}{where} has {found} bytes, expected {size}")


def check_hash(hasher: hashlib._Hash, digest: str, where: str = "") -> None:
    """Raise DigestMismatch unless the bytes fed to ``hasher`` hash to ``digest``."""
    if "sha256:" + hasher.hexdigest() != digest:
        raise DigestMismatch(
            f"blob {digest}{where} is corrupt: its bytes hash to sha256:{hasher.hexdigest()}"
        )


def verify_file(path: Path, digest: str, size: int | None) -> None:
    """Raise DigestMismatch unless the file's bytes hash to ``digest``."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    check_size(digest, n, size)
    check_hash(h, digest)


def check_expect(
    studio: str, name: str, current: RefValue | None, expect: str | None, *, force: bool = False
) -> None:
    """Raise RefConflict unless the ref points at ``expect`` (``None``: does not exist).

    ``force`` raises regardless: the caller already knows it lost and wants the
    message to name the winner's value.
    """
    have = current.digest if current else None
    if force or have != expect:
        raise RefConflict(
            f"checkpoint {studio}/{name} was changed by another writer "
            f"(it points at {have or 'nothing'}, expected {expect or 'nothing'})"
        )


def lease_parts(name: str) -> list[str]:
    """The path parts of a lease name; refused when one could leave the leases."""
    parts = name.split("/")
    for part in parts:
        if not part or part in (".", "..") or part.startswith(".") or "\0" in part:
            raise InvalidName(f"invalid lease name: {name!r}")
    return parts


def lease_tag(body: bytes) -> str:
    """A local lease's tag: its bytes' hash (a lease body is unique to one write)."""
    return hashlib.sha256(body).hexdigest()


def is_blob_name(name: str) -> bool:
    """Whether a listed name is a blob's (64 hex digits): anything else under the
    blobs is not ours to judge, and never deleted."""
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _hex32(part: str) -> bool:
    return len(part) == 32 and all(c in "0123456789abcdef" for c in part)


def check_upload(upload: str) -> str:
    """An upload name, ``<owner>/<id>`` of 32 hex digits each (see ``Store.open_blob``);
    anything else is refused, as it could name a key outside the uploads."""
    owner, _, ident = upload.partition("/")
    if not (_hex32(owner) and _hex32(ident)):
        raise InvalidName(f"invalid upload name: {upload!r}")
    return upload
