"""The S3 store under the faults of real networks and real S3.

Every put either completes and reads back, or fails with a clear error that
names the operation and the key; either way no incomplete multipart upload is
left behind and what was stored before is intact.  Results are checked with a
separate client that talks to S3 directly, not through the faulty proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fault_proxy import Action, Fault, FaultProxy
from s3_server import S3Endpoint

from agent.errors import (
    ConfigError,
    DigestMismatch,
    PermissionDenied,
    RefConflict,
    StoreError,
    StoreUnavailable,
)
from agent.settings import Settings
from agent.store.refs import decode_ref
from agent.store.s3 import S3Store

MiB = 1 << 20
SMALL = 1 * MiB  # one PutObject
LARGE = 11 * MiB + 3  # three 5 MiB parts; read back with ranged GETs
READ_TIMEOUT = 2.0
CHAOS_RATE = 0.12


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def src_file(tmp_path: Path, data: bytes) -> Path:
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    path = d / os.urandom(6).hex()
    path.write_bytes(data)
    return path


class Bucket:
    """What is really in the bucket, read straight from S3."""

    def __init__(self, endpoint: S3Endpoint, store: S3Store) -> None:
        self.admin = endpoint.admin
        self.name = store.bucket
        self.root = store.url.removeprefix(f"s3://{store.bucket}/")

    def blob_key(self, digest: str) -> str:
        return f"{self.root}/blobs/sha256/{digest.split(':')[1]}"

    def ref_key(self, studio: str, name: str) -> str:
        return f"{self.root}/refs/{studio}/{name}"

    def read(self, key: str) -> bytes | None:
        try:
            body: bytes = self.admin.get_object(Bucket=self.name, Key=key)["Body"].read()
        except self.admin.exceptions.NoSuchKey:
            return None
        return body

    def blob_ok(self, digest: str) -> bool:
        data = self.read(self.blob_key(digest))
        return data is not None and digest_of(data) == digest

    def ref_digest(self, studio: str, name: str) -> str | None:
        data = self.read(self.ref_key(studio, name))
        return decode_ref(data).digest if data is not None else None

    def incomplete_uploads(self) -> list[str]:
        resp = self.admin.list_multipart_uploads(Bucket=self.name, Prefix=self.root + "/")
        return [u["Key"] for u in resp.get("Uploads", [])]


@pytest.fixture
def make_store(
    fault_proxy: FaultProxy,
    s3_env: Callable[[str], None],
    s3_workdir: str,
    store_settings: Settings,
) -> Callable[..., S3Store]:
    s3_env(fault_proxy.endpoint_url)

    def make(**settings: int) -> S3Store:
        return S3Store.from_url(
            s3_workdir,
            store_settings.model_copy(update=settings),
            connect_timeout=READ_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            backoff_base=0.01,
        )

    return make


@pytest.fixture
async def store(make_store: Callable[..., S3Store]) -> AsyncIterator[S3Store]:
    s = make_store()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def bucket(s3_endpoint: S3Endpoint, store: S3Store) -> Bucket:
    return Bucket(s3_endpoint, store)


@pytest.fixture
async def earlier(store: S3Store, bucket: Bucket, tmp_path: Path) -> AsyncIterator[str]:
    """A blob and a ref stored before the faults start; they must survive them."""
    data = os.urandom(SMALL)
    digest = digest_of(data)
    await store.put_blob(src_file(tmp_path, data), digest, len(data))
    await store.set_ref("s1", "earlier", digest, expect=None)
    yield digest
    assert bucket.blob_ok(digest)
    assert bucket.ref_digest("s1", "earlier") == digest
    assert bucket.incomplete_uploads() == []


def fault(op: str, action: Action, *, times: int | None = 1, status: int = 503) -> Fault:
    """A fault on blob traffic (PutObject of the oci-layout marker is left alone)."""
    code = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}[status]
    path = "/blobs/" if op == "PutObject" else ""
    return Fault(action, operation=op, path=path, times=times, status=status, code=code)


# -- puts that recover ----------------------------------------------------------

RECOVERABLE = [
    ("UploadPart", "reset", 503, LARGE),
    ("UploadPart", "lose_response", 503, LARGE),
    ("UploadPart", "status", 500, LARGE),
    ("UploadPart", "status", 503, LARGE),
    ("UploadPart", "stall", 503, LARGE),
    ("CreateMultipartUpload", "status", 503, LARGE),
    ("CreateMultipartUpload", "lose_response", 503, LARGE),
    ("CompleteMultipartUpload", "lose_response", 503, LARGE),
    ("CompleteMultipartUpload", "status", 500, LARGE),
    ("PutObject", "reset", 503, SMALL),
    ("PutObject", "lose_response", 503, SMALL),
    ("PutObject", "status", 503, SMALL),
    ("PutObject", "stall", 503, SMALL),
    ("HeadObject", "reset", 503, SMALL),
    ("HeadObject", "status", 503, SMALL),
]


@pytest.mark.parametrize("op,action,status,size", RECOVERABLE)
async def test_put_recovers_from_transient_faults(
    store: S3Store,
    bucket: Bucket,
    fault_proxy: FaultProxy,
    earlier: str,
    tmp_path: Path,
    op: str,
    action: Action,
    status: int,
    size: int,
) -> None:
    # Two failures in a row where a retry is cheap; the third try succeeds.
    times = 2 if action in ("status", "reset") else 1
    f = fault_proxy.add(fault(op, action, times=times, status=status))
    data = os.urandom(size)
    digest = digest_of(data)
    await store.put_blob(src_file(tmp_path, data), digest, size)
    assert f.fired == times
    assert bucket.blob_ok(digest)
    assert bucket.incomplete_uploads() == []
    got = await store.get_blob(digest, size, tmp_path / "dest")
    assert got.read_bytes() == data


# -- puts that fail --------------------------------------------------------------

PERSISTENT = [
    ("UploadPart", "status", 503, LARGE),
    ("UploadPart", "reset", 503, LARGE),
    ("CreateMultipartUpload", "lose_response", 503, LARGE),
    ("CompleteMultipartUpload", "status", 500, LARGE),
    ("PutObject", "reset", 503, SMALL),
    ("PutObject", "stall", 503, SMALL),
]


@pytest.mark.parametrize("op,action,status,size", PERSISTENT)
async def test_put_that_keeps_failing_fails_cleanly(
    store: S3Store,
    bucket: Bucket,
    fault_proxy: FaultProxy,
    earlier: str,
    tmp_path: Path,
    op: str,
    action: Action,
    status: int,
    size: int,
) -> None:
    fault_proxy.add(fault(op, action, times=None, status=status))
    data = os.urandom(size)
    digest = digest_of(data)
    src = src_file(tmp_path, data)
    with pytest.raises(StoreUnavailable) as e:
        await store.put_blob(src, digest, size)
    message = str(e.value)
    assert f"S3 {op} of s3://{bucket.name}/{bucket.blob_key(digest)}" in message
    assert "failed after 3 tries" in message
    assert bucket.read(bucket.blob_key(digest)) is None
    assert bucket.incomplete_uploads() == []
    assert src.exists()  # the caller still has the data to try again


async def test_abort_is_retried(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy, earlier: str, tmp_path: Path
) -> None:
    fault_proxy.add(fault("UploadPart", "status", times=None))
    fault_proxy.add(fault("AbortMultipartUpload", "lose_response", times=1))
    data = os.urandom(LARGE)
    with pytest.raises(StoreUnavailable, match="UploadPart"):
        await store.put_blob(src_file(tmp_path, data), digest_of(data), LARGE)
    assert fault_proxy.count("AbortMultipartUpload") >= 2
    assert bucket.incomplete_uploads() == []


async def test_cancelled_put_aborts_its_upload(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy, earlier: str, tmp_path: Path
) -> None:
    """A session stopping mid-upload (the put task cancelled) leaves no parts behind."""
    fault_proxy.add(fault("UploadPart", "stall", times=None))
    data = os.urandom(LARGE)
    task = asyncio.create_task(store.put_blob(src_file(tmp_path, data), digest_of(data), LARGE))
    async with asyncio.timeout(30):
        while fault_proxy.count("UploadPart", "stall") == 0:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bucket.incomplete_uploads() == []
    assert bucket.read(bucket.blob_key(digest_of(data))) is None


async def test_concurrent_puts_of_one_blob_after_a_lost_create(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A lost CreateMultipartUpload answer's upload is swept; other writers still succeed."""
    f = fault_proxy.add(fault("CreateMultipartUpload", "lose_response"))
    data = os.urandom(LARGE)
    digest = digest_of(data)
    await asyncio.gather(
        *(store.put_blob(src_file(tmp_path, data), digest, LARGE) for _ in range(3))
    )
    assert f.fired == 1
    assert bucket.blob_ok(digest)
    assert bucket.incomplete_uploads() == []


