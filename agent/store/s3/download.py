"""Blob downloads: one GetObject, or parallel ranged GETs for a big blob.

Every byte read back is checked against its digest and size (or, for a caller
that hashes as it reads, its size).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from agent.errors import DigestMismatch
from agent.store.checks import check_hash, check_size
from agent.store.retry import TruncatedBody, http_status
from agent.store.s3.client import Connection
from agent.store.s3.files import BlobFile, copy_body, hash_range
from agent.store.s3.jobs import Job, run_bounded

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


class Downloader:
    """Fetches blobs into local files, ``part_size`` bytes a range."""

    def __init__(self, conn: Connection, part_size: int) -> None:
        self._conn = conn
        self.part_size = part_size

    async def fetch(
        self,
        key: str,
        digest: str,
        size: int | None,
        tmp: Path,
        verify: bool,
        on_data: Callable[[Path, int], None] | None,
    ) -> None:
        """Download ``key`` into ``tmp``, reporting to ``on_data`` as bytes become final."""
        if size is not None and size >= 2 * self.part_size and self._conn.concurrency > 1:
            await self._ranges(key, digest, size, tmp, verify, on_data)
        else:
            length = await self._whole(key, digest, size, tmp, verify)
            if on_data is not None:
                on_data(tmp, length)

    async def _whole(self, key: str, digest: str, size: int | None, tmp: Path, verify: bool) -> int:
        async def get(c: S3Client) -> int:
            async with self._conn.transfers:
                resp = await c.get_object(Bucket=self._conn.bucket, Key=key)
                body = resp["Body"]
                try:
                    length = resp["ContentLength"]
                    check_size(digest, length, size, f" at {self._conn.where(key)}")
                    hasher = hashlib.sha256() if verify else None
                    with BlobFile(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as file:
                        got = await copy_body(body, length, file, 0, hasher)
                finally:
                    body.close()
            if got != length:
                raise TruncatedBody(f"{got} of {length} bytes")
            if hasher is not None:
                check_hash(hasher, digest, f" at {self._conn.where(key)}")
            return got

        return await self._conn.call("GetObject", key, get, transfer=True)

    async def _ranges(
        self,
        key: str,
        digest: str,
        size: int,
        tmp: Path,
        verify: bool,
        on_data: Callable[[Path, int], None] | None,
    ) -> None:
        """Fetch a big blob as parallel ranged GETs into a preallocated file.

        When verifying, each range is hashed (read back from the page cache) as
        soon as it and every range before it are written, beside the transfers
        still running, so the blob is verified when its last range lands, not in
        a pass after.
        """
        ranges = [
            (start, min(size, start + self.part_size)) for start in range(0, size, self.part_size)
        ]
        written = [asyncio.Event() for _ in ranges]

        async def follow(file: BlobFile) -> None:
            """Hash (when verifying) and report the ranges in order as they land."""
            hasher = hashlib.sha256() if verify else None
            for (start, end), done in zip(ranges, written, strict=True):
                await done.wait()
                if hasher is not None:
                    await asyncio.to_thread(hash_range, file, start, end - start, hasher)
                if on_data is not None:
                    on_data(tmp, end)
            if hasher is not None:
                check_hash(hasher, digest, f" at {self._conn.where(key)}")

        async def jobs(file: BlobFile) -> AsyncGenerator[Job, None]:
            for (start, end), done in zip(ranges, written, strict=True):

                async def fetch(
                    start: int = start, end: int = end, done: asyncio.Event = done
                ) -> None:
                    await self._conn.call(
                        "GetObject",
                        key,
                        lambda c: self._get_range(c, key, digest, size, start, end, file),
                        transfer=True,
                        detail=f" (bytes {start}-{end - 1})",
                    )
                    done.set()

                yield fetch

        with BlobFile(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC) as file:
            file.truncate(size)
            checking = asyncio.ensure_future(follow(file))
            try:
                await run_bounded(jobs(file), self._conn.concurrency)
                await checking
            finally:
                checking.cancel()
                await asyncio.gather(checking, return_exceptions=True)

    async def _get_range(
        self, c: S3Client, key: str, digest: str, size: int, start: int, end: int, file: BlobFile
    ) -> None:
        async with self._conn.transfers:
            try:
                resp = await c.get_object(
                    Bucket=self._conn.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
                )
            except ClientError as e:
                if http_status(e) == 416:  # the object ends before this range
                    raise DigestMismatch(
                        f"blob {digest} at {self._conn.where(key)} is shorter than {size} bytes"
                    ) from e
                raise
            body = resp["Body"]
            try:
                total = resp.get("ContentRange", "").rpartition("/")[2]
                if total != str(size):
                    raise DigestMismatch(
                        f"blob {digest} at {self._conn.where(key)} has {total or '?'} bytes, "
                        f"expected {size}"
                    )
                got = await copy_body(body, end - start, file, start, None)
            finally:
                body.close()
        if got != end - start:
            raise TruncatedBody(f"{got} of {end - start} bytes")
