"""What the S3 store puts on the wire for blobs: their bytes are hashed once, by the store.

Every upload names the SHA-256 of its body in a signed ``x-amz-checksum-sha256``
header (a single PutObject names the blob's digest itself), which S3 verifies;
the payload goes unsigned, so botocore neither reads and hashes each part again
for the signature nor adds a CRC32 of its own.  Downloads are verified against
the digest, so botocore is not asked to check stored checksums too.  Requests
are watched through the fault proxy, which forwards them untouched.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fault_proxy import FaultProxy, Seen

from agent.settings import Settings
from agent.store.s3 import S3Store

MiB = 1 << 20
PART = 5 * MiB  # the part size of ``store_settings``


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@pytest.fixture
async def store(
    fault_proxy: FaultProxy,
    s3_env: Callable[[str], None],
    s3_workdir: str,
    store_settings: Settings,
) -> AsyncIterator[S3Store]:
    s3_env(fault_proxy.endpoint_url)
    s = S3Store.from_url(s3_workdir, store_settings)
    try:
        yield s
    finally:
        await s.close()


def blob_requests(proxy: FaultProxy, *operations: str) -> list[Seen]:
    return [s for s in proxy.seen if s.operation in operations and "/blobs/" in s.path]


async def test_uploads_name_their_sha256_and_send_the_payload_unsigned(
    store: S3Store, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    small, large = os.urandom(MiB), os.urandom(2 * PART + 77)
    for data in (small, large):
        src = tmp_path / os.urandom(6).hex()
        src.write_bytes(data)
        await store.put_blob(src, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))

    (single,) = blob_requests(fault_proxy, "PutObject")
    assert single.headers["x-amz-checksum-sha256"] == sha256_b64(small)
    parts = blob_requests(fault_proxy, "UploadPart")
    want = [sha256_b64(large[i : i + PART]) for i in range(0, len(large), PART)]
    assert sorted(p.headers["x-amz-checksum-sha256"] for p in parts) == sorted(want)
    (create,) = blob_requests(fault_proxy, "CreateMultipartUpload")
    assert create.headers["x-amz-checksum-algorithm"] == "SHA256"
    for upload in [single, *parts]:
        assert upload.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        assert "x-amz-checksum-sha256" in upload.headers["authorization"]  # signed
        checksums = {h for h in upload.headers if h.startswith("x-amz-checksum-")}
        assert checksums == {"x-amz-checksum-sha256"}


async def test_downloads_do_not_ask_for_stored_checksums(
    store: S3Store, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    for data in (os.urandom(MiB), os.urandom(2 * PART + 77)):
        src = tmp_path / os.urandom(6).hex()
        src.write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        await store.put_blob(src, digest, len(data))
        got = await store.get_blob(digest, len(data), tmp_path / "dest")
        assert got.read_bytes() == data
    gets = blob_requests(fault_proxy, "GetObject")
    assert len(gets) == 1 + 3  # one whole object, and one blob in three ranges
    assert all("x-amz-checksum-mode" not in g.headers for g in gets)