@pytest.mark.parametrize("size", [SMALL, LARGE])
async def test_put_refuses_bytes_that_do_not_match_the_digest(
    store: S3Store, bucket: Bucket, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    wrong = digest_of(data + b"x")
    with pytest.raises(DigestMismatch):
        await store.put_blob(src_file(tmp_path, data), wrong, size)
    assert bucket.read(bucket.blob_key(wrong)) is None
    assert bucket.incomplete_uploads() == []


@pytest.mark.parametrize("size", [SMALL, LARGE])
async def test_existing_blob_is_not_uploaded_again(
    store: S3Store, fault_proxy: FaultProxy, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    digest = digest_of(data)
    await store.put_blob(src_file(tmp_path, data), digest, size)
    uploads = ("PutObject", "UploadPart", "CreateMultipartUpload")
    before = {op: fault_proxy.count(op) for op in uploads}
    copies = fault_proxy.count("CopyObject")
    src = src_file(tmp_path, data)
    await store.put_blob(src, digest, size)
    assert {op: fault_proxy.count(op) for op in uploads} == before
    assert fault_proxy.count("CopyObject") == copies + 1  # refreshed in place instead
    assert not src.exists()  # consumed, as a put that uploads consumes it


# -- reads -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [SMALL, LARGE])
@pytest.mark.parametrize("action", ["truncate", "reset", "stall", "status"])
async def test_get_recovers_from_transient_faults(
    store: S3Store, fault_proxy: FaultProxy, tmp_path: Path, size: int, action: Action
) -> None:
    data = os.urandom(size)
    digest = digest_of(data)
    await store.put_blob(src_file(tmp_path, data), digest, size)
    f = fault_proxy.add(fault("GetObject", action, times=2 if action != "stall" else 1))
    got = await store.get_blob(digest, size, tmp_path / "dest")
    assert got.read_bytes() == data
    assert f.fired == f.times


@pytest.mark.parametrize("size", [SMALL, LARGE])
async def test_get_that_keeps_failing_leaves_nothing(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    digest = digest_of(data)
    await store.put_blob(src_file(tmp_path, data), digest, size)
    fault_proxy.add(fault("GetObject", "truncate", times=None))
    dest = tmp_path / "dest"
    with pytest.raises(StoreUnavailable, match=f"GetObject of s3://{bucket.name}/.*after 3 tries"):
        await store.get_blob(digest, size, dest)
    assert list(dest.iterdir()) == []


# -- refs ------------------------------------------------------------------------


async def test_ref_writes_whose_answer_was_lost(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy
) -> None:
    """The write landed but its answer did not: the retry must not report a conflict."""
    a, b = digest_of(b"a"), digest_of(b"b")
    fault_proxy.add(Fault("lose_response", operation="PutObject", path="/refs/"))
    await store.set_ref("s1", "cp", a, expect=None)  # If-None-Match: * retried
    fault_proxy.add(Fault("lose_response", operation="PutObject", path="/refs/"))
    await store.set_ref("s1", "cp", b, expect=a)  # If-Match retried
    assert bucket.ref_digest("s1", "cp") == b
    fault_proxy.add(Fault("lose_response", operation="DeleteObject", path="/refs/"))
    await store.delete_ref("s1", "cp", expect=b)
    assert bucket.ref_digest("s1", "cp") is None
    assert fault_proxy.count("PutObject", "lose_response") == 2
    assert fault_proxy.count("DeleteObject", "lose_response") == 1


async def test_ref_reads_and_lists_recover(store: S3Store, fault_proxy: FaultProxy) -> None:
    a = digest_of(b"a")
    await store.set_ref("s1", "cp", a, expect=None)
    fault_proxy.add(Fault("truncate", operation="GetObject", path="/refs/"))
    assert (await store.get_ref("s1", "cp")).digest == a  # type: ignore[union-attr]
    fault_proxy.add(Fault("status", operation="ListObjectsV2", times=2))
    fault_proxy.add(Fault("reset", operation="GetObject", path="/refs/"))
    assert set(await store.list_refs("s1")) == {"cp"}


async def test_ref_write_that_keeps_failing(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy, earlier: str
) -> None:
    fault_proxy.add(Fault("status", operation="PutObject", path="/refs/", times=None))
    with pytest.raises(StoreUnavailable, match=r"PutObject of .*/refs/s1/earlier failed after"):
        await store.set_ref("s1", "earlier", digest_of(b"new"), expect=earlier)
    assert bucket.ref_digest("s1", "earlier") == earlier


# -- permissions -----------------------------------------------------------------

PERMISSIONS = [
    ("DeleteObject", "s3:DeleteObject on s3://{bucket}/{root}/refs/s1/earlier"),
    ("PutObject", "s3:PutObject on s3://{bucket}/{root}/blobs/sha256/"),
    ("UploadPart", "s3:PutObject on s3://{bucket}/{root}/blobs/sha256/"),
    ("HeadObject", "s3:GetObject on s3://{bucket}/{root}/blobs/sha256/"),
    ("GetObject", "s3:GetObject on s3://{bucket}/{root}/refs/s1/earlier"),
    ("ListObjectsV2", "s3:ListBucket on s3://{bucket}:"),
]


@pytest.mark.parametrize("op,needs", PERMISSIONS)
async def test_missing_permission_names_the_action(
    store: S3Store,
    bucket: Bucket,
    fault_proxy: FaultProxy,
    earlier: str,
    tmp_path: Path,
    op: str,
    needs: str,
) -> None:
    f = fault_proxy.add(fault(op, "status", times=None, status=403))
    size = LARGE if op == "UploadPart" else SMALL
    data = os.urandom(size)
    with pytest.raises(PermissionDenied) as e:
        if op == "DeleteObject":
            await store.delete_ref("s1", "earlier", expect=earlier)
        elif op == "GetObject":
            await store.get_ref("s1", "earlier")
        elif op == "ListObjectsV2":
            await store.list_refs("s1")
        else:
            await store.put_blob(src_file(tmp_path, data), digest_of(data), size)
    assert needs.format(bucket=bucket.name, root=bucket.root) in str(e.value)
    assert f.fired <= (store.concurrency if op == "UploadPart" else 1)  # refusals aren't retried


# -- everything at once ----------------------------------------------------------


async def test_random_faults_never_lose_or_half_write_anything(
    make_store: Callable[..., S3Store],
    s3_endpoint: S3Endpoint,
    fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    store = make_store(s3_max_attempts=8)
    bucket = Bucket(s3_endpoint, store)
    try:
        kept = os.urandom(SMALL)
        await store.put_blob(src_file(tmp_path, kept), digest_of(kept), SMALL)
        await store.set_ref("s1", "kept", digest_of(kept), expect=None)

        fault_proxy.chaos_rate = CHAOS_RATE
        blobs = [os.urandom(SMALL if i % 2 else LARGE) for i in range(6)]
        outcomes: dict[str, BaseException | None] = {}

        async def one(i: int, data: bytes) -> None:
            digest = digest_of(data)
            try:
                await store.put_blob(src_file(tmp_path, data), digest, len(data))
                await store.set_ref("s1", f"cp{i}", digest, expect=None)
                outcomes[digest] = None
            except StoreError as e:
                outcomes[digest] = e

        await asyncio.gather(*(one(i, d) for i, d in enumerate(blobs)))
        fault_proxy.clear()

        injected = sum(1 for s in fault_proxy.seen if s.fault is not None)
        assert injected > 0
        for i, data in enumerate(blobs):
            digest = digest_of(data)
            error = outcomes[digest]
            if error is None:
                assert bucket.blob_ok(digest)
                assert bucket.ref_digest("s1", f"cp{i}") == digest
                got = await store.get_blob(digest, len(data), tmp_path / "dest")
                assert got.read_bytes() == data
            else:
                assert not isinstance(error, RefConflict), error
                # Failed: the blob is absent or whole, never partial.
                stored = bucket.read(bucket.blob_key(digest))
                assert stored is None or stored == data
        assert bucket.incomplete_uploads() == []
        assert bucket.blob_ok(digest_of(kept))
        assert bucket.ref_digest("s1", "kept") == digest_of(kept)
    finally:
        await store.close()


async def test_prepare_opens_the_clients_and_a_bad_endpoint_is_a_clear_error(
    s3_env: Callable[[str], None], s3_workdir: str, store_settings: Settings
) -> None:
    """``prepare`` (run while a checkpoint compresses) gets the clients ready and
    never raises; what it met is reported by the first real request."""
    store = S3Store.from_url(s3_workdir, store_settings)
    try:
        await store.prepare()
        assert store._conn.is_open
        assert await store.list_refs("s") == {}
    finally:
        await store.close()
    s3_env("not a url")
    store = S3Store.from_url(s3_workdir, store_settings)
    try:
        await store.prepare()
        assert not store._conn.is_open
        with pytest.raises(ConfigError, match=r"cannot set up S3 .*Invalid endpoint: not a url"):
            await store.list_refs("s")
    finally:
        await store.close()
