"""Squashing a session's checkpoints, on both stores: the squashed checkpoint
restores as it did, checkpoints after a squash extend it, a checkpoint written
while a squash runs is never lost, and a killed squash leaves the old one."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fsutil import copy_tree, diff_snapshots, settings_for, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_roundtrip import OPS, _apply, _make_base

import agent.session.squash as session_squash
from agent.checkpoint.manifest import Manifest
from agent.session import Session
from agent.session.squash import SquashConflict, plan
from agent.settings import load_settings
from agent.store.base import Store
from agent.store.local import LocalStore
from agent.store.s3 import S3Store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown and xattrs need root")

_SLOW = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


async def _restored(tmp: Path, base: Path, store: Store, name: str, studio: str = "s") -> Any:
    target = tmp / f"restore-{uuid.uuid4().hex[:6]}"
    copy_tree(base, target)
    state = tmp / f"st-{target.name}"
    restorer = Session(settings_for(target, tmp / "work", state, studio), store)
    await restorer.start(name, required=True)
    return snapshot(target)


async def _restores_to(tmp: Path, base: Path, store: Store, name: str, expected: Any) -> None:
    problems = diff_snapshots(expected, await _restored(tmp, base, store, name))
    assert not problems, "\n".join(problems[:10])


# -- property: random changes, a squash at random steps -------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=_SLOW)
@given(ops=st.lists(OPS, min_size=2, max_size=10), data=st.data())
def test_squash_at_random_steps_restores_the_same(ops: list[str], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        asyncio.run(_squash_steps(t, LocalStore(t / "work"), ops, data))


@settings(max_examples=8, deadline=None, suppress_health_check=_SLOW)
@given(ops=st.lists(OPS, min_size=2, max_size=6), data=st.data())
def test_squash_at_random_steps_restores_the_same_through_s3(
    s3_workdir: str, ops: list[str], data: st.DataObject
) -> None:
    store_settings = load_settings(s3_part_size=5 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        store = S3Store.from_url(f"{s3_workdir}/{uuid.uuid4().hex[:8]}", store_settings)

        async def run() -> None:
            try:
                await _squash_steps(Path(tmp), store, ops, data)
            finally:
                await store.close()

        asyncio.run(run())


async def _squash_steps(tmp: Path, store: Store, ops: list[str], data: st.DataObject) -> None:
    """Two sessions checkpoint the same root, one squashing at random steps; both
    restore identically.  The base holds what the changes delete, so a squash that
    dropped a whiteout, or kept a superseded entry, restores differently."""
    base = tmp / "base"
    base.mkdir()
    _make_base(base)
    live = tmp / "live"
    copy_tree(base, live)
    session = Session(settings_for(live, tmp / "work", tmp / "state"), store)
    plain = Session(settings_for(live, tmp / "work", tmp / "state-plain", "plain"), store)
    await session.baseline()
    await plain.baseline()

    async def same() -> None:
        want = await _restored(tmp, base, store, plain.auto_name, "plain")
        problems = diff_snapshots(want, await _restored(tmp, base, store, session.auto_name))
        assert not problems, "\n".join(problems[:10])

    for op in ops:
        _apply(op, live, data)
        await session.checkpoint()
        await plain.checkpoint()
        if data.draw(st.booleans()):
            layers = len(session.chain)
            start = data.draw(st.integers(0, max(0, layers - 1)))
            out = await session.squash(start=start)
            assert out.after.layers == (start + 1 if layers - start >= 2 else layers)
            assert len(session.chain) == out.after.layers  # the local chain follows
            await same()
    await same()  # what was checkpointed after the last squash extends it


# -- fixed scenarios on both stores --------------------------------------------------------


async def _session_with_layers(tmp: Path, store: Store, n: int) -> tuple[Session, Path, Path]:
    base = tmp / "base"
    base.mkdir()
    _make_base(base)
    live = tmp / "live"
    copy_tree(base, live)
    session = Session(settings_for(live, tmp / "work", tmp / "state"), store)
    await session.baseline()
    for i in range(n):
        (live / "root" / f"notebook{i % 3}.ipynb").write_text(f"version {i}\n" * 100)
        (live / "etc" / "config").write_text(f"x = {i}\n")
        if i == 1:
            (live / "usr/lib/os-release").unlink()  # a path of the image
            (live / "empty").rmdir()
        await session.checkpoint()
    return session, base, live


async def test_squash_then_checkpoints_extend_it(tmp_path: Path, any_store: Store) -> None:
    session, base, live = await _session_with_layers(tmp_path, any_store, 5)
    out = await session.squash()
    assert (out.before.layers, out.after.layers, out.squashed) == (5, 1, 5)
    assert out.after.size < out.before.size and out.superseded > 0
    listed = {c.name: c for c in await session.list_checkpoints()}
    assert listed[session.auto_name].layers == 1
    assert listed[session.auto_name].state == out.before.state
    await _restores_to(tmp_path, base, any_store, session.auto_name, snapshot(live))

    (live / "root/after.txt").write_text("after the squash")
    (live / "root/notebook0.ipynb").unlink()
    result = await session.checkpoint()
    assert result is not None and result.info.layers == 2
    await _restores_to(tmp_path, base, any_store, session.auto_name, snapshot(live))
    # a fresh session restored from it extends the squashed chain too
    squashed = Manifest.decode(await any_store.get_bytes(out.after.digest, tmp_path))
    manifest = Manifest.decode(await any_store.get_bytes(result.info.digest, tmp_path))
    assert manifest.layers[:1] == squashed.layers


async def test_checkpoint_during_squash_is_rebased_not_lost(
    tmp_path: Path, any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, base, live = await _session_with_layers(tmp_path, any_store, 4)
    entered, release = threading.Event(), threading.Event()
    real = session_squash.squash_layers

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(session_squash, "squash_layers", held)
    task = asyncio.ensure_future(session.squash())
    while not entered.is_set():
        await asyncio.sleep(0.01)
    # the squash holds no lock while it works: this checkpoint is not held up
    (live / "root/during.txt").write_text("written while the squash ran")
    result = await asyncio.wait_for(session.checkpoint(), 30)
    assert result is not None and result.info.layers == 5
    release.set()
    out = await task
    assert (out.squashed, out.rebased, out.after.layers) == (4, 1, 2)
    assert len(session.chain) == 2
    await _restores_to(tmp_path, base, any_store, session.auto_name, snapshot(live))
    (live / "root/later.txt").write_text("and one more")
    again = await session.checkpoint()
    assert again is not None and again.info.layers == 3
    await _restores_to(tmp_path, base, any_store, session.auto_name, snapshot(live))


async def test_squash_gives_up_when_the_ref_was_rewritten(
    tmp_path: Path, any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, _base, live = await _session_with_layers(tmp_path, any_store, 3)
    name = session.auto_name
    other = await session.checkpoint("other")  # a manifest with a chain of its own
    assert other is not None
    (live / "root/x").write_text("x")
    foreign = await session.checkpoint("foreign")
    assert foreign is not None
    entered, release = threading.Event(), threading.Event()
    real = session_squash.squash_layers

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(session_squash, "squash_layers", held)
    task = asyncio.ensure_future(session.squash("other"))
    while not entered.is_set():
        await asyncio.sleep(0.01)
    # another writer points the ref at a chain that does not extend the squashed one
    ref = await any_store.get_ref(session.studio, "other")
    assert ref is not None
    short = Manifest.decode(await any_store.get_bytes(foreign.info.digest, tmp_path))
    short = Manifest(short.studio, "someone-else", short.state, short.created, short.layers[1:])
    data, digest = short.encode()
    await any_store.put_bytes(data, digest, tmp_path)
    await any_store.set_ref(session.studio, "other", digest, ref.digest)
    release.set()
    with pytest.raises(SquashConflict, match="gave up"):
        await task
    after = await any_store.get_ref(session.studio, "other")
    assert after is not None and after.digest == digest
    assert name in {c.name for c in await session.list_checkpoints()}


async def test_own_chain_grown_under_another_name_is_kept(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "work")
    session, base, live = await _session_with_layers(tmp_path, store, 3)
    (live / "root/named.txt").write_text("in a named checkpoint only")
    named = await session.checkpoint("named")
    assert named is not None and len(session.chain) == 4
    out = await session.squash()  # the own ref: 3 layers
    assert out.after.layers == 1
    assert len(session.chain) == 2  # the squashed layer, then the named one's
    (live / "root/next.txt").write_text("next")
    result = await session.checkpoint()
    assert result is not None and result.info.layers == 3
    await _restores_to(tmp_path, base, store, session.auto_name, snapshot(live))


async def test_squash_of_another_studios_checkpoint(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "work")
    session, base, live = await _session_with_layers(tmp_path, store, 3)
    other_root = tmp_path / "other"
    copy_tree(base, other_root)
    other = Session(settings_for(other_root, tmp_path / "work", tmp_path / "st2", "t"), store)
    await other.baseline()
    out = await other.squash(f"s/{session.auto_name}")
    assert (out.after.studio, out.after.layers) == ("s", 1)
    await _restores_to(tmp_path, base, store, session.auto_name, snapshot(live))
    # the owning session's next checkpoint keeps everything (it rewrites its own chain)
    (live / "root/y").write_text("y")
    assert await session.checkpoint() is not None
    await _restores_to(tmp_path, base, store, session.auto_name, snapshot(live))


def test_plan_merges_the_newest_run_and_the_bottom_only_when_superseded() -> None:
    from agent.checkpoint.manifest import LayerDesc

    def layer(size: int, replaced: int = 0) -> LayerDesc:
        return LayerDesc("sha256:" + "0" * 64, size, 1, size, replaced)

    big = layer(1000)
    assert plan([big, layer(10)], 16) is None
    small = [layer(10, 5) for _ in range(16)]
    assert plan([big, *small], 16) == 1  # 17 layers: the small ones, not the big bottom
    tiers = [layer(10_000), layer(700), *[layer(10) for _ in range(16)]]
    assert plan(tiers, 16) == 2  # 700 is more than 4 times the run of 16 x 10
    assert plan([big, layer(10, 600)], 16) == 0  # more than half of the bottom replaced
    assert plan([layer(100), layer(100, 90), layer(100, 90)], 16) == 0


# -- a squash killed by SIGKILL --------------------------------------------------------------


def _agent(root: Path, work: str, state: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "agent", "--root", str(root), "--workdir", work,
        "--studio", "k", "--state-dir", str(state), *args,
    ]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_during_squash_leaves_the_old_checkpoint(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    work = str(tmp_path / "work") if where == "local" else request.getfixturevalue("s3_workdir")
    base = tmp_path / "base"
    (base / "usr").mkdir(parents=True)
    (base / "usr/keep").write_text("image")
    root = tmp_path / "root"
    copy_tree(base, root)
    state = tmp_path / "state"
    _run(_agent(root, work, state, "baseline"))
    rnd = random.Random(7)
    for i in range(6):  # enough incompressible data that a squash takes a while
        d = root / "data" / f"d{i}"
        d.mkdir(parents=True)
        for j in range(8):
            (d / f"f{j}").write_bytes(rnd.randbytes(1 << 20))
        _run(_agent(root, work, state, "checkpoint", "--state", "interim"))
    snap = snapshot(root, skip=("state",))
    listed = json.loads(_run(_agent(root, work, state, "checkpoints", "--json")).stdout)
    (before,) = listed
    spool = state / "spool"
    proc = subprocess.Popen(
        _agent(root, work, state, "squash"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.stat().st_size > 0 for p in spool.glob("squash-*.tmp")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the squash finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = json.loads(_run(_agent(root, work, state, "checkpoints", "--json")).stdout)
    assert [(c["name"], c["digest"], c["layers"]) for c in listed] == [
        (before["name"], before["digest"], 6)
    ]
    target = tmp_path / "target"
    copy_tree(base, target)
    _run(_agent(target, work, tmp_path / "st2", "restore", "--checkpoint", before["name"]))
    assert diff_snapshots(snap, snapshot(target, skip=("state",))) == []
    # and a squash run to the end afterwards works, from the same state dir
    out = json.loads(_run(_agent(root, work, state, "squash", "--json")).stdout)
    assert (out["before"]["layers"], out["after"]["layers"]) == (6, 1)
    target2 = tmp_path / "target2"
    copy_tree(base, target2)
    _run(_agent(target2, work, tmp_path / "st3", "restore", "--checkpoint", before["name"]))
    assert diff_snapshots(snap, snapshot(target2, skip=("state",))) == []
