"""gc over a work directory of many studios, against moto over loopback.

Fills a work directory through the store API with ``--studios`` studios of
``--checkpoints`` checkpoints each: tiny manifests that share a few layers
(as clones do), plus ``--garbage`` blobs nothing reaches; then times one
``gc --grace 0s`` and reports its peak RSS:

    python bench/gc_scale.py [--studios 1000] [--checkpoints 10] [--garbage 500]

The listing of blobs is paginated (ListObjectsV2, 1,000 keys a page), and gc
keeps only digests in memory; the time is mostly one GetObject per ref and one
per manifest, at gc's concurrency, through moto's single process.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.checkpoint.manifest import CheckpointState, LayerDesc, Manifest
from agent.store.base import Store

WRITERS = 32  # store requests in flight while filling


async def populate(
    store: Store, scratch: Path, studios: int, checkpoints: int, layers: int, garbage: int
) -> tuple[set[str], set[str]]:
    """Fill the store; return (the blobs refs reach, the garbage blobs)."""
    limit = asyncio.Semaphore(WRITERS)
    pool: list[LayerDesc] = []
    for i in range(layers):
        data = f"layer {i} {uuid.uuid4().hex}".encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        await store.put_bytes(data, digest, scratch)
        pool.append(LayerDesc(digest, len(data)))
    reached = {x.digest for x in pool}
    created = datetime.now(UTC) - timedelta(days=1)

    async def one(s: int, c: int) -> None:
        chain = tuple(pool[(s + k) % layers] for k in range(min(c + 1, layers)))
        m = Manifest(f"studio-{s}", f"session-{s}-{c}", CheckpointState.FINALIZED, created, chain)
        data, digest = m.encode()
        reached.add(digest)
        async with limit:
            await store.put_bytes(data, digest, scratch)
            await store.set_ref(f"studio-{s}", f"cp-{c}", digest, None)

    async def junk(i: int) -> str:
        data = json.dumps({"garbage": i, "id": uuid.uuid4().hex}).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        async with limit:
            await store.put_bytes(data, digest, scratch)
        return digest

    await asyncio.gather(*(one(s, c) for s in range(studios) for c in range(checkpoints)))
    dead = set(await asyncio.gather(*(junk(i) for i in range(garbage))))
    return reached, dead


async def _run(args: argparse.Namespace) -> dict[str, object]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from s3_store import local_s3_workdir, start_local_s3

    from agent.session.gc import collect
    from agent.settings import load_settings
    from agent.store import open_store

    url, stop = start_local_s3()
    try:
        workdir = local_s3_workdir(url)
        store = open_store(load_settings(workdir=workdir))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            reached, dead = await populate(
                store, Path(tmp), args.studios, args.checkpoints, args.layers, args.garbage
            )
            fill = time.monotonic() - t0
            report = await collect(store, Path(tmp) / "gc", grace=timedelta(0))
        await store.close()
    finally:
        stop()
    expect = (len(dead), args.studios * args.checkpoints, len(reached) + len(dead))
    found = (report.deleted, report.refs, report.blobs)
    if found != expect or report.refused or report.stopped:
        raise SystemExit(f"gc went wrong: (deleted, refs, blobs) {found} != {expect}: {report}")
    return {
        "studios": args.studios,
        "checkpoints": report.refs,
        "blobs": report.blobs,
        "pages": -(-report.blobs // 1000),
        "deleted": report.deleted,
        "fill_seconds": round(fill, 1),
        "gc_seconds": round(report.seconds, 1),
        "gc_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studios", type=int, default=1000)
    p.add_argument("--checkpoints", type=int, default=10)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--garbage", type=int, default=500)
    print(json.dumps(asyncio.run(_run(p.parse_args())), indent=2))


if __name__ == "__main__":
    main()
