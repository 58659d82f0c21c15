"""Shared fixtures: a real S3 endpoint, S3 work directories, and both stores.

The S3 tests run against moto in server mode on 127.0.0.1, started once per
session.  Set ``STUDIO_TEST_S3_ENDPOINT`` (with the usual AWS credential
variables, and optionally ``STUDIO_TEST_S3_BUCKET`` for a bucket that already
exists) to run the same tests against any other S3 endpoint.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
from fault_proxy import FaultProxy
from s3_server import LocalS3Server, S3Endpoint

from agent.settings import Settings, load_settings
from agent.store.base import Store
from agent.store.local import LocalStore
from agent.store.s3 import S3Store

_LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """The S3 endpoint of this test session, with one bucket for all tests."""
    external = os.environ.get("STUDIO_TEST_S3_ENDPOINT", "")
    server: LocalS3Server | None = None
    if external:
        url = external
        admin = boto3.client("s3", endpoint_url=url)
    else:
        server = LocalS3Server()
        server.start()
        url = server.endpoint_url
        admin = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=_LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
    bucket = os.environ.get("STUDIO_TEST_S3_BUCKET", "") if external else ""
    created = not bucket
    if created:
        bucket = f"studio-test-{uuid.uuid4().hex[:12]}"
        admin.create_bucket(Bucket=bucket)
    try:
        yield S3Endpoint(url, bucket, bool(external), admin)
    finally:
        if created and external:
            _empty(admin, bucket, "")
            admin.delete_bucket(Bucket=bucket)
        if server is not None:
            server.stop()


def _empty(admin: Any, bucket: str, prefix: str) -> None:
    """Delete every object and abort every upload under ``prefix``."""
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            admin.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    uploads = admin.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    for u in uploads:
        admin.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])


@pytest.fixture
def s3_env(
    s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[[str], None]:
    """Point the AWS configuration chain at the test endpoint (or at a proxy of it).

    Against the local server the developer's own AWS configuration is hidden,
    so nothing here can reach a real account.
    """
    if not s3_endpoint.external:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        for name, value in _LOCAL_CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def point_at(endpoint_url: str) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint_url)

    point_at(s3_endpoint.url)
    return point_at


@pytest.fixture
def s3_workdir(s3_endpoint: S3Endpoint, s3_env: Callable[[str], None]) -> Iterator[str]:
    """``s3://bucket/prefix`` under a fresh prefix, with the environment set to reach it."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    yield f"s3://{s3_endpoint.bucket}/{prefix}"
    _empty(s3_endpoint.admin, s3_endpoint.bucket, prefix + "/")


@pytest.fixture
def s3(request: pytest.FixtureRequest, any_store: Store) -> S3Endpoint | None:
    """The S3 server behind ``any_store``, or None for the local store."""
    if isinstance(any_store, S3Store):
        endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
        return endpoint
    return None


@pytest.fixture
def store_settings() -> Settings:
    """Settings with the smallest part size S3 allows, so multipart paths run on small files."""
    return load_settings(s3_part_size=5 << 20, s3_concurrency=3, s3_max_attempts=3)


@pytest.fixture(params=["local", "s3"])
async def any_store(
    request: pytest.FixtureRequest, tmp_path: Path, store_settings: Settings
) -> AsyncIterator[Store]:
    """The same tests against the local store and the S3 store."""
    store: Store
    if request.param == "local":
        store = LocalStore(tmp_path / "workdir")
    else:
        store = S3Store.from_url(request.getfixturevalue("s3_workdir"), store_settings)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def fault_proxy(s3_endpoint: S3Endpoint) -> AsyncIterator[FaultProxy]:
    """A fault-injecting proxy in front of the test endpoint (plain HTTP endpoints only)."""
    if not s3_endpoint.url.startswith("http://"):
        pytest.skip("the fault proxy needs a plain HTTP endpoint")
    proxy = FaultProxy.to(s3_endpoint.url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
