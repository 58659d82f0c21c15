"""A layer is applied while it is still downloading: the download and the apply
overlap instead of adding up, and a download that fails halfway fails the
restore with the store's error."""

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

BIG = 100_000  # blobs above this arrive in two halves; manifests come whole


class TricklingStore(LocalStore):
    """A local store whose layers arrive in two halves, the second one only once
    the restore has applied entries from the first (or never, with ``fail``).

    Stands in for a slow network: the S3 store reports arrival the same way
    (see the contract test of ``on_data``)."""

    def __init__(self, workdir: Path, applying: asyncio.Event, fail: bool = False) -> None:
        super().__init__(workdir)
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
        whole = await super().get_blob(digest, size, dest_dir, verify=verify)
        data = whole.read_bytes()
        if on_data is None or len(data) < BIG:
            if on_data is not None:
                on_data(whole, len(data))
            return whole
        arriving = dest_dir / "arriving.part"
        half = len(data) // 2
        arriving.write_bytes(data[:half])
        on_data(arriving, half)
        # Without the overlap the restore would wait for the whole layer: time out.
        await asyncio.wait_for(self.applying.wait(), timeout=60)
        if self.fail:
            raise StoreUnavailable("the connection broke halfway through the layer")
        with open(arriving, "ab") as f:
            f.write(data[half:])
        on_data(arriving, len(data))
        return arriving


def _tree(root: Path) -> None:
    for i in range(800):  # incompressible, so the first half holds a few hundred entries
        d = root / f"pkg{i // 100}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(1500))


async def _checkpoint(tmp: Path) -> tuple[Path, Path]:
    live, work = tmp / "live", tmp / "work"
    live.mkdir()
    writer = Session(settings_for(live, work, tmp / "st"), LocalStore(work))
    await writer.baseline()
    _tree(live)
    await writer.checkpoint("c")
    return live, work


@pytest.mark.parametrize("fail", [False, True], ids=["complete", "broken"])
async def test_a_layer_is_applied_while_it_arrives(tmp_path: Path, fail: bool) -> None:
    live, work = await _checkpoint(tmp_path)
    loop = asyncio.get_running_loop()
    applying = asyncio.Event()

    def progress(p: Progress) -> None:  # called from the apply thread too
        if p.phase == "apply" and p.files_done > 0:
            loop.call_soon_threadsafe(applying.set)

    target = tmp_path / "target"
    target.mkdir()
    store = TricklingStore(work, applying, fail=fail)
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
