"""A layer stored while it is written (``Store.open_blob``), against a real S3
endpoint (moto over loopback) and through the fault proxy.

The blob that results is the one ``put_blob`` stores (and the local store
holds); its parts go to a temporary key as they fill and reach the content
address only by a copy of the completed object, conditional on its ETag; a
failure, a cancel or a kill at any step leaves no blob under the digest, no
manifest and no ref, and what it left under ``uploads/`` is cleared at the
writer's next start, or by gc unless its owner is alive.  Results are read
with a client that talks to S3 directly.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import signal
import sys
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from fault_proxy import Fault, FaultProxy
from fsutil import copy_tree, diff_snapshots, snapshot
from s3_server import S3Endpoint

from agent.errors import AgentError, BlobMissing, StoreError, StoreUnavailable
from agent.session import Session
from agent.session.gc import collect
from agent.session.lease import SessionLease
from agent.settings import Settings
from agent.statedir import create_file
from agent.store.base import BlobSink, SpooledBlob, Store
from agent.store.local import LocalStore
from agent.store.s3 import S3Store

MiB = 1 << 20
PART = 5 * MiB  # the part size of ``store_settings``
ZERO = timedelta(0)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def new_upload() -> str:
    return f"{uuid.uuid4().hex}/{uuid.uuid4().hex}"


def open_sink(store: Store, tmp_path: Path, upload: str | None = None) -> BlobSink:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    path = spool / f"layer-{uuid.uuid4().hex}.tmp"
    return store.open_blob(create_file(path), path, upload or new_upload())


async def write_all(sink: BlobSink, data: bytes, chunk: int = 1 << 20) -> None:
    """Write ``data`` from a worker thread, in ``chunk``-sized writes, as the compressor does."""

    def run() -> None:
        view = memoryview(data)
        for i in range(0, len(view), chunk):
            sink.write(view[i : i + chunk])

    await asyncio.to_thread(run)


async def stream(store: Store, tmp_path: Path, data: bytes, upload: str | None = None) -> str:
    sink = open_sink(store, tmp_path, upload)
    try:
        await write_all(sink, data)
        digest = digest_of(data)
        await sink.commit(digest, len(data))
        return digest
    finally:
        await sink.discard()


class Bucket:
    """What is really under the store's root, read straight from S3."""

    def __init__(self, endpoint: S3Endpoint, store: S3Store) -> None:
        self.admin = endpoint.admin
        self.name = store.bucket
        self.root = store.url.removeprefix(f"s3://{store.bucket}/")

    def keys(self, under: str) -> list[str]:
        resp = self.admin.list_objects_v2(Bucket=self.name, Prefix=f"{self.root}/{under}")
        return [o["Key"] for o in resp.get("Contents", [])]

    def read(self, key: str) -> bytes | None:
        try:
            body: bytes = self.admin.get_object(Bucket=self.name, Key=key)["Body"].read()
        except self.admin.exceptions.NoSuchKey:
            return None
        return body

    def blob(self, digest: str) -> bytes | None:
        return self.read(f"{self.root}/blobs/sha256/{digest.removeprefix('sha256:')}")

    def incomplete_uploads(self) -> list[str]:
        resp = self.admin.list_multipart_uploads(Bucket=self.name, Prefix=self.root + "/")
        return [u["Key"] for u in resp.get("Uploads", [])]

    def leftovers(self) -> tuple[list[str], list[str]]:
        """What is under ``uploads/``: objects, and incomplete uploads."""
        return self.keys("uploads/"), self.incomplete_uploads()


@pytest.fixture
async def store(
    fault_proxy: FaultProxy,
    s3_env: Callable[[str], None],
    s3_workdir: str,
    store_settings: Settings,
) -> AsyncIterator[S3Store]:
    s3_env(fault_proxy.endpoint_url)
    s = S3Store.from_url(
        s3_workdir, store_settings, connect_timeout=2.0, read_timeout=2.0, backoff_base=0.01
    )
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def bucket(s3_endpoint: S3Endpoint, store: S3Store) -> Bucket:
    return Bucket(s3_endpoint, store)


