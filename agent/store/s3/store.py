"""The S3 store: the local store's layout in a bucket, composed of a connection,
an uploader, a downloader and the refs."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import BlobMissing, ConfigError, DigestMismatch, StoreError
from agent.store.base import (
    CHECKPOINTS_DIR,
    BlobInfo,
    BlobSink,
    Lease,
    Leftover,
    RefValue,
    Store,
)
from agent.store.checks import check_upload, hex_of
from agent.store.s3.cleanup import Cleanup
from agent.store.s3.client import Connection
from agent.store.s3.download import Downloader
from agent.store.s3.errors import Missing, PreconditionFailed
from agent.store.s3.leases import Leases
from agent.store.s3.listing import Listing
from agent.store.s3.refs import Refs
from agent.store.s3.stream import StreamedBlob
from agent.store.s3.upload import Uploader

if TYPE_CHECKING:
    from agent.settings import Settings


class S3Store(Store):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        part_size: int = 16 << 20,
        concurrency: int = 4,
        max_attempts: int = 6,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        backoff_base: float = 0.5,
        list_page_size: int = 1000,
        stream_uploads: bool = True,
        segment_size: int = 12 << 20,
    ) -> None:
        self.bucket = bucket
        prefix = prefix.strip("/")
        self._root = f"{prefix}/{CHECKPOINTS_DIR}" if prefix else CHECKPOINTS_DIR
        self.url = f"s3://{bucket}/{self._root}"
        self.part_size = part_size
        self.concurrency = concurrency
        self.stream_uploads = stream_uploads
        # S3 cannot rename: a blob whose digest is known only at its end is
        # copied to its address then, unless the layer is cut into segments.
        self.segment_size = segment_size
        # As many blobs at a time as transfers: small layers then fill every
        # transfer slot, and a big one's ranges share them (``transfers`` bounds
        # all of them together).
        self.fetch_concurrency = concurrency
        self._conn = Connection(
            bucket,
            self.url,
            concurrency=concurrency,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            backoff_base=backoff_base,
        )
        self._upload = Uploader(self._conn, part_size)
        self._download = Downloader(self._conn, part_size)
        self._listing = Listing(self._conn, self._root, list_page_size)
        self._refs = Refs(self._conn, self._root, self._listing)
        self._leases = Leases(self._conn, self._root, self._listing)
        self._cleanup = Cleanup(self._conn, self._root, self._listing)
        self._layout_written = False

    @classmethod
    def from_url(
        cls,
        url: str,
        settings: Settings,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        backoff_base: float = 0.5,
    ) -> S3Store:
        """The store for a work directory ``s3://bucket/prefix``."""
        if not url.startswith("s3://"):
            raise ConfigError(f"not an S3 URL: {url!r}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ConfigError(f"invalid S3 work directory {url!r}: no bucket")
        return cls(
            bucket,
            prefix,
            part_size=settings.s3_part_size,
            concurrency=settings.s3_concurrency,
            max_attempts=settings.s3_max_attempts,
            stream_uploads=settings.s3_stream_uploads,
            segment_size=settings.s3_segment_size,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            backoff_base=backoff_base,
        )

    def _blob_key(self, digest: str) -> str:
        return f"{self._root}/blobs/sha256/{hex_of(digest)}"

    async def prepare(self) -> None:
        with contextlib.suppress(Exception):  # the first real request reports it
            await self._conn.open()

    async def close(self) -> None:
        await self._conn.close()

    # -- blobs ----------------------------------------------------------------

    async def has_blob(self, digest: str) -> bool:
        return await self._conn.size_of(self._blob_key(digest)) is not None

    async def blob_size(self, digest: str) -> int | None:
        return await self._conn.size_of(self._blob_key(digest))

    async def put_blob(self, src: Path, digest: str, size: int) -> None:
        key = self._blob_key(digest)
        try:
            actual = src.stat().st_size
        except OSError as e:
            raise StoreError(f"cannot read blob {digest} from {src}: {e.strerror or e}") from e
        if actual != size:
            raise DigestMismatch(f"blob {digest}: {src} has {actual} bytes, expected {size}")
        # An object of the wrong size under a content address is damaged: replace it.
        # One of the right size is refreshed instead (gone meanwhile: uploaded).
        if await self._conn.size_of(key) != size or not await self._upload.refresh(key):
            await self._upload.put(src, digest, size, key)
            await self._write_layout()
        src.unlink(missing_ok=True)

    def open_blob(self, fd: int, spool: Path, upload: str) -> BlobSink:
        if not self.stream_uploads:  # spooled, then put whole (``put_blob``)
            return super().open_blob(fd, spool, upload)
        try:
            return StreamedBlob(
                self._conn,
                self._upload,
                fd=fd,
                spool=spool,
                temp_key=self._cleanup.upload_key(check_upload(upload)),
                blob_key=self._blob_key,
                put_file=self.put_blob,
                stored=self._write_layout,
            )
        except BaseException:
            os.close(fd)
            raise

    async def get_blob(
        self,
        digest: str,
        size: int | None,
        dest_dir: Path,
        *,
        verify: bool = True,
        on_data: Callable[[Path, int], None] | None = None,
    ) -> Path:
        key = self._blob_key(digest)
        final = dest_dir / hex_of(digest)
        tmp = dest_dir / f".{final.name}.{uuid.uuid4().hex}.part"
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            await self._download.fetch(key, digest, size, tmp, verify, on_data)
            os.replace(tmp, final)
        except Missing as e:
            raise BlobMissing(f"blob {digest} is missing from {self.url}") from e
        except OSError as e:
            raise StoreError(
                f"cannot write blob {digest} into {dest_dir}: {e.strerror or e}"
            ) from e
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def iter_blobs(self) -> AsyncIterator[list[BlobInfo]]:
        return self._listing.blobs()

    async def delete_blob(self, digest: str) -> None:
        await self._cleanup.delete(self._blob_key(digest))

    async def _write_layout(self) -> None:
        """Mark the store as an OCI image layout, as the local store does, once."""
        if self._layout_written:
            return
        key = f"{self._root}/oci-layout"
        with contextlib.suppress(PreconditionFailed):
            await self._conn.call(
                "PutObject",
                key,
                lambda c: c.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=b'{"imageLayoutVersion": "1.0.0"}',
                    ContentType="application/json",
                    IfNoneMatch="*",
                ),
            )
        self._layout_written = True

    # -- refs -----------------------------------------------------------------

    async def get_ref(self, studio: str, name: str) -> RefValue | None:
        return await self._refs.get_ref(studio, name)

    async def set_ref(self, studio: str, name: str, digest: str, expect: str | None) -> None:
        await self._refs.set_ref(studio, name, digest, expect)

    async def delete_ref(self, studio: str, name: str, expect: str) -> None:
        await self._refs.delete_ref(studio, name, expect)

    async def list_refs(self, studio: str) -> dict[str, RefValue]:
        return await self._refs.list_refs(studio)

    async def exists(self) -> bool:
        return (
            self._layout_written or await self._conn.size_of(f"{self._root}/oci-layout") is not None
        )

    async def list_studios(self) -> list[str]:
        return sorted(await self._listing.children(f"{self._root}/refs/"))

    async def list_ref_names(self, studio: str) -> list[str]:
        return await self._refs.list_names(studio)

    # -- leases ---------------------------------------------------------------

    async def create_lease(self, name: str, body: bytes) -> str | None:
        return await self._leases.create(name, body)

    async def get_lease(self, name: str) -> Lease | None:
        return await self._leases.get(name)

    async def replace_lease(self, name: str, body: bytes, expect: str) -> str:
        return await self._leases.replace(name, body, expect)

    async def delete_lease(self, name: str, expect: str) -> None:
        await self._leases.delete(name, expect)

    async def list_leases(self, prefix: str) -> list[str]:
        return await self._leases.names(prefix)

    # -- leftovers ------------------------------------------------------------

    def iter_leftovers(self, before: datetime) -> AsyncIterator[Leftover]:
        return self._cleanup.leftovers(before)

    async def remove_leftover(self, leftover: Leftover) -> None:
        await self._cleanup.remove(leftover)

    async def clear_leftovers(self, uploads: Sequence[str] = ()) -> int:
        return await self._cleanup.clear(uploads)
