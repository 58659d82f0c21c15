"""The parent state's format: frames read and copied whole, what an older
format wrote read on, and a file that is not whole refused."""

from __future__ import annotations

import io
import marshal
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as strat

import agent.checkpoint.state as state
from agent.checkpoint.pipeline import scan_and_write
from agent.checkpoint.scan import Excluder, Stat, scan
from agent.checkpoint.state import (
    Frame,
    StateReader,
    StateWriter,
    blocks_of,
    check_state,
    load_state,
    save_state,
)
from agent.errors import AgentError

_DIR: Stat = (0o40755, 0, 0, 0, 1, 1, 1, 2, "")


def _entries(dirs: int, per_dir: int, salt: int = 0) -> dict[str, Stat]:
    """A tree of ``dirs`` directories two levels deep, big enough for many frames."""
    out: dict[str, Stat] = {}
    for d in range(dirs):
        top = f"g{d % 7}"
        out[top] = _DIR
        out[f"{top}/d{d:04}"] = _DIR
        for i in range(per_dir):
            ino = d * per_dir + i
            out[f"{top}/d{d:04}/f{i:03}"] = (0o100644, 0, 0, i, ino + salt, ino * 3, ino, 1, "")
    return out


def _frames(path: Path) -> list[Frame]:
    with StateReader(path) as r:
        return list(r.frames())


@pytest.fixture(autouse=True, scope="module")
def _small_frames() -> Iterator[None]:
    """Frames of 16 KiB: trees of a few thousand entries make many of them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state, "_FRAME_RAW", 16 << 10)
        yield


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Stat]]:
    path = tmp_path_factory.mktemp("state") / "many.state"
    entries = _entries(60, 30)
    save_state(path, entries)
    return path, entries


def test_a_state_of_many_frames_reads_back_whole(many: tuple[Path, dict[str, Stat]]) -> None:
    path, entries = many
    frames = _frames(path)
    assert len(frames) > 4
    assert load_state(path) == entries
    assert check_state(path) == len(entries)
    assert sum(f.entries for f in frames) == len(entries)
    # Each frame knows its first and last directory without being decompressed.
    dirs = [b[0] for b in blocks_of(entries)]
    assert [f.first for f in frames] == [
        dirs[sum(g.blocks for g in frames[:i])] for i in range(len(frames))
    ]
    assert frames[-1].last == dirs[-1]


def test_a_state_cut_anywhere_is_refused(
    many: tuple[Path, dict[str, Stat]], tmp_path: Path
) -> None:
    """At every frame boundary (a smaller tree, were it taken as whole), inside each
    header and each frame's content, and inside the end marker."""
    path, _ = many
    data = path.read_bytes()
    cuts: set[int] = {len(data) - 1, len(data) - 5}
    for f in _frames(path):
        cuts |= {f.offset, f.offset + 3, f.offset + len(f.head) - 1}
        cuts |= {f.offset + len(f.head) + 1, f.offset + f.size - 1, f.offset + f.size}
    cut = tmp_path / "cut.state"
    for n in sorted(cuts):
        cut.write_bytes(data[:n])
        with pytest.raises(AgentError, match="corrupt"):
            load_state(cut)
        with pytest.raises(AgentError, match="corrupt"):  # the headers alone tell
            _frames(cut)


