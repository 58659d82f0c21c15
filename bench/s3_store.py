"""S3 for benchmarks: moto in server mode on 127.0.0.1, and one put/get measurement.

``start_local_s3()`` lets a benchmark compare the S3 store with the local store
in the same run without any account; ``local_s3_workdir()`` makes a bucket on
it and points the AWS configuration chain of this process at it.  Run this file
to time one put_blob and one get_blob of a 200 MB blob through moto and through
the local store.

moto keeps objects in its own process and speaks HTTP over loopback, so its
numbers bound the client's own cost (hashing, part handling, verification)
rather than predict S3's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3  # type: ignore[import-untyped]
from moto.server import ThreadedMotoServer

from agent.settings import Settings, load_settings
from agent.store.base import Store
from agent.store.local import LocalStore
from agent.store.s3 import S3Store

_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def start_local_s3() -> tuple[str, Callable[[], None]]:
    """Start moto's S3 on a free port of 127.0.0.1; return its URL and a stop function."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}", server.stop


def local_s3_workdir(endpoint_url: str, bucket: str = "studio-bench") -> str:
    """Create ``bucket`` on the local S3 and aim this process's AWS settings at it.

    Returns a fresh ``s3://bucket/prefix`` work directory.
    """
    os.environ.update(_CREDENTIALS)
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ.pop("AWS_PROFILE", None)
    admin = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    with contextlib.suppress(admin.exceptions.BucketAlreadyOwnedByYou):
        admin.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run-{uuid.uuid4().hex[:8]}"


async def time_put_get(
    store: Store, src: Path, digest: str, size: int, scratch: Path
) -> dict[str, float]:
    """Seconds for one put_blob and one verified get_blob of ``src``."""
    copy = scratch / "put-src"
    shutil.copyfile(src, copy)  # put_blob consumes its source
    t0 = time.perf_counter()
    await store.put_blob(copy, digest, size)
    t1 = time.perf_counter()
    path = await store.get_blob(digest, size, scratch / "get")
    t2 = time.perf_counter()
    if path.parent == scratch / "get":
        path.unlink()
    return {"put_s": t1 - t0, "get_s": t2 - t1}


async def compare(size: int, settings: Settings) -> dict[str, dict[str, float]]:
    endpoint, stop = start_local_s3()
    tmp = Path(tempfile.mkdtemp(prefix="s3-bench-"))
    try:
        src = tmp / "blob"
        h = hashlib.sha256()
        with open(src, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 8 << 20))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        digest = "sha256:" + h.hexdigest()
        results: dict[str, dict[str, float]] = {}

        local = LocalStore(tmp / "workdir")
        (tmp / "local").mkdir()
        results["local"] = await time_put_get(local, src, digest, size, tmp / "local")

        s3 = S3Store.from_url(local_s3_workdir(endpoint), settings)
        (tmp / "s3").mkdir()
        try:
            results["s3 (moto)"] = await time_put_get(s3, src, digest, size, tmp / "s3")
        finally:
            await s3.close()
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    args = parser.parse_args()
    settings = load_settings()
    size = args.size_mb * 1_000_000
    results = asyncio.run(compare(size, settings))
    print(
        f"{args.size_mb} MB blob, part size {settings.s3_part_size >> 20} MiB, "
        f"concurrency {settings.s3_concurrency}"
    )
    for name, r in results.items():
        put_mbs = size / r["put_s"] / 1e6
        get_mbs = size / r["get_s"] / 1e6
        print(
            f"{name:10s} put {r['put_s']:6.2f} s ({put_mbs:6.0f} MB/s)   "
            f"get {r['get_s']:6.2f} s ({get_mbs:6.0f} MB/s)"
        )


if __name__ == "__main__":
    main()
