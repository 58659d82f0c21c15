"""Blob uploads: one verified PutObject, or a multipart upload that is aborted
on any failure; and the server-side copy that makes a blob uploaded under a
temporary key (``stream.py``) visible under its content address.

Every upload names a checksum of its bytes in a signed ``x-amz-checksum-*``
header, which S3 verifies: the SHA-256 for a blob put from a file (for a
single PutObject that is the blob's own digest), a CRC32 for the parts of a
streamed one, whose SHA-256 S3 computes when it copies the whole into place.
The payload is sent as ``UNSIGNED-PAYLOAD`` rather than hashed once more by
botocore for the signature.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

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
    from types_aiobotocore_s3.type_defs import (
        CompletedPartTypeDef,
        CopySourceTypeDef,
        UploadPartOutputTypeDef,
    )

log = get_logger("store.s3")

MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
COPY_MAX = 5 << 30  # the largest object one CopyObject copies; larger ones go by parts
COPY_PART = 1 << 30  # bytes per UploadPartCopy of a larger one (S3 takes up to 5 GiB)

# The checksum a multipart upload's parts name (base64 of the raw value).
PartChecksum = Literal["SHA256", "CRC32"]


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

    async def create(self, key: str, algorithm: PartChecksum = "SHA256") -> tuple[str, bool]:
        """Start a multipart upload of ``key`` whose parts name their ``algorithm``
        checksum; its id, and whether a try was retried (whose lost answer may have
        started another)."""
        try:
            created = await self._conn.call(
                "CreateMultipartUpload",
                key,
                lambda c: c.create_multipart_upload(
                    Bucket=self._conn.bucket,
                    Key=key,
                    ContentType="application/octet-stream",
                    ChecksumAlgorithm=algorithm,
                ),
            )
        except StoreUnavailable:
            # Tries whose answers were lost may each have started an upload.
            await self._sweep(key, keep=None)
            raise
        return created["UploadId"], created["ResponseMetadata"].get("RetryAttempts", 0) > 0

    async def _put_multipart(self, src: Path, digest: str, size: int, key: str) -> None:
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        count = -(-size // part_size)
        upload_id, retried = await self.create(key)
        parts: list[CompletedPartTypeDef] = [{} for _ in range(count)]
        try:
            # The source outlives every part upload reading it, cancelled ones too.
            with open_source(src, digest) as source:
                jobs = self._part_jobs(source, digest, size, key, upload_id, part_size, parts)
                await run_bounded(jobs, self._conn.concurrency)
            await self.complete(key, upload_id, parts, size)
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
                parts[number - 1] = await self.upload_part(
                    source, key, upload_id, number, offset, length, sha, of=count
                )

            yield upload
        _check_source(whole, digest, source)

    async def upload_part(
        self,
        source: BlobFile,
        key: str,
        upload_id: str,
        number: int,
        offset: int,
        length: int,
        checksum: str,
        *,
        of: int | None = None,
        algorithm: PartChecksum = "SHA256",
    ) -> CompletedPartTypeDef:
        """Upload bytes ``[offset, offset + length)`` of ``source`` as part ``number``,
        checked by S3 against ``checksum`` (its base64 ``algorithm`` checksum, as
        the upload was created with); what completing needs."""
        done: CompletedPartTypeDef = {"PartNumber": number}

        async def send(c: S3Client) -> UploadPartOutputTypeDef:
            bucket, body = self._conn.bucket, upload_body(source, offset, length)
            if algorithm == "CRC32":
                done["ChecksumCRC32"] = checksum
                return await c.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body,
                    ContentLength=length, ChecksumAlgorithm="CRC32", ChecksumCRC32=checksum,
                )  # fmt: skip
            done["ChecksumSHA256"] = checksum
            return await c.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body,
                ContentLength=length, ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum,
            )  # fmt: skip

        async def put(c: S3Client) -> None:
            async with self._conn.transfers:
                try:
                    resp = await send(c)
                except ClientError as e:
                    if error_code(e) == "NoSuchUpload":
                        raise UploadGone(
                            f"{self._conn.where(key)}: upload {upload_id} is gone"
                        ) from e
                    raise
            done["ETag"] = resp["ETag"]

        detail = f" (part {number} of {of})" if of else f" (part {number})"
        await self._conn.call("UploadPart", key, put, transfer=True, detail=detail)
        return done

    async def complete(
        self, key: str, upload_id: str, parts: list[CompletedPartTypeDef], size: int
    ) -> str:
        """Complete the upload from ``parts``; the object's ETag."""

        async def complete(c: S3Client) -> str:
            try:
                resp = await c.complete_multipart_upload(
                    Bucket=self._conn.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
                return resp.get("ETag", "")
            except ClientError as e:
                # A retry after a first try that did complete may find no upload.
                if error_code(e) != "NoSuchUpload":
                    raise
                head = await c.head_object(Bucket=self._conn.bucket, Key=key)
                if head["ContentLength"] != size:
                    raise
                return head.get("ETag", "")

        return await self._conn.call("CompleteMultipartUpload", key, complete)

    async def copy(self, src: str, etag: str, dest: str, size: int, crc32: int) -> None:
        """Copy the object ``src``, only while its ETag is still ``etag`` (the one
        its writer completed), to ``dest``, inside S3.  The copy's CRC32, which S3
        computes as it copies and keeps as the blob's checksum, must be ``crc32``
        (the writer's, of the bytes it wrote): a copy that is not is deleted
        again.  Objects over 5 GiB go by UploadPartCopy ranges, aborted on any
        failure (their checksum is per part: the parts' checks and the ETag stand)."""
        source: CopySourceTypeDef = {"Bucket": self._conn.bucket, "Key": src}
        if size <= COPY_MAX:
            resp = await self._conn.call(
                "CopyObject",
                dest,
                lambda c: c.copy_object(
                    Bucket=self._conn.bucket,
                    Key=dest,
                    CopySource=source,
                    CopySourceIfMatch=etag,
                    ChecksumAlgorithm="CRC32",
                ),
            )
            result = resp.get("CopyObjectResult", {})
            got = result.get("ChecksumCRC32")
            want = base64.b64encode(crc32.to_bytes(4, "big")).decode()
            # Checked when S3 says it is the whole object's (a composite one, of
            # parts, ends in -N and proves nothing the part checks did not).
            whole = result.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
            if got is not None and whole and "-" not in got and got != want:
                await self._conn.call(
                    "DeleteObject",
                    dest,
                    lambda c: c.delete_object(Bucket=self._conn.bucket, Key=dest),
                )
                raise DigestMismatch(
                    f"the copy of {self._conn.where(src)} to {self._conn.where(dest)} has CRC32 "
                    f"{got}, not the {want} written; not stored"
                )
            return
        upload_id, retried = await self.create(dest)
        count = -(-size // COPY_PART)
        parts: list[CompletedPartTypeDef] = [{} for _ in range(count)]

        async def jobs() -> AsyncGenerator[Job, None]:
            for number in range(1, count + 1):
                first = (number - 1) * COPY_PART
                last = min(first + COPY_PART, size) - 1

                async def one(number: int = number, first: int = first, last: int = last) -> None:
                    resp = await self._conn.call(
                        "UploadPartCopy",
                        dest,
                        lambda c: c.upload_part_copy(
                            Bucket=self._conn.bucket,
                            Key=dest,
                            UploadId=upload_id,
                            PartNumber=number,
                            CopySource=source,
                            CopySourceIfMatch=etag,
                            CopySourceRange=f"bytes={first}-{last}",
                        ),
                        detail=f" (part {number} of {count})",
                    )
                    parts[number - 1] = {
                        "PartNumber": number,
                        "ETag": resp["CopyPartResult"].get("ETag", ""),
                    }

                yield one

        try:
            await run_bounded(jobs(), self._conn.concurrency)
            await self.complete(dest, upload_id, parts, size)
        except BaseException as e:
            await self._abort(dest, upload_id, e)
            raise
        finally:
            if retried:
                await self._sweep(dest, keep=upload_id)

    async def abort(self, key: str, upload_id: str, cause: BaseException | None = None) -> None:
        """Abort an upload that will not be completed (failure only noted or logged)."""
        await self._abort(key, upload_id, cause)

    async def _abort(self, key: str, upload_id: str, cause: BaseException | None) -> None:
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
            note = (
                f"the incomplete multipart upload {upload_id} of {self._conn.where(key)} could not "
                f"be aborted ({e}); a bucket lifecycle rule AbortIncompleteMultipartUpload "
                "removes it"
            )
            if cause is not None:
                cause.add_note(note)
            else:
                log.warning("s3.abort_failed", key=self._conn.where(key), error=note)

    async def sweep(self, key: str, keep: str | None) -> None:
        """Abort the incomplete uploads of ``key`` other than ``keep`` (see ``_sweep``)."""
        await self._sweep(key, keep)

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