def test_a_corrupt_state_is_refused(many: tuple[Path, dict[str, Stat]], tmp_path: Path) -> None:
    path, _ = many
    data = path.read_bytes()
    frames = _frames(path)
    middle = frames[len(frames) // 2]
    bad = tmp_path / "bad.state"
    places = {
        "content": middle.offset + len(middle.head) + 40,
        "header": middle.offset + 2,  # its compressed length
        "first dir": middle.offset + len(middle.head) - 6,
        "end": len(data) - 12,
    }
    for where, at in places.items():
        spoilt = bytearray(data)
        spoilt[at] ^= 0x41
        bad.write_bytes(bytes(spoilt))
        with pytest.raises(AgentError, match="corrupt"):
            load_state(bad)
        if where != "content":  # refused before any content is read
            with pytest.raises(AgentError, match="corrupt"):
                _frames(bad)
    # A frame dropped whole: each header is sound, the end marker's counts are not.
    bad.write_bytes(data[: middle.offset] + data[middle.offset + middle.size :])
    with pytest.raises(AgentError, match="corrupt"):
        _frames(bad)
    bad.write_bytes(data + b"x")
    with pytest.raises(AgentError, match="corrupt"):
        _frames(bad)


def test_frames_copied_whole_read_as_a_rewrite(
    many: tuple[Path, dict[str, Stat]], tmp_path: Path
) -> None:
    path, entries = many
    copied, mixed = tmp_path / "copied.state", tmp_path / "mixed.state"
    with StateReader(path) as r, StateWriter(copied) as w:
        for frame in r.frames():
            w.copy(frame)
    assert copied.read_bytes() == path.read_bytes()
    # Every other frame rewritten block by block: the rest copied as stored.
    with StateReader(path) as r, StateWriter(mixed) as w:
        for i, frame in enumerate(r.frames()):
            if i % 2:
                w.copy(frame)
            else:
                for item in frame.stored():
                    w.write(item.block())
    assert load_state(mixed) == entries
    assert check_state(mixed) == len(entries)


def test_small_frames_left_by_rewrites_join_their_neighbours(tmp_path: Path) -> None:
    """What is left of a rewritten frame takes the next frame in when both fit in
    one: checkpoints that each rewrite a frame smaller do not leave ever more
    small frames."""
    path = tmp_path / "s.state"
    save_state(path, _entries(60, 30))
    n = len(_frames(path))
    for shrunk in (2, 1):  # frame 2 made small, then frame 1: they become one
        nxt = tmp_path / "next.state"
        with StateReader(path) as r, StateWriter(nxt) as w:
            for i, frame in enumerate(r.frames()):
                if i != shrunk:
                    w.copy(frame)
                    continue
                for item in frame.stored():
                    d, names, records = item.block()
                    keep = len(names) // 4 or 1
                    w.write((d, names[:keep], records[:keep]))
        os.replace(nxt, path)
    assert len(_frames(path)) == n - 1
    assert check_state(path) > 0


def _v2(path: Path, entries: dict[str, Stat]) -> None:
    """A state as the second format wrote it: one zstd stream of length-framed
    marshal'ed blocks, ended by an empty frame."""
    raw = bytearray()
    for block in blocks_of(entries):
        data = marshal.dumps(block)
        raw += struct.pack("<I", len(data)) + data
    raw += struct.pack("<I", 0)
    path.write_bytes(b"STUDIO-STATE-2\n" + zstandard.ZstdCompressor().compress(bytes(raw)))


def test_a_state_of_the_second_format_is_read_and_carried_on(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in ("a/b", "c"):
        (root / d).mkdir(parents=True)
        (root / d / "f").write_text(d)
    excluder = Excluder(root, [], [])
    entries = scan(root, excluder).entries
    old, new = tmp_path / "old.state", tmp_path / "new.state"
    _v2(old, entries)
    assert load_state(old) == entries
    (root / "c/f").write_text("changed")
    with StateReader(old) as r:
        done = scan_and_write(
            root, excluder, r.blocks(), io.BytesIO(), state=new, dirty={"c": {"f"}}
        )
    assert done.changes.upserts == ["c/f"]
    assert new.read_bytes().startswith(b"STUDIO-STATE-3\n")
    assert load_state(new) == scan(root, excluder).entries
    _v2(old, entries)
    cut = old.read_bytes()
    old.write_bytes(cut[: len(cut) - 3])
    with pytest.raises(AgentError, match="corrupt"):
        load_state(old)


def test_names_that_are_not_utf8_round_trip(tmp_path: Path) -> None:
    """Paths as the walk decodes them (surrogate escapes), in blocks and in the
    frame headers that name a first and a last directory."""
    odd = os.fsdecode(b"d\xff\xfe")
    entries = {odd: _DIR, f"{odd}/f\udcff": (0o100644, 0, 0, 1, 1, 1, 2, 1, "")}
    path = tmp_path / "odd.state"
    save_state(path, entries)
    assert load_state(path) == entries
    assert _frames(path)[0].last == odd


_NAMES = strat.text(alphabet="ab-./0\udcff", min_size=1, max_size=3).filter(
    lambda s: "/" not in s and s not in (".", "..")
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tree=strat.dictionaries(
        strat.lists(_NAMES, min_size=1, max_size=3).map("/".join),
        strat.integers(0, 2**40),
        max_size=60,
    ),
    copy_every=strat.integers(1, 3),
    size=strat.sampled_from([64, 512, 1 << 18]),
)
def test_random_trees_round_trip_through_copies_and_rewrites(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tree: dict[str, int],
    copy_every: int,
    size: int,
) -> None:
    """Any tree, in frames of any size, read back the same whether its frames are
    copied whole or rewritten."""
    monkeypatch.setattr(state, "_FRAME_RAW", size)
    entries: dict[str, Stat] = {}
    for path, n in tree.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), _DIR)
        entries.setdefault(path, (0o100644, 0, 0, n % 99, n, n, n, 1, ""))
    first, second = tmp_path / "first.state", tmp_path / "second.state"
    save_state(first, entries)
    assert load_state(first) == entries
    with StateReader(first) as r, StateWriter(second) as w:
        for i, frame in enumerate(r.frames()):
            if i % copy_every:
                for item in frame.stored():
                    w.add(item)
            else:
                w.copy(frame)
    assert load_state(second) == entries


