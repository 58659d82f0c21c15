"""Removing what gc finds unneeded: blobs, multipart uploads never completed, and
the temporary objects of blobs uploaded while they were written.

An incomplete upload is invisible to a listing of objects and is billed until
aborted; those started before gc's cutoff belong to writers that died (a live
one completes or aborts its own).  Blobs streamed as they are written go to
``<root>/uploads/<owner>/<id>`` first (``stream.py``); what a killed writer left
there, an incomplete upload or a completed object, is a leftover named by its
owner (so gc can spare a live one's), and removed by name at that writer's
next start.  A bucket lifecycle rule that expires objects under ``uploads/``
after a day, beside AbortIncompleteMultipartUpload, keeps the same promise
without any agent.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from agent.errors import AgentError, StoreError
from agent.log import get_logger
from agent.store.base import Leftover
from agent.store.checks import check_upload
from agent.store.retry import error_code
from agent.store.s3.client import Connection
from agent.store.s3.listing import Listing

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import ListMultipartUploadsOutputTypeDef


log = get_logger("store.s3")

UPLOADS = "uploads"


class Cleanup:
    def __init__(self, conn: Connection, root: str, listing: Listing) -> None:
        self._conn = conn
        self._root = root
        self._listing = listing
        self._uploads = f"{root}/{UPLOADS}/"

    def upload_key(self, upload: str) -> str:
        """The temporary key of a blob upload named ``upload`` (``<owner>/<id>``)."""
        return self._uploads + upload

    def _owner(self, key: str) -> str:
        """The owner a temporary key names ("" for any other key)."""
        if not key.startswith(self._uploads):
            return ""
        return key[len(self._uploads) :].partition("/")[0]

    async def delete(self, key: str) -> None:
        await self._conn.call(
            "DeleteObject", key, lambda c: c.delete_object(Bucket=self._conn.bucket, Key=key)
        )

    async def leftovers(self, before: datetime) -> AsyncIterator[Leftover]:
        """Incomplete uploads, then temporary objects, from before ``before``."""
        async for item in self.uploads(before):
            yield item
        async for page in self._listing.pages(self._uploads):
            for obj in page.get("Contents", []):
                key, modified = obj.get("Key", ""), obj.get("LastModified")
                if not key or modified is None or modified >= before:
                    continue
                what = f"temporary object {self._conn.where(key)}"
                size = int(obj.get("Size", 0))
                yield Leftover(what, size, modified.astimezone(UTC), key, self._owner(key))

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
                handle = f"{key}\n{upload_id}"
                yield Leftover(what, size, started.astimezone(UTC), handle, self._owner(key))
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

    async def remove(self, leftover: Leftover) -> None:
        """Abort an incomplete upload, or delete a temporary object (nothing else)."""
        key, _, upload_id = leftover.handle.partition("\n")
        if upload_id:
            await self._abort(key, upload_id)
        elif key.startswith(self._uploads):
            await self.delete(key)
        else:
            raise StoreError(f"{self._conn.where(key)} is not a leftover of {self._root}")

    async def clear(self, uploads: Sequence[str]) -> int:
        """Remove what the uploads named ``uploads`` left (a dead writer's, named by
        the spool files it left); how many objects and uploads.  Best effort: what
        cannot be removed now is gc's."""
        removed = 0
        for upload in uploads:
            try:
                key = self.upload_key(check_upload(upload))
                removed += await self._clear_one(key)
            except AgentError as e:
                log.warning("s3.leftover_kept", upload=upload, error=str(e))
        return removed

    async def _clear_one(self, key: str) -> int:
        async def list_uploads(c: S3Client) -> list[str]:
            resp = await c.list_multipart_uploads(Bucket=self._conn.bucket, Prefix=key)
            return [
                u["UploadId"]
                for u in resp.get("Uploads", [])
                if u.get("Key") == key and u.get("UploadId")
            ]

        removed = 0
        for upload_id in await self._conn.call("ListMultipartUploads", key, list_uploads):
            await self._abort(key, upload_id)
            removed += 1
        if await self._conn.size_of(key) is not None:
            await self.delete(key)
            removed += 1
        return removed

    async def _abort(self, key: str, upload_id: str) -> None:
        async def abort(c: S3Client) -> None:
            try:
                await c.abort_multipart_upload(
                    Bucket=self._conn.bucket, Key=key, UploadId=upload_id
                )
            except ClientError as e:
                if error_code(e) != "NoSuchUpload":
                    raise

        await self._conn.call("AbortMultipartUpload", key, abort)
