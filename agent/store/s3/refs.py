"""Refs in a bucket, replaced only by compare-and-swap.

Refs are written with S3 conditional writes (``If-None-Match: *`` to create,
``If-Match: <etag>`` to update or delete), so two writers of one studio cannot
overwrite each other: the loser gets ``RefConflict``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from agent.store.base import RefValue
from agent.store.checks import check_expect
from agent.store.refs import InvalidRef, decode_ref, encode_ref, ref_path_parts, skip_invalid
from agent.store.s3.client import Connection
from agent.store.s3.errors import Missing, PreconditionFailed
from agent.store.s3.listing import Listing

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


@dataclass(frozen=True, slots=True)
class _Ref:
    value: RefValue
    etag: str
    raw: bytes


class Refs:
    """The refs under ``<root>/refs``: ``<studio>/<name>``, one small JSON object each."""

    def __init__(self, conn: Connection, root: str, listing: Listing) -> None:
        self._conn = conn
        self._root = root
        self._listing = listing

    def key(self, studio: str, name: str) -> str:
        s, n = ref_path_parts(studio, name)
        return f"{self._root}/refs/{s}/{n}"

    async def _read(self, studio: str, name: str, key: str) -> _Ref | None:
        async def get(c: S3Client) -> tuple[bytes, str]:
            resp = await c.get_object(Bucket=self._conn.bucket, Key=key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, resp["ETag"]

        try:
            data, etag = await self._conn.call("GetObject", key, get, transfer=True)
        except Missing:
            return None
        value = decode_ref(data, f"checkpoint {studio}/{name} at {self._conn.where(key)}")
        return _Ref(value, etag, data)

    async def get_ref(self, studio: str, name: str) -> RefValue | None:
        ref = await self._read(studio, name, self.key(studio, name))
        return ref.value if ref else None

    async def set_ref(self, studio: str, name: str, digest: str, expect: str | None) -> None:
        key = self.key(studio, name)
        current = await self._read(studio, name, key)
        _expect(studio, name, current, expect)
        body = encode_ref(RefValue(digest, datetime.now(UTC)))

        async def put(c: S3Client) -> None:
            if current is None:
                await c.put_object(
                    Bucket=self._conn.bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/json",
                    IfNoneMatch="*",
                )
            else:
                await c.put_object(
                    Bucket=self._conn.bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/json",
                    IfMatch=current.etag,
                )

        try:
            await self._conn.call("PutObject", key, put)
        except (PreconditionFailed, Missing):
            # Either another writer won, or our own first try landed and only
            # its response was lost: the document's bytes tell which.
            now = await self._read(studio, name, key)
            if now is not None and now.raw == body:
                return
            _expect(studio, name, now, expect, force=True)

    async def delete_ref(self, studio: str, name: str, expect: str) -> None:
        key = self.key(studio, name)
        current = await self._read(studio, name, key)
        _expect(studio, name, current, expect)
        assert current is not None
        etag = current.etag
        try:
            await self._conn.call(
                "DeleteObject",
                key,
                lambda c: c.delete_object(Bucket=self._conn.bucket, Key=key, IfMatch=etag),
            )
        except Missing:
            # Gone already: deleted by our own earlier try whose answer was lost
            # (HTTP clients resend a DELETE on a dropped connection without
            # telling), or by another deleter of the same value.  Either way
            # the ref is gone, as asked, and nothing was overwritten.
            return
        except PreconditionFailed:
            now = await self._read(studio, name, key)
            _expect(studio, name, now, expect, force=True)

    def _studio_prefix(self, studio: str) -> str:
        return self.key(studio, "_").rpartition("/")[0] + "/"

    async def list_names(self, studio: str) -> list[str]:
        return await self._listing.names(self._studio_prefix(studio), flat=True)

    async def list_refs(self, studio: str) -> dict[str, RefValue]:
        prefix = self._studio_prefix(studio)
        names = await self.list_names(studio)
        limit = asyncio.Semaphore(max(8, self._conn.concurrency))

        async def read(name: str) -> tuple[str, _Ref | None]:
            async with limit:
                try:
                    return name, await self._read(studio, name, prefix + name)
                except InvalidRef as e:  # one bad ref must not hide the others
                    skip_invalid(e, f"{studio}/{name}")
                    return name, None

        found = await asyncio.gather(*(read(n) for n in names))
        return {name: ref.value for name, ref in found if ref is not None}


def _expect(
    studio: str, name: str, current: _Ref | None, expect: str | None, force: bool = False
) -> None:
    check_expect(studio, name, current.value if current else None, expect, force=force)
