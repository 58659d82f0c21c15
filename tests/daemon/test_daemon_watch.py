"""The daemon with the change watch: checkpoints as soon as changes settle, reading
only what changed, full walks where the watch cannot see, and nothing read at all
when nothing changed.  A real daemon on a ManualClock, the real inotify watch,
the real Session and local store.
"""

from __future__ import annotations

import mmap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import Harness, eventually, fake_ide, layer_names, read_manifest

from agent.checkpoint.state import StateReader
from agent.daemon.checkpointer import SETTLE
from agent.daemon.clock import ManualClock
from agent.session import Session, publish
from agent.settings import Settings
from agent.store.local import LocalStore

HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
def start(harness: HarnessFactory) -> HarnessFactory:
    async def make(settings: Settings, argv: list[str], **kw: Any) -> Harness:
        return await harness(settings, argv, clock=ManualClock(), reap_orphans=False, **kw)

    return make


async def _watching(h: Harness) -> None:
    watch = h.daemon._watch
    assert watch is not None
    await eventually(watch.ready.is_set, what="every directory watched")


async def _next_checkpoint(h: Harness, within: float) -> tuple[str, str, float]:
    """Let daemon time pass until the session's checkpoint is rewritten: which way it
    read the root, its layer, and the daemon time it took to come."""
    own = h.daemon.checkpointer.own  # type: ignore[union-attr]
    before = (own.info.updated, own.info.layers) if own.info else None
    t0 = h.clock.monotonic()

    def rewritten() -> bool:
        return (
            own.info is not None
            and own.scan is not None
            and ((own.info.updated, own.info.layers) != before)
        )

    await h.step_until(rewritten, within=within, what="the next checkpoint")
    assert own.info is not None and own.scan is not None
    m = await read_manifest(Path(h.daemon.settings.workdir), "s1", own.info.name)
    assert m is not None
    return own.scan, m.layers[-1].digest, h.clock.monotonic() - t0


async def test_changes_are_checkpointed_once_settled_reading_only_them(
    make_settings: Callable[..., Settings], start: HarnessFactory, root: Path, workdir: Path
) -> None:
    settings = make_settings(checkpoint_interval=3000.0, checkpoint_min_interval=60.0)
    h = await start(settings, fake_ide())
    await h.wait_running()
    await _watching(h)

    (root / "home/user/first.txt").write_text("first change\n")
    scan, layer, waited = await _next_checkpoint(h, within=60.0)
    # the watch was ready before the start walked the root: the first is watched too
    assert scan == "watch"
    assert waited == pytest.approx(SETTLE)  # as soon as the change settled
    assert "home/user/first.txt" in await layer_names(workdir, layer)

    (root / "home/user/second.txt").write_text("second change\n")
    scan, layer, waited = await _next_checkpoint(h, within=60.0)
    assert scan == "watch"
    assert waited == pytest.approx(60.0)  # no sooner than the minimum interval
    assert await layer_names(workdir, layer) == {"home/user", "home/user/second.txt"}


