"""Which checkpoint a session starts from: the most recently written valid one;
an unfinished one is revalidated first and, if unsound, marked invalid and
passed over without touching the root."""

from __future__ import annotations

from pathlib import Path

import pytest
from fsutil import settings_for

from agent.checkpoint.manifest import CheckpointState
from agent.errors import AgentError
from agent.session import Session
from agent.store.local import LocalStore


async def _two_checkpoints(tmp: Path) -> tuple[Path, str]:
    """A finalized checkpoint 'good', then an interim one with one more file."""
    root = tmp / "root"
    root.mkdir()
    work = tmp / "work"
    s = Session(settings_for(root, work, tmp / "st"), LocalStore(work))
    await s.baseline()
    (root / "a.txt").write_text("a")
    await s.checkpoint("good")
    (root / "b.txt").write_text("b")
    interim = await s.checkpoint(state=CheckpointState.INTERIM)
    assert interim is not None
    assert (await s.list_checkpoints())[0].name == interim.info.name  # the newest
    return work, interim.info.name


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
async def test_unsound_interim_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    work, interim_name = await _two_checkpoints(tmp_path)
    store = LocalStore(work)
    s = Session(settings_for(tmp_path / "root", work, tmp_path / "st"), store)
    layer = s.chain[-1]  # the interim checkpoint's own layer
    path = work / ".studios/checkpoints/blobs/sha256" / layer.digest.split(":")[1]
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"\0" * layer.size)

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "image-file").write_text("from the image")
    starter = Session(settings_for(fresh, work, tmp_path / "st2"), store)
    out = await starter.start()
    assert out.restored is not None and out.restored.name == "good"
    assert [i.name for i in out.invalidated] == [interim_name]
    assert (fresh / "a.txt").read_text() == "a"
    assert not (fresh / "b.txt").exists()
    states = {c.name: c.state for c in await starter.list_checkpoints()}
    assert states[interim_name] is CheckpointState.INVALID
    # The new session extends the chain it restored, not the invalid one.
    assert len(starter.chain) == 1


async def test_sound_interim_is_used(tmp_path: Path) -> None:
    work, interim_name = await _two_checkpoints(tmp_path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    starter = Session(settings_for(fresh, work, tmp_path / "st2"), LocalStore(work))
    out = await starter.start()
    assert out.restored is not None and out.restored.name == interim_name
    assert out.invalidated == []
    assert (fresh / "b.txt").read_text() == "b"


async def test_named_and_other_studio_sources(tmp_path: Path) -> None:
    work, _ = await _two_checkpoints(tmp_path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    other = Session(settings_for(fresh, work, tmp_path / "st3", studio="t"), LocalStore(work))
    out = await other.start("s/good")
    assert out.restored is not None and (out.restored.studio, out.restored.name) == ("s", "good")
    assert (fresh / "a.txt").exists() and not (fresh / "b.txt").exists()
    r = await other.checkpoint()
    assert r is not None and r.info.studio == "t" and r.info.layers == 1
    with pytest.raises(AgentError, match="no checkpoint 'nope'"):
        await Session(
            settings_for(tmp_path / "fresh", work, tmp_path / "st4"), LocalStore(work)
        ).start("nope")


async def test_new_studio_starts_empty(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    s = Session(
        settings_for(root, tmp_path / "work", tmp_path / "st"), LocalStore(tmp_path / "work")
    )
    out = await s.start()
    assert out.restored is None and out.invalidated == []
    info = await s.mark(CheckpointState.EMPTY)
    assert info.state is CheckpointState.EMPTY and info.layers == 0
    assert info.name == s.auto_name
