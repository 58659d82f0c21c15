"""A chain's layers download while the newer ones are applied: the downloads and
the apply overlap instead of adding up, yet no layer is applied before it is
verified; a download that fails halfway fails the restore with the store's error."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fsutil import diff_snapshots, settings_for, snapshot

from agent.errors import StoreUnavailable
from agent.session import Progress, Session
from agent.store.arrival import Arrival
from agent.store.local import LocalStore


class HeldStore(LocalStore):
    """A local store whose blob ``held`` is complete only once the restore has
    applied entries of a newer layer (or never, with ``fail``).

    Stands in for a slow network: an old, big layer still on its way."""

    def __init__(self, workdir: Path, held: str, applying: asyncio.Event, fail: bool) -> None:
        super().__init__(workdir)
        self.held = held
        self.applying = applying
        self.fail = fail

    async def get_blob(
        self,
        digest: str,
        size: int | None,
        dest_dir: Path,
        *,
        verify: bool = True,
        on_data: Callable[[Path, int], None] | None = None,
    ) -> Path:
        if digest == self.held:
            # Without the overlap the restore would wait for this layer first: time out.
            await asyncio.wait_for(self.applying.wait(), timeout=60)
            if self.fail:
                raise StoreUnavailable("the connection broke halfway through the layer")
        return await super().get_blob(digest, size, dest_dir, verify=verify, on_data=on_data)


def _tree(root: Path, n: int, tag: str) -> None:
    for i in range(n):  # over 256 entries: the apply reports progress once
        d = root / f"{tag}{i // 100}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(1500))


async def _checkpoint(tmp: Path) -> tuple[Path, Path, str]:
    live, work = tmp / "live", tmp / "work"
    live.mkdir()
    writer = Session(settings_for(live, work, tmp / "st"), LocalStore(work))
    await writer.baseline()
    _tree(live, 800, "pkg")
    await writer.checkpoint("c")
    _tree(live, 400, "new")
    await writer.checkpoint("c")
    return live, work, writer.chain[0].digest


@pytest.mark.parametrize("fail", [False, True], ids=["complete", "broken"])
async def test_older_layers_download_while_the_newest_is_applied(
    tmp_path: Path, fail: bool
) -> None:
    live, work, oldest = await _checkpoint(tmp_path)
    loop = asyncio.get_running_loop()
    applying = asyncio.Event()

    def progress(p: Progress) -> None:  # called from the apply thread too
        if p.phase == "apply" and p.files_done > 0:
            loop.call_soon_threadsafe(applying.set)

    target = tmp_path / "target"
    target.mkdir()
    store = HeldStore(work, oldest, applying, fail=fail)
    restorer = Session(settings_for(target, work, tmp_path / "st2"), store)
    if fail:
        with pytest.raises(StoreUnavailable, match="halfway"):
            await restorer.start("c", progress=progress, required=True)
        assert not (tmp_path / "st2/session.json").exists()
        return
    await restorer.start("c", progress=progress, required=True)
    assert applying.is_set()
    assert diff_snapshots(snapshot(live), snapshot(target)) == []


def test_arrival_reads_what_has_arrived_and_wakes_on_close(tmp_path: Path) -> None:
    """A reader gets only reported bytes, waits for more, and a reader still
    waiting when the restore gives up is woken with an error, not left hanging."""
    blob = tmp_path / "blob"
    blob.write_bytes(b"abcdef")
    arrival = Arrival()
    arrival.data(blob, 2)
    reader = arrival.open()
    assert reader.read(10) == b"ab"
    outcome: list[object] = []

    def wait_for_more() -> None:
        try:
            outcome.append(reader.read(10))
        except ValueError as e:
            outcome.append(e)

    waiter = threading.Thread(target=wait_for_more)
    waiter.start()
    arrival.close()
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ValueError)


def test_arrival_ends_only_when_complete(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"abcdef")
    arrival = Arrival()
    arrival.data(blob, 6)
    assert arrival.complete() is None
    arrival.finish(blob)
    assert arrival.complete() == blob
    reader, again = arrival.open(), arrival.open()
    assert reader.read(4) == b"abcd"
    assert reader.read(4) == b"ef"
    assert reader.read(4) == b""
    assert again.read(-1) == b"abcdef"  # each reader from the first byte
    arrival.close()
