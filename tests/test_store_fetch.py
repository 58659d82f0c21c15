"""A chain's fetch: newest first, no more downloads at once than the store
allows, each blob readable while it arrives, and nothing left behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import StoreUnavailable
from agent.store.fetch import Fetch
from agent.store.local import LocalStore


class CountingStore(LocalStore):
    """A local store that records the order and overlap of its downloads."""

    def __init__(self, workdir: Path, concurrency: int, broken: str = "") -> None:
        super().__init__(workdir)
        self.fetch_concurrency = concurrency
        self.broken = broken
        self.started: list[str] = []
        self.running = 0
        self.most = 0

    async def get_blob(
        self,
        digest: str,
        size: int | None,
        dest_dir: Path,
        *,
        verify: bool = True,
        on_data: Callable[[Path, int], None] | None = None,
    ) -> Path:
        self.started.append(digest)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            for _ in range(5):  # let every other download that may start, start
                await asyncio.sleep(0)
            if digest == self.broken:
                raise StoreUnavailable("the connection broke")
            return await super().get_blob(digest, size, dest_dir, verify=verify, on_data=on_data)
        finally:
            self.running -= 1


async def _blobs(store: LocalStore, tmp: Path, n: int) -> list[tuple[str, int, bytes]]:
    out = []
    for i in range(n):
        data = os.urandom(1000 + i)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        src = tmp / f"src{i}"
        src.write_bytes(data)
        await store.put_blob(src, digest, len(data))
        out.append((digest, len(data), data))
    return out


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_newest_first_within_the_stores_concurrency(tmp_path: Path, concurrency: int) -> None:
    store = CountingStore(tmp_path / "work", concurrency)
    blobs = await _blobs(store, tmp_path, 5)
    spool = tmp_path / "spool"
    seen: list[tuple[int, int]] = []
    chain = [(d, s) for d, s, _ in blobs]
    async with Fetch(store, chain, spool, progress=lambda a, b: seen.append((a, b))) as fetch:
        await fetch.wait()
        for i, (_, _, data) in enumerate(blobs):
            path = fetch.complete(i)
            assert path is not None and path.read_bytes() == data
            with fetch.opener(i)() as reader:
                assert reader.read(-1) == data
    if concurrency == 1:
        assert store.started == [d for d, _ in reversed(chain)]
    assert store.most == concurrency
    total = sum(s for _, s in chain)
    assert seen[-1] == (total, total) and len(seen) == len(chain)
    assert list(spool.iterdir()) == []  # the scratch directory is gone


async def test_a_failed_download_fails_its_readers_and_the_wait(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "work", 2)
    blobs = await _blobs(store, tmp_path, 3)
    store.broken = blobs[1][0]
    spool = tmp_path / "spool"
    async with Fetch(store, [(d, s) for d, s, _ in blobs], spool) as fetch:
        with pytest.raises(StoreUnavailable):
            await fetch.wait()
        assert fetch.complete(1) is None
        with pytest.raises(StoreUnavailable):
            await asyncio.to_thread(fetch.opener(1)().read, 10)
    assert list(spool.iterdir()) == []