async def test_nothing_changed_reads_nothing(
    make_settings: Callable[..., Settings],
    start: HarnessFactory,
    root: Path,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(checkpoint_interval=300.0, checkpoint_min_interval=60.0)
    h = await start(settings, fake_ide())
    await h.wait_running()
    await _watching(h)
    (root / "home/user/first.txt").write_text("first change\n")
    await _next_checkpoint(h, within=60.0)

    opened: list[Path] = []

    class Counting(StateReader):
        def __init__(self, path: Path) -> None:
            opened.append(path)
            super().__init__(path)

    monkeypatch.setattr(publish, "StateReader", Counting)  # a spy: the real reader runs
    metrics = h.daemon.metrics
    unchanged = metrics.checkpoint_unchanged._value.get()
    await h.step_until(
        lambda: metrics.checkpoint_unchanged._value.get() > unchanged,
        within=300.0,
        what="a periodic checkpoint with nothing changed",
    )
    assert opened == []  # not even the parent state was read

    # Asked for through the API, with nothing changed: a checkpoint all the same
    # (a new manifest), its parent state the same file, still nothing read.
    state_dir = Path(h.daemon.settings.state_path)
    states = sorted(p.name for p in state_dir.glob("parent-*.state"))
    code, res = await h.request("POST", "/v1/checkpoints", json={"name": "same"})
    assert code == 201, res
    assert res["scan"] == "watch" and res["changed"] == 0
    assert opened == []
    assert sorted(p.name for p in state_dir.glob("parent-*.state")) == states
    (root / "home/user/after.txt").write_text("and then a change\n")
    scan, layer, _ = await _next_checkpoint(h, within=60.0)
    assert scan == "watch"
    assert "home/user/after.txt" in await layer_names(workdir, layer)


async def test_what_the_watch_cannot_see_is_in_the_full_walks(
    make_settings: Callable[..., Settings], start: HarnessFactory, root: Path, workdir: Path
) -> None:
    settings = make_settings(
        checkpoint_interval=3000.0, checkpoint_min_interval=60.0, full_scan_every=3
    )
    data = root / "home/user/data.bin"
    data.write_bytes(b"\0" * 4096)
    h = await start(settings, fake_ide())
    await h.wait_running()
    await _watching(h)
    scans = []
    with open(data, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
        m[:5] = b"first"  # through the mapping: no inotify event
        m.flush()
        for name in ("a.txt", "b.txt"):
            (root / "home/user" / name).write_text("seen\n")
            scan, layer, _ = await _next_checkpoint(h, within=60.0)
            scans.append(scan)
            assert "home/user/data.bin" not in await layer_names(workdir, layer)
        (root / "home/user/c.txt").write_text("c\n")
        scan, layer, _ = await _next_checkpoint(h, within=60.0)
        scans.append(scan)
        assert "home/user/data.bin" in await layer_names(workdir, layer)  # the full walk's
        m[:6] = b"second"
        m.flush()
        h.daemon.request_stop("test")
        await h.step_until(h.task.done, within=5.0, what="stopped")  # type: ignore[union-attr]
    assert scans == ["watch", "watch", "full"]  # every third periodic one walks
    own = h.daemon.checkpointer.own  # type: ignore[union-attr]
    assert own.scan == "full"  # and the final one always does
    assert own.info is not None
    final = await read_manifest(workdir, "s1", own.info.name)
    assert final is not None
    assert "home/user/data.bin" in await layer_names(workdir, final.layers[-1].digest)


async def test_a_watch_at_its_limit_leaves_every_checkpoint_to_a_full_walk(
    make_settings: Callable[..., Settings], start: HarnessFactory, root: Path, workdir: Path
) -> None:
    limit = Path("/proc/sys/fs/inotify/max_user_watches")
    try:
        old = limit.read_text()
        limit.write_text("2\n")  # the root and one directory at most
    except OSError as e:
        pytest.skip(f"cannot set {limit} here: {e}")
    try:
        settings = make_settings(checkpoint_interval=300.0, checkpoint_min_interval=60.0)
        h = await start(settings, fake_ide())
        await h.wait_running()
        await _watching(h)
    finally:
        limit.write_text(old)
    watch = h.daemon._watch
    assert watch is not None and "max_user_watches" in watch.pending().broken
    for name in ("one.txt", "two.txt"):
        (root / "home/user" / name).write_text("the watch is not told\n")
        scan, layer, waited = await _next_checkpoint(h, within=300.0)
        assert scan == "full"
        assert waited == pytest.approx(300.0)  # the interval's, no settled ones
        assert f"home/user/{name}" in await layer_names(workdir, layer)


async def test_a_resumed_session_walks_at_its_first_checkpoint(
    make_settings: Callable[..., Settings], start: HarnessFactory, root: Path, workdir: Path
) -> None:
    # An earlier agent's session on this root (a container restarted in place), and
    # a change made while no agent ran: no watch saw it, only a walk finds it.
    settings = make_settings(checkpoint_interval=3000.0, checkpoint_min_interval=60.0)
    store = LocalStore(workdir)
    await Session(settings, store).baseline()
    await store.close()
    (root / "home/user/offline.txt").write_text("written with no agent running\n")

    h = await start(settings, fake_ide())
    await h.wait_running()
    await _watching(h)
    (root / "home/user/online.txt").write_text("written under the daemon\n")
    scan, layer, _ = await _next_checkpoint(h, within=60.0)
    assert scan == "full"
    assert {"home/user/offline.txt", "home/user/online.txt"} <= await layer_names(workdir, layer)

    (root / "home/user/later.txt").write_text("and later\n")
    scan, layer, _ = await _next_checkpoint(h, within=60.0)
    assert scan == "watch"  # from then on the watch counts
    assert "home/user/later.txt" in await layer_names(workdir, layer)
