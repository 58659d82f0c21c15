"""The S3 checkpoint store: the same layout as the local store, in a bucket.

Blobs go straight to their content address (the engine computed the digest),
large ones as multipart uploads with bounded concurrency that are aborted on
any failure.  Uploading while a layer is still being compressed would need a
temporary key and a server-side copy to the content address once the digest
is known; the copy of the benchmark's 157 MB layer costs more than the upload
it would hide (docs/benchmarks.md), so it is not done.  Every byte read back
is checked against its digest and size (or, for a caller that hashes as it
reads, its size).
Refs are replaced with S3 conditional writes (``If-None-Match: *`` to create,
``If-Match: <etag>`` to update or delete), so two writers of one studio cannot
overwrite each other: the loser gets ``RefConflict``.

Blobs stream between their file and the connection a chunk at a time; neither
a blob nor a part of one is ever held in memory, so a layer of any size moves
in a few MiB.  Every blob upload names the SHA-256 of its bytes in a signed
``x-amz-checksum-sha256`` header (for a single PutObject that is the blob's
own digest), which S3 verifies; the payload is sent as ``UNSIGNED-PAYLOAD``
rather than hashed once more by botocore for the signature.

Credentials, region and endpoint come from the standard AWS configuration
chain (``AWS_ENDPOINT_URL_S3`` points it at an S3-compatible store, which must
honour conditional PutObject and DeleteObject for refs to be safe).  The policy
the agent needs on ``<prefix>/.studios/checkpoints/*`` is s3:GetObject,
s3:PutObject, s3:DeleteObject and s3:AbortMultipartUpload, plus s3:ListBucket
(and, to clean up after lost answers, s3:ListBucketMultipartUploads) on the
bucket.  A bucket lifecycle rule ``AbortIncompleteMultipartUpload`` is the
backstop for uploads whose abort could not reach S3 (the agent killed
mid-upload).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import threading
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar, cast

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from agent.errors import (
    AgentError,
    BlobMissing,
    ConfigError,
    DigestMismatch,
    NotFound,
    PermissionDenied,
    RefConflict,
    StoreError,
    StoreUnavailable,
)
from agent.log import get_logger
from agent.store.base import CHECKPOINTS_DIR, RefValue, Store
from agent.store.local import hex_of
from agent.store.refs import decode_ref, encode_ref, ref_path_parts
from agent.store.retry import (
    Backoff,
    RetriesExhausted,
    TruncatedBody,
    error_code,
    http_status,
    is_transient,
    retrying,
)

if TYPE_CHECKING:
    import aioboto3
    from _typeshed import WriteableBuffer
    from aiobotocore.config import AioConfig
    from aiobotocore.response import StreamingBody
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

    from agent.settings import Settings

T = TypeVar("T")
log = get_logger("store.s3")

MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
# Bytes read from disk per step when hashing, and gathered from the network per
# disk write when downloading: what one transfer holds in memory at most.
_IO_CHUNK = 1 << 20

# The IAM action each operation needs, for PermissionDenied messages.
_ACTIONS = {
    "HeadObject": "s3:GetObject",
    "GetObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "DeleteObject": "s3:DeleteObject",
    "ListObjectsV2": "s3:ListBucket",
}
# 403s that mean the credentials themselves are bad, not a missing permission.
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
    }
)


class _Missing(NotFound):
    """The object does not exist (404); callers turn it into None or BlobMissing."""


class _PreconditionFailed(RefConflict):
    """A conditional write or delete lost (412, or 409 while a rival one was in flight)."""


class _UploadGone(StoreError):
    """Our multipart upload was aborted under us (by a writer of the same blob)."""


class _InvalidRef(StoreError):
    """An object under refs/ that is not a ref document."""


@dataclass(frozen=True, slots=True)
class _Ref:
    value: RefValue
    etag: str
    raw: bytes


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
    ) -> None:
        self.bucket = bucket
        prefix = prefix.strip("/")
        self._root = f"{prefix}/{CHECKPOINTS_DIR}" if prefix else CHECKPOINTS_DIR
        self.url = f"s3://{bucket}/{self._root}"
        self.part_size = part_size
        self.concurrency = concurrency
        self._backoff = Backoff(max_attempts=max_attempts, base=backoff_base)
        self._timeouts = (connect_timeout, read_timeout)
        self._max_attempts = max_attempts
        self._clients: tuple[S3Client, S3Client] | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._open_lock = asyncio.Lock()
        self._transfers = asyncio.Semaphore(concurrency)
        self._layout_written = False

    def _client_config(
        self,
        attempts: int,
        connect_timeout: float,
        read_timeout: float,
        *,
        transfers: bool = False,
    ) -> AioConfig:
        """Client settings; ``transfers`` for the client that moves blobs.

        Plain requests are retried by botocore (standard mode: exponential
        backoff with jitter on throttling, 5xx, resets and timeouts).  Transfers
        are retried whole by ``retrying`` (a body that breaks off is beyond
        botocore), on a client that tries once, so the bound stays max_attempts.
        Blob bodies are hashed once, by us: every upload names its SHA-256 in a
        signed checksum header, so botocore neither signs the payload (it would
        read and hash every part again, in the event loop: always over plain
        HTTP, and over HTTPS too once the checksum is not its own) nor adds a
        CRC32; and downloads are verified against the digest, so botocore
        neither asks for stored checksums nor checks them as well.
        """
        from aiobotocore.config import AioConfig

        return AioConfig(
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=2 * self.concurrency + 8,
            user_agent_extra="studio-agent",
            s3={"payload_signing_enabled": False} if transfers else None,
            request_checksum_calculation="when_required" if transfers else None,
            response_checksum_validation="when_required" if transfers else None,
        )

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
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            backoff_base=backoff_base,
        )

    # -- keys -----------------------------------------------------------------

    def _blob_key(self, digest: str) -> str:
        return f"{self._root}/blobs/sha256/{hex_of(digest)}"

    def _ref_key(self, studio: str, name: str) -> str:
        s, n = ref_path_parts(studio, name)
        return f"{self._root}/refs/{s}/{n}"

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{key}" if key is not None else f"s3://{self.bucket}"

    # -- requests and their errors ---------------------------------------------

    async def prepare(self) -> None:
        with contextlib.suppress(Exception):  # the first real request reports it
            await self._client_pair()

    async def _client_pair(self) -> tuple[S3Client, S3Client]:
        if self._clients is None:
            async with self._open_lock:
                if self._clients is None:
                    # The SDK takes a quarter of a second to import: off the loop.
                    session = await asyncio.to_thread(_new_session)
                    config = self._client_config(self._max_attempts, *self._timeouts)
                    raw_config = self._client_config(1, *self._timeouts, transfers=True)
                    stack = contextlib.AsyncExitStack()
                    try:
                        client = await stack.enter_async_context(
                            session.client("s3", config=config)
                        )
                        raw = await stack.enter_async_context(
                            session.client("s3", config=raw_config)
                        )
                    except BaseException as e:
                        await stack.aclose()
                        if isinstance(e, ValueError):  # botocore's word for a bad endpoint URL
                            raise ConfigError(f"cannot set up S3 for {self.url}: {e}") from e
                        raise
                    self._stack, self._clients = stack, (client, raw)
        return self._clients

    async def _call(
        self,
        op: str,
        key: str | None,
        fn: Callable[[S3Client], Awaitable[T]],
        *,
        transfer: bool = False,
        detail: str = "",
    ) -> T:
        """Run one S3 operation, turning every failure into an ``AgentError``.

        ``transfer`` operations run whole under ``retrying`` on the client that
        does not retry by itself, so a body that breaks off is fetched again.
        """
        try:
            client, raw = await self._client_pair()
            if transfer:
                return await retrying(self._backoff, lambda: fn(raw))
            return await fn(client)
        except RetriesExhausted as e:
            raise self._unavailable(op, key, detail, e.attempts, e.last) from e.last
        except ClientError as e:
            raise self._translate(op, key, detail, e) from e
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise StoreError(
                f"no usable AWS credentials for S3 {op} of {self._where(key)}: {e} (set them in "
                "the environment, the shared credentials file, or a container/instance role)"
            ) from e
        except Exception as e:
            if is_transient(e):
                raise self._unavailable(op, key, detail, self._backoff.max_attempts, e) from e
            if isinstance(e, BotoCoreError):
                raise StoreError(f"S3 {op} of {self._where(key)}{detail} failed: {e}") from e
            raise

    def _unavailable(
        self, op: str, key: str | None, detail: str, attempts: int, e: BaseException
    ) -> StoreUnavailable:
        return StoreUnavailable(
            f"S3 {op} of {self._where(key)}{detail} failed after {attempts} "
            f"{'try' if attempts == 1 else 'tries'}: {_describe(e)}"
        )

    def _translate(self, op: str, key: str | None, detail: str, e: ClientError) -> AgentError:
        code, status = error_code(e), http_status(e)
        where = self._where(key)
        retries = int(e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0))
        if code in _CREDENTIAL_CODES:
            return StoreError(f"S3 rejected the credentials for {op} of {where}: {_describe(e)}")
        if status == 403 or code in ("AccessDenied", "AllAccessDisabled"):
            action = _ACTIONS.get(op, f"s3:{op}")
            bucket_wide = action in ("s3:ListBucket", "s3:ListBucketMultipartUploads")
            resource = self._where(None) if bucket_wide else where
            hint = ""
            if op == "HeadObject":
                hint = " (without s3:ListBucket, S3 also answers 403 for a missing object)"
            elif op == "DeleteObject":
                hint = " (a conditional delete also needs s3:GetObject)"
            return PermissionDenied(
                f"permission denied: S3 {op} needs {action} on {resource}{hint}: {_describe(e)}"
            )
        if code == "NoSuchBucket":
            return StoreError(f"S3 bucket {self.bucket} does not exist ({op} of {where})")
        if code in ("NoSuchKey", "NotFound") or (status == 404 and code in ("", "404")):
            return _Missing(f"{where} does not exist")
        if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return _PreconditionFailed(f"S3 {op} of {where}: {_describe(e)}")
        if is_transient(e):
            return self._unavailable(op, key, detail, retries + 1, e)
        return StoreError(f"S3 {op} of {where}{detail} failed: {_describe(e)}")

    # -- blobs ----------------------------------------------------------------

    async def _size_of(self, key: str) -> int | None:
        try:
            head = await self._call(
                "HeadObject", key, lambda c: c.head_object(Bucket=self.bucket, Key=key)
            )
        except _Missing:
            return None
        return head["ContentLength"]

    async def has_blob(self, digest: str) -> bool:
        return await self._size_of(self._blob_key(digest)) is not None

    async def put_blob(self, src: Path, digest: str, size: int) -> None:
        key = self._blob_key(digest)
        try:
            actual = src.stat().st_size
        except OSError as e:
            raise StoreError(f"cannot read blob {digest} from {src}: {e.strerror or e}") from e
        if actual != size:
            raise DigestMismatch(f"blob {digest}: {src} has {actual} bytes, expected {size}")
        # An object of the wrong size under a content address is damaged: replace it.
        if await self._size_of(key) != size:
            if size <= self.part_size:
                await self._put_single(src, digest, size, key)
            else:
                await self._put_multipart(src, digest, size, key)
            await self._write_layout()
        src.unlink(missing_ok=True)

    async def _put_single(self, src: Path, digest: str, size: int, key: str) -> None:
        """Verify the file, then stream it as one PutObject checked by S3 against the digest."""
        checksum = base64.b64encode(bytes.fromhex(hex_of(digest))).decode()
        with _open_source(src, digest) as source:
            await asyncio.to_thread(_verify_source, source, size, digest)

            async def put(c: S3Client) -> None:
                async with self._transfers:
                    await c.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=_body(source, 0, size),
                        ContentLength=size,
                        ContentType="application/octet-stream",
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=checksum,
                    )

            await self._call("PutObject", key, put, transfer=True)

    async def _put_multipart(self, src: Path, digest: str, size: int, key: str) -> None:
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        count = -(-size // part_size)
        try:
            created = await self._call(
                "CreateMultipartUpload",
                key,
                lambda c: c.create_multipart_upload(
                    Bucket=self.bucket,
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
            with _open_source(src, digest) as source:
                jobs = self._part_jobs(source, digest, size, key, upload_id, part_size, parts)
                await self._bounded(jobs)
            await self._complete(key, upload_id, parts, size)
        except _UploadGone as e:
            # Another writer of this blob swept our upload once its own was complete.
            if await self._size_of(key) != size:
                raise StoreError(
                    f"the multipart upload of {self._where(key)} was aborted by another writer"
                ) from e
        except BaseException as e:
            await self._abort(key, upload_id, e)
            raise
        finally:
            if retried:
                await self._sweep(key, keep=upload_id)

    async def _part_jobs(
        self,
        source: _File,
        digest: str,
        size: int,
        key: str,
        upload_id: str,
        part_size: int,
        parts: list[CompletedPartTypeDef],
    ) -> AsyncGenerator[Callable[[], Awaitable[None]], None]:
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
        if "sha256:" + whole.hexdigest() != digest:
            raise DigestMismatch(
                f"blob {digest}: {source.path} hashes to sha256:{whole.hexdigest()}; not uploaded"
            )

    async def _upload_part(
        self,
        source: _File,
        key: str,
        upload_id: str,
        number: int,
        offset: int,
        length: int,
        checksum: str,
        parts: list[CompletedPartTypeDef],
    ) -> None:
        async def put(c: S3Client) -> None:
            async with self._transfers:
                try:
                    resp = await c.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=_body(source, offset, length),
                        ContentLength=length,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=checksum,
                    )
                except ClientError as e:
                    if error_code(e) == "NoSuchUpload":
                        raise _UploadGone(f"{self._where(key)}: upload {upload_id} is gone") from e
                    raise
            parts[number - 1] = {
                "PartNumber": number,
                "ETag": resp["ETag"],
                "ChecksumSHA256": checksum,
            }

        detail = f" (part {number} of {len(parts)})"
        await self._call("UploadPart", key, put, transfer=True, detail=detail)

    async def _complete(
        self, key: str, upload_id: str, parts: list[CompletedPartTypeDef], size: int
    ) -> None:
        async def complete(c: S3Client) -> None:
            try:
                await c.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except ClientError as e:
                # A retry after a first try that did complete may find no upload.
                if error_code(e) != "NoSuchUpload":
                    raise
                head = await c.head_object(Bucket=self.bucket, Key=key)
                if head["ContentLength"] != size:
                    raise

        await self._call("CompleteMultipartUpload", key, complete)

    async def _abort(self, key: str, upload_id: str, cause: BaseException) -> None:
        """Abort a failed upload so no parts are left behind (and billed)."""

        async def abort(c: S3Client) -> None:
            try:
                await c.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as e:
                if error_code(e) != "NoSuchUpload":
                    raise

        try:
            # Shielded: a cancelled put (the session stopping) still aborts.
            await asyncio.shield(self._call("AbortMultipartUpload", key, abort))
        except AgentError as e:
            cause.add_note(
                f"the incomplete multipart upload {upload_id} of {self._where(key)} could not "
                f"be aborted ({e}); a bucket lifecycle rule AbortIncompleteMultipartUpload "
                "removes it"
            )

    async def _sweep(self, key: str, keep: str | None) -> None:
        """Abort the other incomplete uploads of ``key`` after a retried CreateMultipartUpload.

        A try whose answer was lost may have started an upload nobody will
        finish or abort.  S3 cannot say which upload a lost answer started
        (and emulators report no real initiation time), so every other upload
        of this content address goes: a concurrent writer of the same blob that
        loses its upload finds the blob complete (see ``_UploadGone``).  Failure
        here only leaves work for the bucket's lifecycle rule.
        """

        async def sweep(c: S3Client) -> int:
            resp = await c.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
            stale = [
                upload_id
                for u in resp.get("Uploads", [])
                if u.get("Key") == key and (upload_id := u.get("UploadId")) and upload_id != keep
            ]
            for upload_id in stale:
                with contextlib.suppress(ClientError):
                    await c.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            return len(stale)

        try:
            swept = await asyncio.shield(self._call("ListMultipartUploads", key, sweep))
        except AgentError as e:
            log.warning("s3.sweep_failed", key=self._where(key), error=str(e))
        else:
            if swept:
                log.info("s3.swept_orphan_uploads", key=self._where(key), count=swept)

    async def _bounded(self, jobs: AsyncGenerator[Callable[[], Awaitable[None]], None]) -> None:
        """Run jobs at most ``concurrency`` at a time; the first failure cancels the rest."""
        pending: set[asyncio.Task[None]] = set()

        async def settle(when: str) -> None:
            nonlocal pending
            done, pending = await asyncio.wait(pending, return_when=when)
            for task in done:
                task.result()

        try:
            async with contextlib.aclosing(jobs):
                async for job in jobs:
                    while len(pending) >= self.concurrency:
                        await settle(asyncio.FIRST_COMPLETED)
                    pending.add(asyncio.ensure_future(job()))
            while pending:
                await settle(asyncio.FIRST_EXCEPTION)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

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
            if size is not None and size >= 2 * self.part_size and self.concurrency > 1:
                await self._download_ranges(key, digest, size, tmp, verify, on_data)
            else:
                length = await self._download_whole(key, digest, size, tmp, verify)
                if on_data is not None:
                    on_data(tmp, length)
            os.replace(tmp, final)
        except _Missing as e:
            raise BlobMissing(f"blob {digest} is missing from {self.url}") from e
        except OSError as e:
            raise StoreError(
                f"cannot write blob {digest} into {dest_dir}: {e.strerror or e}"
            ) from e
        finally:
            tmp.unlink(missing_ok=True)
        return final

    async def _download_whole(
        self, key: str, digest: str, size: int | None, tmp: Path, verify: bool
    ) -> int:
        async def get(c: S3Client) -> int:
            async with self._transfers:
                resp = await c.get_object(Bucket=self.bucket, Key=key)
                body = resp["Body"]
                try:
                    length = resp["ContentLength"]
                    if size is not None and length != size:
                        raise DigestMismatch(
                            f"blob {digest} at {self._where(key)} has {length} bytes, "
                            f"expected {size}"
                        )
                    hasher = hashlib.sha256() if verify else None
                    with _File(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as file:
                        got = await _copy_body(body, length, file, 0, hasher)
                finally:
                    body.close()
            if got != length:
                raise TruncatedBody(f"{got} of {length} bytes")
            if hasher is not None and "sha256:" + hasher.hexdigest() != digest:
                raise DigestMismatch(
                    f"blob {digest} at {self._where(key)} is corrupt: its bytes hash to "
                    f"sha256:{hasher.hexdigest()}"
                )
            return got

        return await self._call("GetObject", key, get, transfer=True)

    async def _download_ranges(
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

        async def follow(file: _File) -> None:
            """Hash (when verifying) and report the ranges in order as they land."""
            hasher = hashlib.sha256() if verify else None
            for (start, end), done in zip(ranges, written, strict=True):
                await done.wait()
                if hasher is not None:
                    await asyncio.to_thread(_hash_range, file, start, end - start, hasher)
                if on_data is not None:
                    on_data(tmp, end)
            if hasher is not None and "sha256:" + hasher.hexdigest() != digest:
                raise DigestMismatch(
                    f"blob {digest} at {self._where(key)} is corrupt: its bytes hash to "
                    f"sha256:{hasher.hexdigest()}"
                )

        async def jobs(file: _File) -> AsyncGenerator[Callable[[], Awaitable[None]], None]:
            for (start, end), done in zip(ranges, written, strict=True):

                async def fetch(
                    start: int = start, end: int = end, done: asyncio.Event = done
                ) -> None:
                    await self._call(
                        "GetObject",
                        key,
                        lambda c: self._get_range(c, key, digest, size, start, end, file),
                        transfer=True,
                        detail=f" (bytes {start}-{end - 1})",
                    )
                    done.set()

                yield fetch

        with _File(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC) as file:
            file.truncate(size)
            checking = asyncio.ensure_future(follow(file))
            try:
                await self._bounded(jobs(file))
                await checking
            finally:
                checking.cancel()
                await asyncio.gather(checking, return_exceptions=True)

    async def _get_range(
        self, c: S3Client, key: str, digest: str, size: int, start: int, end: int, file: _File
    ) -> None:
        async with self._transfers:
            try:
                resp = await c.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
                )
            except ClientError as e:
                if http_status(e) == 416:  # the object ends before this range
                    raise DigestMismatch(
                        f"blob {digest} at {self._where(key)} is shorter than {size} bytes"
                    ) from e
                raise
            body = resp["Body"]
            try:
                total = resp.get("ContentRange", "").rpartition("/")[2]
                if total != str(size):
                    raise DigestMismatch(
                        f"blob {digest} at {self._where(key)} has {total or '?'} bytes, "
                        f"expected {size}"
                    )
                got = await _copy_body(body, end - start, file, start, None)
            finally:
                body.close()
        if got != end - start:
            raise TruncatedBody(f"{got} of {end - start} bytes")

    async def _write_layout(self) -> None:
        """Mark the store as an OCI image layout, as the local store does, once."""
        if self._layout_written:
            return
        key = f"{self._root}/oci-layout"
        with contextlib.suppress(_PreconditionFailed):
            await self._call(
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

    async def _read_ref(self, studio: str, name: str, key: str) -> _Ref | None:
        async def get(c: S3Client) -> tuple[bytes, str]:
            resp = await c.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, resp["ETag"]

        try:
            data, etag = await self._call("GetObject", key, get, transfer=True)
        except _Missing:
            return None
        try:
            return _Ref(decode_ref(data), etag, data)
        except (ValueError, KeyError, TypeError) as e:
            raise _InvalidRef(
                f"checkpoint {studio}/{name} at {self._where(key)} is not a valid ref: {e}"
            ) from e

    async def get_ref(self, studio: str, name: str) -> RefValue | None:
        ref = await self._read_ref(studio, name, self._ref_key(studio, name))
        return ref.value if ref else None

    async def set_ref(self, studio: str, name: str, digest: str, expect: str | None) -> None:
        key = self._ref_key(studio, name)
        current = await self._read_ref(studio, name, key)
        _check_expect(studio, name, current, expect)
        body = encode_ref(RefValue(digest, datetime.now(UTC)))

        async def put(c: S3Client) -> None:
            if current is None:
                await c.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/json",
                    IfNoneMatch="*",
                )
            else:
                await c.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/json",
                    IfMatch=current.etag,
                )

        try:
            await self._call("PutObject", key, put)
        except (_PreconditionFailed, _Missing):
            # Either another writer won, or our own first try landed and only
            # its response was lost: the document's bytes tell which.
            now = await self._read_ref(studio, name, key)
            if now is not None and now.raw == body:
                return
            _check_expect(studio, name, now, expect, force=True)

    async def delete_ref(self, studio: str, name: str, expect: str) -> None:
        key = self._ref_key(studio, name)
        current = await self._read_ref(studio, name, key)
        _check_expect(studio, name, current, expect)
        assert current is not None
        etag = current.etag
        try:
            await self._call(
                "DeleteObject",
                key,
                lambda c: c.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag),
            )
        except _Missing:
            # Gone already: deleted by our own earlier try whose answer was lost
            # (HTTP clients resend a DELETE on a dropped connection without
            # telling), or by another deleter of the same value.  Either way
            # the ref is gone, as asked, and nothing was overwritten.
            return
        except _PreconditionFailed:
            now = await self._read_ref(studio, name, key)
            _check_expect(studio, name, now, expect, force=True)

    async def list_refs(self, studio: str) -> dict[str, RefValue]:
        prefix = self._ref_key(studio, "_").rpartition("/")[0] + "/"

        async def list_keys(c: S3Client) -> list[str]:
            keys: list[str] = []
            pages = c.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            )
            async for page in pages:
                keys.extend(obj["Key"] for obj in page.get("Contents", []) if "Key" in obj)
            return keys

        keys = await self._call("ListObjectsV2", prefix, list_keys)
        names = [k[len(prefix) :] for k in keys if not k[len(prefix) :].startswith(".")]
        limit = asyncio.Semaphore(max(8, self.concurrency))

        async def read(name: str) -> tuple[str, _Ref | None]:
            async with limit:
                try:
                    return name, await self._read_ref(studio, name, prefix + name)
                except _InvalidRef:
                    return name, None  # skipped, as the local store does

        found = await asyncio.gather(*(read(n) for n in names))
        return {name: ref.value for name, ref in found if ref is not None}

    async def close(self) -> None:
        stack, self._stack, self._clients = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def _new_session() -> aioboto3.Session:
    import aioboto3

    return aioboto3.Session()


def _check_expect(
    studio: str, name: str, current: _Ref | None, expect: str | None, force: bool = False
) -> None:
    have = current.value.digest if current else None
    if force or have != expect:
        raise RefConflict(
            f"checkpoint {studio}/{name} was changed by another writer "
            f"(it points at {have or 'nothing'}, expected {expect or 'nothing'})"
        )


def _describe(e: BaseException) -> str:
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = err.get("Code") or str(http_status(e))
        message = err.get("Message", "")
        return f"{code} ({http_status(e)}){': ' + message if message else ''}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class _File:
    """A file read and written by offset from worker threads, and closed safely.

    A worker thread cannot be cancelled: the disk read or write of a transfer
    that was cancelled or failed (or aiohttp's read of a request body, in its
    executor) may still be running when its caller gives up and closes the
    file.  Every access and ``close`` share a lock, so no access can reach the
    descriptor's number after it was closed (and perhaps reused for another
    file).  The accesses are short (a MiB at most), so the lock costs nothing.
    """

    def __init__(self, path: Path, flags: int) -> None:
        self._fd = os.open(path, flags, 0o644)
        self.path = path
        self._lock = threading.Lock()
        self._closed = False

    def read_into(self, buf: memoryview, offset: int) -> int:
        with self._lock:
            self._check()
            return os.preadv(self._fd, [buf], offset)

    def write_at(self, chunks: list[bytes], offset: int) -> None:
        with self._lock:
            self._check()
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(self._fd, view, offset)
                    view, offset = view[n:], offset + n

    def truncate(self, size: int) -> None:
        with self._lock:
            self._check()
            os.ftruncate(self._fd, size)

    def _check(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path} is closed")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_source(src: Path, digest: str) -> _File:
    try:
        return _File(src, os.O_RDONLY)
    except OSError as e:
        raise StoreError(f"cannot read blob {digest} from {src}: {e.strerror or e}") from e


class _Part(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of a source, as a seekable stream.

    The request body of an upload: aiohttp reads it from disk (in its executor)
    a chunk at a time as it sends, where a part held as bytes would sit in
    memory whole, and twice over (botocore wraps bytes in a BytesIO, which
    aiohttp copies).
    """

    def __init__(self, source: _File, offset: int, length: int) -> None:
        super().__init__()
        self._source = source
        self._offset = offset
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        if base + pos < 0:
            raise ValueError(f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos

    def readinto(self, buf: WriteableBuffer) -> int:
        view = memoryview(buf).cast("B")
        n = min(len(view), self._length - self._pos)
        if n <= 0:
            return 0
        got = self._source.read_into(view[:n], self._offset + self._pos)
        if got == 0:
            end = self._offset + self._length
            raise DigestMismatch(f"{self._source.path} ends before byte {end} (did it change?)")
        self._pos += got
        return got


def _body(source: _File, offset: int, length: int) -> IO[bytes] | bytes:
    """An upload body for part of ``source`` (an empty one as bytes: nothing to stream)."""
    if length == 0:
        return b""
    # A RawIOBase is the binary file object botocore takes; the stubs only know IO.
    return cast("IO[bytes]", _Part(source, offset, length))


def _hash_range(file: _File, offset: int, length: int, *hashers: hashlib._Hash) -> None:
    """Feed ``length`` bytes of ``file`` from ``offset`` to every hasher, a chunk at a time."""
    buf = memoryview(bytearray(min(_IO_CHUNK, length) or 1))
    done = 0
    while done < length:
        n = file.read_into(buf[: min(len(buf), length - done)], offset + done)
        if n == 0:
            raise DigestMismatch(f"{file.path} ends before byte {offset + length} (did it change?)")
        for h in hashers:
            h.update(buf[:n])
        done += n


def _hash_part(source: _File, offset: int, length: int, whole: hashlib._Hash) -> str:
    """The base64 SHA-256 of one part, feeding ``whole`` with the same bytes on the way."""
    part = hashlib.sha256()
    _hash_range(source, offset, length, part, whole)
    return base64.b64encode(part.digest()).decode()


def _verify_source(source: _File, size: int, digest: str) -> None:
    """Refuse to upload a file that is not ``size`` bytes hashing to ``digest``."""
    whole = hashlib.sha256()
    _hash_range(source, 0, size, whole)
    if source.read_into(memoryview(bytearray(1)), size):
        raise DigestMismatch(f"blob {digest}: {source.path} has more than {size} bytes")
    if "sha256:" + whole.hexdigest() != digest:
        raise DigestMismatch(
            f"blob {digest}: {source.path} hashes to sha256:{whole.hexdigest()}; not uploaded"
        )


async def _copy_body(
    body: StreamingBody, length: int, file: _File, offset: int, hasher: hashlib._Hash | None
) -> int:
    """Stream a response body into ``file`` at ``offset``; return the bytes written.

    Chunks are handed to a worker thread about ``_IO_CHUNK`` at a time, as
    aiohttp returned them (not joined into one more copy), so hashing and disk
    writes run beside the network reads and a transfer holds at most that much.
    """
    got = 0
    held = 0
    chunks: list[bytes] = []
    while True:
        chunk = await body.read(_IO_CHUNK)
        if chunk:
            chunks.append(chunk)
            held += len(chunk)
            if got + held > length:
                raise TruncatedBody(f"more than the {length} bytes announced")
        if held >= _IO_CHUNK or (not chunk and chunks):
            await asyncio.to_thread(_write_at, file, offset + got, chunks, hasher)
            got += held
            held = 0
            chunks = []
        if not chunk:
            return got


def _write_at(file: _File, offset: int, chunks: list[bytes], hasher: hashlib._Hash | None) -> None:
    file.write_at(chunks, offset)
    if hasher is not None:
        for chunk in chunks:
            hasher.update(chunk)
