"""Lease objects in a bucket: created with ``If-None-Match: *``, replaced and
removed with ``If-Match: <etag>``.

A conditional write whose answer was lost is retried and then loses to itself;
a lease's bytes are unique to one write (they carry the holder and the time),
so finding our own bytes there means the first try landed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.errors import RefConflict
from agent.store.base import Lease
from agent.store.checks import lease_parts
from agent.store.s3.client import Connection
from agent.store.s3.errors import Missing, PreconditionFailed
from agent.store.s3.listing import Listing

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


class Leases:
    def __init__(self, conn: Connection, root: str, listing: Listing) -> None:
        self._conn = conn
        self._prefix = f"{root}/leases/"
        self._listing = listing

    def key(self, name: str) -> str:
        return self._prefix + "/".join(lease_parts(name))

    async def get(self, name: str) -> Lease | None:
        key = self.key(name)

        async def get(c: S3Client) -> Lease:
            resp = await c.get_object(Bucket=self._conn.bucket, Key=key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return Lease(data, resp["ETag"])

        try:
            return await self._conn.call("GetObject", key, get, transfer=True)
        except Missing:
            return None

    async def _put(self, name: str, body: bytes, condition: dict[str, str]) -> str:
        key = self.key(name)

        async def put(c: S3Client) -> str:
            resp = await c.put_object(
                Bucket=self._conn.bucket,
                Key=key,
                Body=body,
                ContentType="application/json",
                **condition,  # type: ignore[arg-type]
            )
            return resp["ETag"]

        try:
            return await self._conn.call("PutObject", key, put)
        except (PreconditionFailed, Missing):
            now = await self.get(name)
            if now is not None and now.body == body:
                return now.tag
            raise

    async def create(self, name: str, body: bytes) -> str | None:
        try:
            return await self._put(name, body, {"IfNoneMatch": "*"})
        except PreconditionFailed:
            return None

    async def replace(self, name: str, body: bytes, expect: str) -> str:
        try:
            return await self._put(name, body, {"IfMatch": expect})
        except (PreconditionFailed, Missing):
            raise RefConflict(f"lease {name} is no longer the one expected") from None

    async def delete(self, name: str, expect: str) -> None:
        key = self.key(name)
        try:
            await self._conn.call(
                "DeleteObject",
                key,
                lambda c: c.delete_object(Bucket=self._conn.bucket, Key=key, IfMatch=expect),
            )
        except Missing:
            return  # gone already (our own earlier try, its answer lost)
        except PreconditionFailed:
            if await self.get(name) is None:
                return
            raise RefConflict(f"lease {name} is held by another holder now") from None

    async def names(self, prefix: str) -> list[str]:
        base = self._prefix + "/".join(lease_parts(prefix)) + "/"
        rel = base[len(self._prefix) :]
        return [rel + n for n in await self._listing.names(base, flat=False)]
