"""A blob goes up to S3 and comes back down without being held in memory.

One put_blob and one get_blob of a blob of a few hundred MB, each in a process
of its own against the test endpoint, with the store's default part size and
concurrency: the peak RSS of each (``ru_maxrss`` from ``wait4``) must stay far
below the blob's size.  An S3 store that reads whole parts into memory (twice
over, as aiohttp copies a BytesIO body) peaks well above the limit.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20
BLOB_SIZE = 320 * MiB + 12_345  # 21 parts of 16 MiB, the last one short
LIMIT_MB = 150

# Run by a child interpreter: one put_blob or get_blob through the S3 store.
_TRANSFER = """
import asyncio, sys
from pathlib import Path
from agent.settings import load_settings
from agent.store.s3 import S3Store

async def main(op, workdir, path, digest, size):
    store = S3Store.from_url(workdir, load_settings())
    try:
        if op == "put":
            await store.put_blob(Path(path), digest, size)
        else:
            got = await store.get_blob(digest, size, Path(path))
            assert got.stat().st_size == size
    finally:
        await store.close()

asyncio.run(main(*sys.argv[1:5], int(sys.argv[5])))
"""

# Run by a child interpreter: run argv[1:], then print its exit code and ru_maxrss (KiB).
# subprocess starts children with vfork, and Linux then counts the peak RSS of the
# process that started one in the child's ru_maxrss: this test's process holds moto
# and every object in it, so the transfer is started from this small one instead.
_PEAK_RSS = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def _peak_rss_mb(*args: str) -> float:
    """Run one transfer in a fresh process; return that process's peak RSS in MB."""
    cmd = [sys.executable, "-c", _PEAK_RSS, sys.executable, "-c", _TRANSFER, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    code, maxrss_kib = out.stdout.split()
    assert code == "0", out.stderr
    return int(maxrss_kib) / 1024


def test_put_and_get_of_a_large_blob_stay_small(s3_workdir: str, tmp_path: Path) -> None:
    src = tmp_path / "blob"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        left = BLOB_SIZE
        while left:
            chunk = os.urandom(min(left, 8 * MiB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    digest = "sha256:" + h.hexdigest()
    size = str(BLOB_SIZE)

    put_mb = _peak_rss_mb("put", s3_workdir, str(src), digest, size)
    assert not src.exists()  # consumed: it went up
    get_mb = _peak_rss_mb("get", s3_workdir, str(tmp_path / "dest"), digest, size)
    got = tmp_path / "dest" / digest.split(":")[1]
    assert got.stat().st_size == BLOB_SIZE

    print(f"blob {BLOB_SIZE / 1e6:.0f} MB: put peaked at {put_mb:.0f} MB, get at {get_mb:.0f} MB")
    assert put_mb < LIMIT_MB, f"put_blob of {BLOB_SIZE / 1e6:.0f} MB peaked at {put_mb:.0f} MB"
    assert get_mb < LIMIT_MB, f"get_blob of {BLOB_SIZE / 1e6:.0f} MB peaked at {get_mb:.0f} MB"