def test_a_watched_checkpoint_copies_the_frames_it_was_not_told_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames of one directory or a few: what the watch names is read again, and a
    directory gone, one new and one replaced by a file are joined in, among
    frames copied as stored; the next state equals a full walk's."""
    monkeypatch.setattr(state, "_FRAME_RAW", 700)
    root = tmp_path / "root"
    for d in range(40):
        sub = root / f"t{d % 4}" / f"d{d:02}"
        sub.mkdir(parents=True)
        for i in range(8):
            (sub / f"f{i}").write_text(f"{d} {i}\n")
    (root / "t1/d05/deep/er").mkdir(parents=True)
    (root / "t1/d05/deep/er/x").write_text("x")
    excluder = Excluder(root, [], [])
    parent = tmp_path / "parent.state"
    scan_and_write(root, excluder, {}, io.BytesIO(), state=parent)
    assert len(_frames(parent)) > 20
    (root / "t2/d10/f3").write_text("changed\n")
    (root / "t0/d20/f0").unlink()
    for f in (root / "t1/d05").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((root / "t1/d05").rglob("*"), reverse=True):
        d.rmdir()
    (root / "t1/d05").rmdir()
    (root / "t1/d05").write_text("a file where a directory was\n")
    (root / "t3/new/sub").mkdir(parents=True)
    (root / "t3/new/sub/g").write_text("new\n")
    # As the watch names them: each changed entry in its directory, and each
    # directory whose entries changed in its parent (its mtime moved).
    dirty = {
        "t2/d10": {"f3"},
        "t0/d20": {"f0"},
        "t0": {"d20"},
        "t1": {"d05"},
        "t3": {"new"},
        "": {"t1", "t3"},
    }

    split = 0
    real = StateReader.split

    def counted(self: StateReader, frame: Frame) -> Iterator[state.Stored]:
        nonlocal split
        split += 1
        return real(self, frame)

    monkeypatch.setattr(StateReader, "split", counted)  # a spy: the real reader runs
    watched, walked = tmp_path / "watched.state", tmp_path / "walked.state"
    with StateReader(parent) as r:
        w = scan_and_write(root, excluder, r.blocks(), io.BytesIO(), state=watched, dirty=dirty)
    opened = split
    with StateReader(parent) as r:
        f = scan_and_write(root, excluder, r.blocks(), io.BytesIO(), state=walked)
    assert sorted(w.changes.upserts) == sorted(f.changes.upserts)
    assert w.changes.deletions == f.changes.deletions == ["t0/d20/f0"]
    assert "t1/d05" in w.changes.upserts and w.changes.replaced > 0
    assert w.changes.replaced == f.changes.replaced
    assert load_state(watched) == load_state(walked) == scan(root, excluder).entries
    assert opened <= 8 < len(_frames(parent))  # the frames of what was named, and few more
