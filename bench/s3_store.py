"""S3 for benchmarks: moto in server mode on 127.0.0.1, and one put/get measurement.

``start_local_s3()`` lets a benchmark compare the S3 store with the local store
in the same run without any account; ``local_s3_workdir()`` makes a bucket on
it and points the AWS configuration chain of this process at it.  Run this file
to time put_blob and get_blob of a 200 MB blob through moto and through the
local store, each in a process of its own, with that process's peak RSS:

    python bench/s3_store.py [--size-mb 200] [--repeat 3]

moto keeps objects in its own process and speaks HTTP over loopback, so its
numbers bound the client's own cost (hashing, part handling, verification)
rather than predict S3's throughput.  moto runs in a separate process: its CPU
time and memory are then not the measured process's, and neither is its peak
RSS inherited.  (Linux reports the peak RSS of the process that started a
child as the child's ``ru_maxrss`` floor when the child is spawned the way
``subprocess`` does it, with vfork; a benchmark process holding moto's objects
would make every agent it starts look as large as itself.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}

# Run by a child interpreter: moto's threaded server on a free port of
# 127.0.0.1; it prints its URL and serves until its stdin closes.
_MOTO_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()
server.stop()
"""


def start_local_s3(tmpdir: str | None = None) -> tuple[str, Callable[[], None]]:
    """Start moto's S3 in its own process on 127.0.0.1; return its URL and a stop function.

    moto keeps every object over 5 MiB in a temporary file; ``tmpdir`` says where."""
    env = dict(os.environ, TMPDIR=tmpdir) if tmpdir else None
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        proc.wait()
        raise RuntimeError("moto server did not start")

    def stop() -> None:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    return url, stop


def local_s3_workdir(endpoint_url: str, bucket: str = "studio-bench") -> str:
    """Create ``bucket`` on the local S3 and aim this process's AWS settings at it.

    Returns a fresh ``s3://bucket/prefix`` work directory.
    """
    import boto3  # type: ignore[import-untyped]

    os.environ.update(_CREDENTIALS)
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ.pop("AWS_PROFILE", None)
    admin = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    with contextlib.suppress(admin.exceptions.BucketAlreadyOwnedByYou):
        admin.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run-{uuid.uuid4().hex[:8]}"


async def _one(op: str, workdir: str, src: Path, digest: str, size: int, dest: Path) -> float:
    """Seconds for one put_blob of ``src`` or one verified get_blob into ``dest``."""
    from agent.settings import load_settings
    from agent.store import open_store

    store = open_store(load_settings(workdir=workdir))
    try:
        t0 = time.perf_counter()
        if op == "put":
            await store.put_blob(src, digest, size)
        else:
            path = await store.get_blob(digest, size, dest)
        seconds = time.perf_counter() - t0
        if op == "get" and path.parent == dest:
            path.unlink()
        return seconds
    finally:
        await store.close()


def _child(args: argparse.Namespace) -> None:
    seconds = asyncio.run(
        _one(args.child, args.workdir, Path(args.src), args.digest, args.size, Path(args.dest))
    )
    print(json.dumps({"seconds": seconds}))


def _measure(
    op: str, workdir: str, src: Path, digest: str, size: int, dest: Path
) -> tuple[float, float]:
    """Run one put or get in a fresh process; return its seconds and peak RSS in MB."""
    cmd = [
        sys.executable, __file__, "--child", op, "--workdir", workdir, "--src", str(src),
        "--digest", digest, "--size", str(size), "--dest", str(dest),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{op} through {workdir} failed")
    return json.loads(out)["seconds"], usage.ru_maxrss / 1024


def compare(size: int, repeat: int) -> dict[str, dict[str, float]]:
    """Best-of-``repeat`` put and get times, and peak RSS, for both stores."""
    endpoint, stop = start_local_s3()
    tmp = Path(tempfile.mkdtemp(prefix="s3-bench-"))
    try:
        blob = tmp / "blob"
        h = hashlib.sha256()
        with open(blob, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 8 << 20))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        digest = "sha256:" + h.hexdigest()
        results: dict[str, dict[str, float]] = {}
        for name in ("local", "s3 (moto)"):
            r = results[name] = {"put_s": float("inf"), "get_s": float("inf")}
            r |= {"put_rss": 0.0, "get_rss": 0.0}
            for _ in range(repeat):
                if name == "local":
                    workdir = str(tmp / f"work-{uuid.uuid4().hex[:8]}")
                else:
                    workdir = local_s3_workdir(endpoint)
                src = tmp / "put-src"
                shutil.copyfile(blob, src)  # put_blob consumes its source
                for op in ("put", "get"):
                    seconds, rss = _measure(op, workdir, src, digest, size, tmp / "get")
                    r[f"{op}_s"] = min(r[f"{op}_s"], seconds)
                    r[f"{op}_rss"] = max(r[f"{op}_rss"], rss)
                if name == "local":
                    shutil.rmtree(workdir)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    for hidden in ("--child", "--workdir", "--src", "--digest", "--dest"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    from agent.settings import load_settings

    settings = load_settings()
    size = args.size_mb * 1_000_000
    results = compare(size, args.repeat)
    print(
        f"{args.size_mb} MB blob, part size {settings.s3_part_size >> 20} MiB, "
        f"concurrency {settings.s3_concurrency}, best of {args.repeat}"
    )
    for name, r in results.items():
        put_mbs = size / r["put_s"] / 1e6
        get_mbs = size / r["get_s"] / 1e6
        print(
            f"{name:10s} put {r['put_s']:6.2f} s ({put_mbs:5.0f} MB/s, {r['put_rss']:4.0f} MB RSS)"
            f"   get {r['get_s']:6.2f} s ({get_mbs:5.0f} MB/s, {r['get_rss']:4.0f} MB RSS)"
        )


if __name__ == "__main__":
    main()
