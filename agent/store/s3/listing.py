"""Listing a bucket's checkpoint objects, a page (ListObjectsV2, 1,000 keys) at a time.

Each page is one request, retried and reported like any other, so a listing
of any length holds one page in memory and a failure names where it stopped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC
from typing import TYPE_CHECKING, Any

from agent.store.base import BlobInfo
from agent.store.checks import is_blob_name
from agent.store.s3.client import Connection

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import ListObjectsV2OutputTypeDef


class Listing:
    """Listings under ``<root>``: blobs, studios, and the names under a prefix."""

    def __init__(self, conn: Connection, root: str, page_size: int = 1000) -> None:
        self._conn = conn
        self._root = root
        self.page_size = page_size  # S3's own maximum; smaller only to test paging

    async def pages(
        self, prefix: str, *, delimiter: bool = False
    ) -> AsyncIterator[ListObjectsV2OutputTypeDef]:
        """The pages of a listing of ``prefix``, one request each."""
        token: str | None = None
        while True:
            args: dict[str, Any] = {
                "Bucket": self._conn.bucket,
                "Prefix": prefix,
                "MaxKeys": self.page_size,
            }
            if delimiter:
                args["Delimiter"] = "/"
            if token:
                args["ContinuationToken"] = token

            async def list_page(
                c: S3Client, args: dict[str, Any] = args
            ) -> ListObjectsV2OutputTypeDef:
                return await c.list_objects_v2(**args)

            page = await self._conn.call("ListObjectsV2", prefix, list_page)
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def blobs(self) -> AsyncIterator[list[BlobInfo]]:
        prefix = f"{self._root}/blobs/sha256/"
        async for page in self.pages(prefix):
            out: list[BlobInfo] = []
            for obj in page.get("Contents", []):
                name = obj.get("Key", "")[len(prefix) :]
                if not is_blob_name(name) or "LastModified" not in obj:
                    continue
                modified = obj["LastModified"].astimezone(UTC)
                out.append(BlobInfo("sha256:" + name, int(obj.get("Size", 0)), modified))
            yield out

    async def children(self, prefix: str) -> list[str]:
        """The "directories" directly under ``prefix`` (which ends in ``/``)."""
        out: list[str] = []
        async for page in self.pages(prefix, delimiter=True):
            for p in page.get("CommonPrefixes", []):
                name = p.get("Prefix", "")[len(prefix) :].rstrip("/")
                if name and not name.startswith("."):
                    out.append(name)
        return out

    async def names(self, prefix: str, *, flat: bool) -> list[str]:
        """The keys under ``prefix`` (which ends in ``/``), relative to it; with
        ``flat`` only those directly under it.  Dot-names are left out."""
        out: list[str] = []
        async for page in self.pages(prefix, delimiter=flat):
            for obj in page.get("Contents", []):
                name = obj.get("Key", "")[len(prefix) :]
                if name and not any(part.startswith(".") for part in name.split("/")):
                    out.append(name)
        return out
