"""Blob uploads: one verified PutObject, or a multipart upload that is aborted
on any failure.

Every upload names the SHA-256 of its bytes in a signed ``x-amz-checksum-sha256``
header (for a single PutObject that is the blob's own digest), which S3
verifies; the payload is sent as ``UNSIGNED-PAYLOAD`` rather than hashed once
more by botocore for the signature.  Uploading while a layer is still being
compressed would need a temporary key and a server-side copy to the content
address once the digest is known; the copy of the benchmark's 157 MB layer
costs more than the upload it would hide (docs/benchmarks.md), so it is not
done.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from agent.errors import AgentError, DigestMismatch, StoreError, StoreUnavailable
from agent.log import get_logger
from agent.store.checks import hex_of
from agent.store.retry import error_code
from agent.store.s3.client import Connection
from agent.store.s3.errors import Missing
from agent.store.s3.files import BlobFile, hash_range, open_source, upload_body
from agent.store.s3.jobs import Job, run_bounded

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = get_logger("store.s3")

MAX_PARTS = 10_000  # S3's limit on parts per multipart upload


class UploadGone(StoreError):
    """Our multipart upload was aborted under us (by a writer of the same blob)."""


class Uploader:
    """Puts local files under their content address, ``part_size`` bytes a request."""

    def __init__(self, conn: Connection, part_size: int) -> None:
        self._conn = conn
        self.part_size = part_size

    async def put(self, src: Path, digest: str, size: int, key: str) -> None:
        """Upload ``src``, which must be ``size`` bytes hashing to ``digest``, to ``key``."""
        if size <= self.part_size:
            await self._put_single(src, digest, size, key)
        else:
            await self._put_multipart(src, digest, size, key)

    async def refresh(self, key: str) -> bool:
        """Copy an existing blob onto itself, which makes its LastModified now (a
        copy must change something: the metadata directive does), so gc's grace
        period counts from this writer.  False when the blob is gone.

        A blob too large for one CopyObject (5 GB) stays as it is: the writer's
        lease protects it until its ref is written, which is what counts.
        """

        async def copy(c: S3Client) -> None:
            await c.copy_object(
                Bucket=self._conn.bucket,
                Key=key,
                CopySource={"Bucket": self._conn.bucket, "Key": key},
                MetadataDirective="REPLACE",
                ContentType="application/octet-stream",
            )

        try:
            await self._conn.call("CopyObject", key, copy)
        except Missing:
            return False
        except StoreUnavailable:
            raise
        except StoreError as e:
            log.warning("s3.refresh_failed", key=self._conn.where(key), error=str(e))
        return True

    async def _put_single(self, src: Path, digest: str, size: int, key: str) -> None:
        """Verify the file, then stream it as one PutObject checked by S3 against the digest."""
        checksum = base64.b64encode(bytes.fromhex(hex_of(digest))).decode()
        with open_source(src, digest) as source:
            await asyncio.to_thread(_verify_source, source, size, digest)

            async def put(c: S3Client) -> None:
                async with self._conn.transfers:
                    await c.put_object(
                        Bucket=self._conn.bucket,
                        Key=key,
                        Body=upload_body(source, 0, size),
                        ContentLength=size,
                        ContentType="application/octet-stream",
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=checksum,
                    )

            await self._conn.call("PutObject", key, put, transfer=True)

    async def _put_multipart(self, src: Path, digest: str, size: int, key: str) -> None:
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        count = -(-size // part_size)
        try:
            created = await self._conn.call(
                "CreateMultipartUpload",
                key,
                lambda c: c.create_multipart_upload(
                    Bucket=self._conn.bucket,
                    Key=key,
                    ContentType="application/octet-stream",
                    ChecksumAlgorithm="SHA256",
                ),
            )
        except StoreUnavailable:
            # Tries whose answers were lost may each have started an upload.
            await self._sweep(key, keep=None)
            raise
        upload_id = created["UploadId"]
        retried = created["ResponseMetadata"].get("RetryAttempts", 0) > 0
        parts: list[CompletedPartTypeDef] = [{} for _ in range(count)]
        try:
            # The source outlives every part upload reading it, cancelled ones too.
            with open_source(src, digest) as source:
                jobs = self._part_jobs(source, digest, size, key, upload_id, part_size, parts)
                await run_bounded(jobs, self._conn.concurrency)
            await self._complete(key, upload_id, parts, size)
        except UploadGone as e:
            # Another writer of this blob swept our upload once its own was complete.
            if await self._conn.size_of(key) != size:
                raise StoreError(
                    f"the multipart upload of {self._conn.where(key)} was aborted by another writer"
                ) from e
        except BaseException as e:
            await self._abort(key, upload_id, e)
            raise
        finally:
            if retried:
                await self._sweep(key, keep=upload_id)

    async def _part_jobs(
        self,
        source: BlobFile,
        digest: str,
        size: int,
        key: str,
        upload_id: str,
        part_size: int,
        parts: list[CompletedPartTypeDef],
    ) -> AsyncGenerator[Job, None]:
        """Hash parts in order and yield one upload job each; the jobs stream from disk.

        Hashing is sequential so the digest is known when the last part is
        hashed; a file that does not hash to ``digest`` is never completed.  The
        same pass yields each part's own SHA-256 for its checksum header.
        """
        whole = hashlib.sha256()
        count = len(parts)
        for number in range(1, count + 1):
            offset = (number - 1) * part_size
            length = min(part_size, size - offset)
            checksum = await asyncio.to_thread(_hash_part, source, offset, length, whole)

            async def upload(
                number: int = number,
                offset: int = offset,
                length: int = length,
                sha: str = checksum,
            ) -> None:
                await self._upload_part(source, key, upload_id, number, offset, length, sha, parts)

            yield upload
        _check_source(whole, digest, source)

    async def _upload_part(
        self,
        source: BlobFile,
        key: str,
        upload_id: str,
        number: int,
        offset: int,
        length: int,
        checksum: str,
        parts: list[CompletedPartTypeDef],
    ) -> None:
        async def put(c: S3Client) -> None:
            async with self._conn.transfers:
                try:
                    resp = await c.upload_part(
                        Bucket=self._conn.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=upload_body(source, offset, length),
                        ContentLength=length,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=checksum,
                    )
                except ClientError as e:
                    if error_code(e) == "NoSuchUpload":
                        raise UploadGone(
                            f"{self._conn.where(key)}: upload {upload_id} is gone"
                        ) from e
                    raise
            parts[number - 1] = {
                "PartNumber": number,
                "ETag": resp["ETag"],
                "ChecksumSHA256": checksum,
            }

        detail = f" (part {number} of {len(parts)})"
        await self._conn.call("UploadPart", key, put, transfer=True, detail=detail)

    async def _complete(
        self, key: str, upload_id: str, parts: list[CompletedPartTypeDef], size: int
    ) -> None:
        async def complete(c: S3Client) -> None:
            try:
                await c.complete_multipart_upload(
                    Bucket=self._conn.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except ClientError as e:
                # A retry after a first try that did complete may find no upload.
                if error_code(e) != "NoSuchUpload":
                    raise
                head = await c.head_object(Bucket=self._conn.bucket, Key=key)
                if head["ContentLength"] != size:
                    raise

        await self._conn.call("CompleteMultipartUpload", key, complete)

    async def _abort(self, key: str, upload_id: str, cause: BaseException) -> None:
        """Abort a failed upload so no parts are left behind (and billed)."""

        async def abort(c: S3Client) -> None:
            try:
                await c.abort_multipart_upload(
                    Bucket=self._conn.bucket, Key=key, UploadId=upload_id
                )
            except ClientError as e:
                if error_code(e) != "NoSuchUpload":
                    raise

        try:
            # Shielded: a cancelled put (the session stopping) still aborts.
            await asyncio.shield(self._conn.call("AbortMultipartUpload", key, abort))
        except AgentError as e:
            cause.add_note(
                f"the incomplete multipart upload {upload_id} of {self._conn.where(key)} could not "
                f"be aborted ({e}); a bucket lifecycle rule AbortIncompleteMultipartUpload "
                "removes it"
            )

    async def _sweep(self, key: str, keep: str | None) -> None:
        """Abort the other incomplete uploads of ``key`` after a retried CreateMultipartUpload.

        A try whose answer was lost may have started an upload nobody will
        finish or abort.  S3 cannot say which upload a lost answer started
        (and emulators report no real initiation time), so every other upload
        of this content address goes: a concurrent writer of the same blob that
        loses its upload finds the blob complete (see ``UploadGone``).  Failure
        here only leaves work for the bucket's lifecycle rule.
        """

        async def sweep(c: S3Client) -> int:
            resp = await c.list_multipart_uploads(Bucket=self._conn.bucket, Prefix=key)
            stale = [
                upload_id
                for u in resp.get("Uploads", [])
                if u.get("Key") == key and (upload_id := u.get("UploadId")) and upload_id != keep
            ]
            for upload_id in stale:
                with contextlib.suppress(ClientError):
                    await c.abort_multipart_upload(
                        Bucket=self._conn.bucket, Key=key, UploadId=upload_id
                    )
            return len(stale)

        try:
            swept = await asyncio.shield(self._conn.call("ListMultipartUploads", key, sweep))
        except AgentError as e:
            log.warning("s3.sweep_failed", key=self._conn.where(key), error=str(e))
        else:
            if swept:
                log.info("s3.swept_orphan_uploads", key=self._conn.where(key), count=swept)


def _hash_part(source: BlobFile, offset: int, length: int, whole: hashlib._Hash) -> str:
    """The base64 SHA-256 of one part, feeding ``whole`` with the same bytes on the way."""
    part = hashlib.sha256()
    hash_range(source, offset, length, part, whole)
    return base64.b64encode(part.digest()).decode()


def _verify_source(source: BlobFile, size: int, digest: str) -> None:
    """Refuse to upload a file that is not ``size`` bytes hashing to ``digest``."""
    whole = hashlib.sha256()
    hash_range(source, 0, size, whole)
    if source.read_into(memoryview(bytearray(1)), size):
        raise DigestMismatch(f"blob {digest}: {source.path} has more than {size} bytes")
    _check_source(whole, digest, source)


def _check_source(whole: hashlib._Hash, digest: str, source: BlobFile) -> None:
    """Refuse a file whose bytes, fed to ``whole``, do not hash to ``digest``."""
    if "sha256:" + whole.hexdigest() != digest:
        raise DigestMismatch(
            f"blob {digest}: {source.path} hashes to sha256:{whole.hexdigest()}; not uploaded"
        )
