"""gc over many refs on the S3 server: blobs over several listing pages (small
ones here, to keep the suite quick), every studio's refs followed and every
ref's reach kept; the full size (1,000 studios x 10, 1,000-key pages) is
bench/gc_scale.py."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from agent.session.gc import collect
from agent.store.s3 import S3Store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from gc_scale import populate


async def test_gc_lists_every_page_and_keeps_every_ref(s3_workdir: str, tmp_path: Path) -> None:
    bucket, _, prefix = s3_workdir.removeprefix("s3://").partition("/")
    store = S3Store(bucket, prefix, list_page_size=50)
    try:
        reached, dead = await populate(store, tmp_path, 30, 5, 3, 60)
        report = await collect(store, tmp_path / "gc", grace=timedelta(0))
        assert report.blobs == len(reached) + len(dead) == 213  # five pages
        assert report.refs == 150 and report.studios == 30
        assert report.deleted == len(dead) == 60 and report.exit_code == 0
        left = {b.digest async for page in store.iter_blobs() for b in page}
        assert left == reached
    finally:
        await store.close()
