"""Removing what gc finds unneeded: blobs, and multipart uploads never completed.

An incomplete upload is invisible to a listing of objects and is billed until
aborted; those started before gc's cutoff belong to writers that died (a live
one completes or aborts its own).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from agent.store.base import Leftover
from agent.store.retry import error_code
from agent.store.s3.client import Connection

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import ListMultipartUploadsOutputTypeDef


class Cleanup:
    def __init__(self, conn: Connection, root: str) -> None:
        self._conn = conn
        self._root = root

    async def delete(self, key: str) -> None:
        await self._conn.call(
            "DeleteObject", key, lambda c: c.delete_object(Bucket=self._conn.bucket, Key=key)
        )

    async def uploads(self, before: datetime) -> AsyncIterator[Leftover]:
        """The incomplete uploads under the root started before ``before``, a page at a time."""
        prefix = self._root + "/"
        markers: dict[str, Any] = {}
        while True:

            async def list_page(
                c: S3Client, markers: dict[str, Any] = markers
            ) -> ListMultipartUploadsOutputTypeDef:
                return await c.list_multipart_uploads(
                    Bucket=self._conn.bucket, Prefix=prefix, **markers
                )

            page = await self._conn.call("ListMultipartUploads", prefix, list_page)
            for u in page.get("Uploads", []):
                key, upload_id, started = u.get("Key"), u.get("UploadId"), u.get("Initiated")
                if not key or not upload_id or started is None or started >= before:
                    continue
                size = await self._parts_size(key, upload_id)
                what = f"incomplete upload {upload_id} of {self._conn.where(key)}"
                yield Leftover(what, size, started.astimezone(UTC), f"{key}\n{upload_id}")
            if not page.get("IsTruncated"):
                return
            markers = {
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }

    async def _parts_size(self, key: str, upload_id: str) -> int:
        """The bytes an upload's parts hold (0 when they cannot be listed)."""

        async def parts(c: S3Client) -> int:
            resp: Any = await c.list_parts(Bucket=self._conn.bucket, Key=key, UploadId=upload_id)
            return sum(int(p.get("Size", 0)) for p in resp.get("Parts", []))

        with contextlib.suppress(Exception):
            return await self._conn.call("ListParts", key, parts)
        return 0

    async def abort(self, leftover: Leftover) -> None:
        key, _, upload_id = leftover.handle.partition("\n")

        async def abort(c: S3Client) -> None:
            try:
                await c.abort_multipart_upload(
                    Bucket=self._conn.bucket, Key=key, UploadId=upload_id
                )
            except ClientError as e:
                if error_code(e) != "NoSuchUpload":
                    raise

        await self._conn.call("AbortMultipartUpload", key, abort)
