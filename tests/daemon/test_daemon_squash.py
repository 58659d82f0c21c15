"""The daemon's background squash: it starts once the chain holds more than
``squash_layers`` layers, later checkpoints extend the squashed chain, and a stop
during a squash cancels it and still writes a valid final checkpoint."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import Harness, fake_ide, read_manifest
from fsutil import copy_tree, diff_snapshots, settings_for, snapshot

import agent.session.squash as session_squash
from agent.checkpoint.layer_writer import Cancelled
from agent.checkpoint.manifest import CheckpointState
from agent.daemon.clock import ManualClock
from agent.session import Session
from agent.settings import Settings
from agent.store.local import LocalStore

HarnessFactory = Callable[..., Awaitable[Harness]]
SKIP = ("var", "tmp")  # the state dir, and what is never checkpointed


@pytest.fixture
def start(harness: HarnessFactory) -> HarnessFactory:
    async def make(settings: Settings, argv: list[str], **kw: Any) -> Harness:
        return await harness(settings, argv, clock=ManualClock(), reap_orphans=False, **kw)

    return make


async def _layers(workdir: Path, h: Harness) -> int:
    m = await read_manifest(workdir, "s1", h.daemon.session.auto_name)  # type: ignore[union-attr]
    return len(m.layers) if m is not None else 0


async def _periodic_with_change(h: Harness, root: Path, workdir: Path, i: int) -> None:
    (root / "home" / "user" / f"work{i}.txt").write_text(f"change {i}\n" * 50)
    (root / "home" / "user" / "README.md").write_text(f"# edited {i}\n")
    changed = h.daemon.metrics.checkpoint_duration.labels("periodic")._sum.get

    before = changed()
    await h.step_until(lambda: changed() != before, within=300.0, what=f"periodic checkpoint {i}")


async def _restores_like(tmp_path: Path, workdir: Path, name: str, root: Path) -> None:
    fresh = tmp_path / "fresh"
    copy_tree(tmp_path / "base", fresh)
    s = Session(settings_for(fresh, workdir, tmp_path / "fresh-state", "s1"), LocalStore(workdir))
    await s.start(name, required=True)
    assert diff_snapshots(snapshot(root, skip=SKIP), snapshot(fresh, skip=SKIP)) == []


async def test_background_squash_after_n_layers_and_checkpoints_extend_it(
    make_settings: Callable[..., Settings],
    start: HarnessFactory,
    root: Path,
    workdir: Path,
    tmp_path: Path,
) -> None:
    copy_tree(root, tmp_path / "base")
    h = await start(make_settings(checkpoint_interval=300.0, squash_layers=2), fake_ide())
    await h.wait_running()
    compactor = h.daemon.compactor
    assert compactor is not None
    for i in range(2):
        await _periodic_with_change(h, root, workdir, i)
        assert compactor.last is None and not compactor.running  # 2 layers: not yet
    await _periodic_with_change(h, root, workdir, 2)
    await h.step_until(lambda: compactor.last is not None, within=0.0, what="the squash")
    assert compactor.last is not None and compactor.last.before.layers == 3
    assert await _layers(workdir, h) == 1
    await _periodic_with_change(h, root, workdir, 3)
    assert await _layers(workdir, h) == 2  # extends the squashed chain
    h.daemon.request_stop("test")
    assert await h.wait_exit() == 0
    own = h.daemon.own_checkpoint.info
    assert own is not None and own.state is CheckpointState.FINALIZED
    await _restores_like(tmp_path, workdir, own.name, root)


async def test_stop_during_a_squash_cancels_it_and_writes_the_final_checkpoint(
    make_settings: Callable[..., Settings],
    start: HarnessFactory,
    root: Path,
    workdir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entered = threading.Event()

    def held(*args: Any, cancel: threading.Event | None = None, **kw: Any) -> Any:
        entered.set()  # a squash that runs until it is cancelled
        assert cancel is not None and cancel.wait(60)
        raise Cancelled("squash cancelled")

    monkeypatch.setattr(session_squash, "squash_layers", held)
    copy_tree(root, tmp_path / "base")
    h = await start(make_settings(checkpoint_interval=300.0, squash_layers=2), fake_ide())
    await h.wait_running()
    for i in range(3):
        await _periodic_with_change(h, root, workdir, i)
    await h.step_until(entered.is_set, within=0.0, what="the squash under way")
    compactor = h.daemon.compactor
    assert compactor is not None and compactor.running
    # a periodic checkpoint due meanwhile is not held up by it
    await _periodic_with_change(h, root, workdir, 3)
    assert compactor.running and await _layers(workdir, h) == 4
    (root / "home" / "user" / "last.txt").write_text("written just before the stop\n")
    h.daemon.request_stop("test")
    assert await h.wait_exit() == 0
    assert not compactor.running and compactor.last is None
    own = h.daemon.own_checkpoint.info
    assert own is not None and own.state is CheckpointState.FINALIZED and own.layers == 5
    await _restores_like(tmp_path, workdir, own.name, root)