# -- what is stored ---------------------------------------------------------------------

SIZES = [0, MiB, PART, PART + 1, 2 * PART + 77]


@pytest.mark.parametrize("size", SIZES)
async def test_a_streamed_blob_reads_back_under_its_digest(
    any_store: Store, s3: S3Endpoint | None, tmp_path: Path, size: int
) -> None:
    data = random.Random(size).randbytes(size)
    digest = await stream(any_store, tmp_path, data)
    got = await any_store.get_blob(digest, size, tmp_path / "dest")
    assert got.read_bytes() == data
    assert [p.name for p in (tmp_path / "spool").iterdir()] == []  # consumed
    if isinstance(any_store, S3Store):
        assert s3 is not None
        left = Bucket(s3, any_store)
        assert left.leftovers() == ([], [])


async def test_streaming_an_existing_blob_refreshes_it(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    data = os.urandom(2 * PART + 5)
    digest = await stream(store, tmp_path, data)
    modified = bucket.admin.head_object(
        Bucket=bucket.name, Key=f"{bucket.root}/blobs/sha256/{digest[7:]}"
    )["LastModified"]
    copies = fault_proxy.count("CopyObject")
    assert await stream(store, tmp_path, data) == digest
    assert fault_proxy.count("CopyObject") == copies + 1  # the refresh, not the copy too
    assert bucket.blob(digest) == data
    head = bucket.admin.head_object(
        Bucket=bucket.name, Key=f"{bucket.root}/blobs/sha256/{digest[7:]}"
    )
    assert head["LastModified"] >= modified
    assert bucket.leftovers() == ([], [])


async def test_parts_go_to_the_temporary_key_and_reach_the_address_by_a_checked_copy(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    data = os.urandom(2 * PART + 77)
    upload = new_upload()
    digest = await stream(store, tmp_path, data, upload)
    temp = f"/{bucket.name}/{bucket.root}/uploads/{upload}"
    parts = [s for s in fault_proxy.seen if s.operation == "UploadPart"]
    assert {s.path for s in parts} == {temp}
    # Each part names the CRC32 of its bytes, which S3 checks.
    chunks = [data[i : i + PART] for i in range(0, len(data), PART)]
    crcs = sorted(s.headers["x-amz-checksum-crc32"] for s in parts)
    assert crcs == sorted(
        base64.b64encode(zlib.crc32(c).to_bytes(4, "big")).decode() for c in chunks
    )
    # Nothing is written under blobs/ but by the copy of the completed object,
    # only while it is the object this writer completed, and with S3's CRC32 of
    # the whole copy (checked against the bytes written), which the blob keeps.
    to_blobs = [s for s in fault_proxy.seen if "/blobs/" in s.path and s.operation != "HeadObject"]
    assert [s.operation for s in to_blobs] == ["CopyObject"]
    etag = hashlib.md5(b"".join(hashlib.md5(c).digest() for c in chunks)).hexdigest()
    copy = to_blobs[0].headers
    assert copy["x-amz-copy-source"].endswith(f"/uploads/{upload}")
    assert copy["x-amz-copy-source-if-match"].strip('"') == f"{etag}-{len(chunks)}"
    assert copy["x-amz-checksum-algorithm"] == "CRC32"
    assert bucket.blob(digest) == data
    head = bucket.admin.head_object(
        Bucket=bucket.name, Key=f"{bucket.root}/blobs/sha256/{digest[7:]}", ChecksumMode="ENABLED"
    )
    assert head["ChecksumCRC32"] == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


async def test_a_blob_within_one_part_is_one_put_checked_against_its_digest(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    data = os.urandom(PART)
    digest = await stream(store, tmp_path, data)
    ops = [s.operation for s in fault_proxy.seen if s.operation not in ("HeadObject",)]
    assert "CreateMultipartUpload" not in ops and "CopyObject" not in ops
    put = next(s for s in fault_proxy.seen if s.operation == "PutObject" and "/blobs/" in s.path)
    assert (
        put.headers["x-amz-checksum-sha256"] == base64.b64encode(bytes.fromhex(digest[7:])).decode()
    )


async def test_with_streaming_off_a_layer_is_put_once_written(
    fault_proxy: FaultProxy, s3_workdir: str, s3_endpoint: S3Endpoint, store: S3Store,
    store_settings: Settings, tmp_path: Path,
) -> None:  # fmt: skip
    off = S3Store.from_url(
        s3_workdir, store_settings.model_copy(update={"s3_stream_uploads": False})
    )
    try:
        sink = open_sink(off, tmp_path)
        assert isinstance(sink, SpooledBlob)
        data = os.urandom(2 * PART + 1)
        try:
            await write_all(sink, data)
            assert fault_proxy.seen == []  # nothing sent while it is written
            await sink.commit(digest_of(data), len(data))
        finally:
            await sink.discard()
    finally:
        await off.close()
    assert not any("/uploads/" in s.path for s in fault_proxy.seen)
    assert Bucket(s3_endpoint, store).blob(digest_of(data)) == data


# -- what a failure leaves ----------------------------------------------------------------


@pytest.mark.parametrize(
    "op,action,status",
    [
        ("UploadPart", "status", 503),
        ("CreateMultipartUpload", "status", 503),
        ("CompleteMultipartUpload", "status", 503),
        ("CopyObject", "status", 503),
        ("CopyObject", "status", 412),  # what S3 answers when the temporary object changed
    ],
)
async def test_a_failed_stream_leaves_no_blob_and_no_upload(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy, tmp_path: Path, op: str, action: str,
    status: int,
) -> None:  # fmt: skip
    code = {412: "PreconditionFailed", 503: "SlowDown"}[status]
    fault_proxy.add(Fault("status", operation=op, times=None, status=status, code=code))
    data = os.urandom(3 * PART + 1)
    sink = open_sink(store, tmp_path)
    try:
        with pytest.raises(AgentError):
            await write_all(sink, data)
            await sink.commit(digest_of(data), len(data))
    finally:
        await sink.discard()
    fault_proxy.clear()
    assert bucket.blob(digest_of(data)) is None
    assert bucket.leftovers() == ([], [])


async def test_a_cancelled_stream_leaves_nothing(
    store: S3Store, bucket: Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    fault_proxy.add(Fault("stall", operation="UploadPart", times=None))
    data = os.urandom(3 * PART)
    sink = open_sink(store, tmp_path)
    await write_all(sink, data)
    task = asyncio.ensure_future(sink.commit(digest_of(data), len(data)))
    async with asyncio.timeout(30):
        while fault_proxy.count("UploadPart", "stall") == 0:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sink.discard()
    fault_proxy.clear()
    assert bucket.blob(digest_of(data)) is None
    assert bucket.leftovers() == ([], [])


async def test_writes_stop_once_the_upload_failed(
    store: S3Store, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A layer that cannot be stored stops being compressed, rather than run to its end."""
    fault_proxy.add(Fault("status", operation="UploadPart", times=None, code="AccessDenied",
                          status=403))  # fmt: skip
    sink = open_sink(store, tmp_path)
    chunk = os.urandom(MiB)
    try:
        with pytest.raises(StoreError, match="UploadPart"):
            async with asyncio.timeout(60):
                while True:
                    await asyncio.to_thread(sink.write, chunk)
                    await asyncio.sleep(0)
    finally:
        await sink.discard()


# -- crafted objects under uploads/ ------------------------------------------------------


async def test_a_crafted_temporary_object_is_never_a_blob(
    store: S3Store, bucket: Bucket, tmp_path: Path
) -> None:
    data = os.urandom(1000)
    digest = digest_of(data)
    hexd = digest[7:]
    dead, alive = uuid.uuid4().hex, uuid.uuid4().hex
    planted = [
        f"{bucket.root}/uploads/{hexd}",
        f"{bucket.root}/uploads/{dead}/{hexd[:32]}",
        f"{bucket.root}/uploads/{alive}/{hexd[:32]}",
        f"{bucket.root}/uploads/blobs/sha256/{hexd}",
    ]
    for key in planted:
        bucket.admin.put_object(Bucket=bucket.name, Key=key, Body=data)
    partial = bucket.admin.create_multipart_upload(
        Bucket=bucket.name, Key=f"{bucket.root}/uploads/{dead}/{uuid.uuid4().hex}"
    )
    bucket.admin.upload_part(Bucket=bucket.name, Key=partial["Key"], PartNumber=1,
                             UploadId=partial["UploadId"], Body=data)  # fmt: skip
    assert not await store.has_blob(digest)
    assert await store.blob_size(digest) is None
    with pytest.raises(BlobMissing):
        await store.get_blob(digest, None, tmp_path / "dest")
    assert [b async for page in store.iter_blobs() for b in page] == []
    # gc takes them as leftovers, never as blobs, and spares a live owner's.
    lease = SessionLease(store, "s1", holder=alive)
    await lease.hold([])
    report = await collect(store, tmp_path / "gc", grace=ZERO, leftover_age=ZERO)
    assert report.deleted == 0 and report.refused is None
    assert len(report.leftovers) == 4
    assert bucket.keys("uploads/") == [f"{bucket.root}/uploads/{alive}/{hexd[:32]}"]
    assert bucket.incomplete_uploads() == []
    await lease.release()
    await collect(store, tmp_path / "gc", grace=ZERO, leftover_age=ZERO)
    assert bucket.leftovers() == ([], [])


# -- checkpoints --------------------------------------------------------------------------


def fill_root(root: Path, seed: int, mib: int) -> None:
    """Incompressible files, so the layer spans several parts; and a few small ones."""
    rnd = random.Random(seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i in range(mib):
        (root / "data" / f"blob{i}.bin").write_bytes(rnd.randbytes(MiB))
    for i in range(20):
        (root / "data" / f"small{i}.txt").write_text(f"{seed} {i}\n" * (i + 1))


def session_settings(root: Path, workdir: str, state: Path) -> Settings:
    return Settings(
        root=root, workdir=workdir, studio="s", state_dir=state, s3_part_size=PART,
        compression_threads=1, s3_segment_size=0,  # one blob a layer: streamed
    )  # fmt: skip


async def test_a_checkpoint_through_s3_stores_what_the_local_store_holds(
    s3_workdir: str, s3_endpoint: S3Endpoint, store_settings: Settings, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    fill_root(source, 1, 12)
    layers = {}
    for name, workdir in (("local", str(tmp_path / "work")), ("s3", s3_workdir)):
        root = tmp_path / f"root-{name}"
        root.mkdir()
        settings = session_settings(root, workdir, tmp_path / f"state-{name}")
        store: Store = (
            LocalStore(Path(workdir)) if name == "local" else S3Store.from_url(workdir, settings)
        )
        try:
            session = Session(settings, store)
            await session.baseline()
            copy_tree(source, root)  # the same tree, mtimes and all, new to both
            os.utime(root, (1_700_000_000, 1_700_000_000))
            assert await session.checkpoint("full") is not None
            digest = session.chain[-1].digest
            path = await store.get_blob(digest, None, tmp_path / f"get-{name}")
            layers[name] = (digest, path.read_bytes())
            await session.release_lease()
        finally:
            await store.close()
        assert list((tmp_path / f"state-{name}" / "spool").iterdir()) == []
    assert len(layers["local"][1]) > 2 * PART
    assert layers["s3"][0] == layers["local"][0]
    assert layers["s3"][1] == layers["local"][1]
    bucket = Bucket(s3_endpoint, S3Store.from_url(s3_workdir, store_settings))
    assert bucket.leftovers() == ([], [])


async def test_a_checkpoint_whose_upload_fails_writes_nothing(
    fault_proxy: FaultProxy,
    s3_env: Callable[[str], None],
    s3_workdir: str,
    s3_endpoint: S3Endpoint,
    store_settings: Settings,
    tmp_path: Path,
) -> None:
    s3_env(fault_proxy.endpoint_url)
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    settings = session_settings(root, s3_workdir, state)
    store = S3Store.from_url(s3_workdir, settings, backoff_base=0.01)
    bucket = Bucket(s3_endpoint, store)
    try:
        session = Session(settings, store)
        await session.baseline()
        fill_root(root, 2, 12)
        fault_proxy.add(Fault("status", operation="UploadPart", skip=1, times=None))
        with pytest.raises(StoreUnavailable, match="UploadPart"):
            await session.checkpoint("work")
        fault_proxy.clear()
        assert bucket.keys("blobs/") == [] and bucket.keys("refs/") == []
        assert bucket.leftovers() == ([], [])
        assert list((state / "spool").iterdir()) == []
        # The session carries on: the next checkpoint holds every change.
        result = await session.checkpoint("work")
        assert result is not None and result.changed > 12
        await session.release_lease()
    finally:
        await store.close()
    assert bucket.leftovers() == ([], [])


@pytest.mark.parametrize(
    "op,skip",
    [
        ("UploadPart", 1),  # the second part: the layer still being written
        ("CompleteMultipartUpload", 0),  # every part stored, the upload incomplete
        ("CopyObject", 0),  # the temporary object complete, not yet a blob
    ],
)
async def test_a_checkpoint_killed_mid_upload_leaves_nothing_the_next_start_keeps(
    fault_proxy: FaultProxy,
    s3_env: Callable[[str], None],
    s3_workdir: str,
    s3_endpoint: S3Endpoint,
    store_settings: Settings,
    tmp_path: Path,
    op: str,
    skip: int,
) -> None:
    s3_env(fault_proxy.endpoint_url)
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    bucket = Bucket(s3_endpoint, S3Store.from_url(s3_workdir, store_settings))

    async def agent(*args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "--root", str(root), "--workdir", s3_workdir,
            "--studio", "k", "--state-dir", str(state), "--s3-part-size", str(PART),
            "--s3-segment-size", "0", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def run(*args: str) -> None:
        proc = await agent(*args)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()

    await run("baseline")
    fill_root(root, 3, 16)
    fault_proxy.add(Fault("stall", operation=op, skip=skip, times=None))
    proc = await agent("checkpoint", "--name", "work")
    async with asyncio.timeout(120):
        while fault_proxy.count(op, "stall") == 0:
            await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    await proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    fault_proxy.clear()

    assert bucket.keys("blobs/") == [] and bucket.keys("refs/") == []
    objects, uploads = bucket.leftovers()
    assert len(objects) + len(uploads) == 1  # what it left, under its own name
    (spooled,) = list((state / "spool").iterdir())
    owner, ident = spooled.name.removeprefix("layer-").removesuffix(".tmp").split("-")
    assert (objects + uploads)[0] == f"{bucket.root}/uploads/{owner}/{ident}"

    # The next start clears it; the checkpoint it makes holds everything.
    await run("checkpoint", "--name", "work")
    assert bucket.leftovers() == ([], [])
    assert list((state / "spool").iterdir()) == []
    target = tmp_path / "target"
    target.mkdir()
    await run_restore(s3_workdir, target, tmp_path / "state2")
    assert diff_snapshots(snapshot(root), snapshot(target)) == []


async def run_restore(workdir: str, target: Path, state: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "--root", str(target), "--workdir", workdir,
        "--studio", "k", "--state-dir", str(state), "restore", "--checkpoint", "work",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
