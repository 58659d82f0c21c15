"""A checkpoint's layer cut into segments, each stored as soon as it is complete.

Each segment is a layer of its own (a whole tar in one zstd frame, under its
own digest), no path is in two of them, and together they restore what the
uncut layer restores, hardlinks across segments included.  A session on either
store restores every checkpoint exactly when its layers are cut at every
chance; a segment the store refuses fails the checkpoint and loses nothing;
and the squash policy counts a cut layer once.

Some tests force a cut at every flush (``_cut_everywhere``): the mechanics, the
stores and the restore are the real ones; only the moment of the cut, which
would otherwise wait for megabytes of compressed output, is chosen for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO
from unittest import mock

import pytest
from fault_proxy import Fault, FaultProxy
from fsutil import copy_tree, diff_snapshots, settings_for, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3_server import S3Endpoint
from test_engine_roundtrip import OPS, _scenario
from test_store_s3_stream import Bucket, fill_root

from agent.checkpoint import layer_writer
from agent.checkpoint.layer_reader import LayerReader
from agent.checkpoint.layer_writer import LayerWriter, Segment
from agent.checkpoint.manifest import LayerDesc
from agent.checkpoint.merge import read_order
from agent.checkpoint.pipeline import scan_and_write
from agent.checkpoint.restore import LayerFile, apply_layers
from agent.checkpoint.scan import Excluder, Stat, scan
from agent.checkpoint.squash import squash_layers
from agent.errors import AgentError, StoreUnavailable
from agent.session import Session
from agent.session.segments import SegmentUploads
from agent.session.squash import plan
from agent.settings import Settings, load_settings
from agent.store.base import Store
from agent.store.local import LocalStore
from agent.store.s3 import S3Store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown and xattrs need root")

MiB = 1 << 20
_SLOW = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@contextlib.contextmanager
def _cut_everywhere() -> Iterator[None]:
    """Check for a cut after every few hundred bytes, and cut at every check."""
    with (
        mock.patch.object(layer_writer, "FLUSH_AT", 256),
        mock.patch.object(LayerWriter, "_segment_full", lambda self, number, size: True),
    ):
        yield


def _entries(root: Path) -> dict[str, Stat]:
    return scan(root, Excluder(root, [], [])).entries


def _members(path: Path) -> list[tuple[str, bytes, str]]:
    with path.open("rb") as f, LayerReader(f) as reader:
        return [(m.name, m.type, m.linkname) for m in reader.members()]


class _Files:
    """Segments written to numbered files, as a store's sinks would take them."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self.paths: list[Path] = []
        self._open: list[BinaryIO] = []

    def open(self) -> BinaryIO:
        path = self._tmp / f"segment-{len(self.paths)}"
        self.paths.append(path)
        f = path.open("wb")
        self._open.append(f)
        return f

    def next_segment(self, _segment: Segment) -> BinaryIO:
        self._open[-1].close()
        return self.open()

    def close(self) -> None:
        for f in self._open:
            f.close()


def _refusing(files: _Files, at: int, handed: list[Segment]) -> Callable[[Segment], BinaryIO]:
    """``next_segment`` as a full spool gives it: the ``at``-th segment is refused."""

    def refuse(segment: Segment) -> BinaryIO:
        handed.append(segment)
        if len(handed) == at:
            raise OSError(28, "No space left on device")
        return files.next_segment(segment)

    return refuse


def _tree(root: Path) -> dict[str, Stat]:
    """A root, the parent state it had, and changes after it: new files with
    hardlinks whose names fall in different segments, and a new name of an
    unchanged file (its link entry comes at the layer's end)."""
    root.mkdir()
    (root / "keep").write_bytes(b"unchanged, linked later\n")
    parent = _entries(root)
    for d in range(6):
        (root / f"d{d}").mkdir()
        for i in range(40):
            (root / f"d{d}/f{i}").write_bytes(os.urandom(2000 + 37 * i))
    os.link(root / "d0/f1", root / "d5/link-to-d0")
    os.link(root / "d2/f3", root / "d4/link-to-d2")
    os.link(root / "keep", root / "d3/new-name-of-keep")
    # Read in chunks, one after the other, each with its padding to 512 bytes:
    # a cut between them falls after the padding.
    (root / "d5/big1").write_bytes(os.urandom(3 * MiB + 100))
    (root / "d5/big2").write_bytes(os.urandom(MiB + 1001))
    os.symlink("f1", root / "d1/sym")
    return parent


def test_a_cut_layer_is_segments_that_restore_what_the_uncut_one_does(tmp_path: Path) -> None:
    root = tmp_path / "root"
    parent = _tree(root)
    uncut = io.BytesIO()
    whole = scan_and_write(root, Excluder(root, [], []), parent, uncut)
    assert whole.layer is not None and len(whole.layer.segments) == 1

    files = _Files(tmp_path)
    with _cut_everywhere():
        done = scan_and_write(
            root, Excluder(root, [], []), parent, files.open(),
            segment_bytes=1, next_segment=files.next_segment,
        )  # fmt: skip
    files.close()
    layer = done.layer
    assert layer is not None
    assert len(layer.segments) == len(files.paths) > 10
    for seg, path in zip(layer.segments, files.paths, strict=True):
        data = path.read_bytes()
        assert seg.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert seg.size == len(data)
    assert layer.digest == layer.segments[-1].digest
    assert layer.size == sum(s.size for s in layer.segments)
    assert layer.uncompressed == sum(s.uncompressed for s in layer.segments)
    assert layer.entries == sum(s.entries for s in layer.segments) == whole.layer.entries
    assert layer.files == sum(s.files for s in layer.segments) == whole.layer.files

    # Each a layer on its own; together the uncut layer's entries, each path once.
    members = [_members(p) for p in files.paths]
    assert all(m for m in members)
    flat = [m for ms in members for m in ms]
    uncut_path = tmp_path / "uncut"
    uncut_path.write_bytes(uncut.getvalue())
    assert flat == _members(uncut_path)
    assert len({name for name, _, _ in flat}) == len(flat)
    where = {name: i for i, ms in enumerate(members) for name, _, _ in ms}
    links = [(name, target) for name, kind, target in flat if kind == b"1"]
    assert len(links) == 3
    assert all(where[name] >= where[target] for name, target in links)
    assert sum(where[name] > where[target] for name, target in links) >= 2  # across segments

    for layers, name in ((files.paths, "cut"), ([uncut_path], "uncut")):
        target = tmp_path / f"restored-{name}"
        target.mkdir()
        (target / "keep").write_bytes(b"unchanged, linked later\n")
        apply_layers(target, layers)
        problems = diff_snapshots(snapshot(root), snapshot(target))
        assert not problems, f"{name}: " + "\n".join(problems[:10])


def _newer(tmp: Path, root: Path, how: str) -> Path:
    """A newer checkpoint's layer over ``_tree``'s, as a watched checkpoint writes
    it: the target of a hardlink of an earlier segment removed (or its directory,
    or replaced by a new file), its other name not seen to change."""
    out = tmp / f"newer-{how}"
    with out.open("wb") as f:
        if how == "replaced":
            newer = tmp / "newer-root"
            (newer / "d0").mkdir(parents=True)
            (newer / "d0/f1").write_bytes(b"a new file under the old name\n")
            scan_and_write(newer, Excluder(newer, [], []), {}, f)
        else:
            LayerWriter(root, f).finish(["d0/f1" if how == "target" else "d2"], {})
    return out


@pytest.mark.parametrize("how", ["target", "directory", "replaced"])
def test_a_hardlink_across_segments_keeps_its_content_when_a_newer_layer_hides_its_target(
    tmp_path: Path, how: str
) -> None:
    """The restore and the squash read a cut layer as the one layer it was written
    as: a hardlink's content whose first name a newer layer removed or replaced is
    read again from the segment that has it, as from the uncut layer."""
    root = tmp_path / "root"
    parent = _tree(root)
    uncut = tmp_path / "uncut"
    with uncut.open("wb") as f:
        scan_and_write(root, Excluder(root, [], []), parent, f)
    files = _Files(tmp_path)
    with _cut_everywhere():
        scan_and_write(
            root, Excluder(root, [], []), parent, files.open(),
            segment_bytes=1, next_segment=files.next_segment,
        )  # fmt: skip
    files.close()
    where = {name: i for i, p in enumerate(files.paths) for name, _, _ in _members(p)}
    assert where["d5/link-to-d0"] > where["d0/f1"] and where["d4/link-to-d2"] > where["d2/f3"]
    newer = _newer(tmp_path, root, how)
    cut = [*files.paths, newer]
    continues = [False, *([True] * (len(files.paths) - 1)), False]

    opened: list[Path] = []

    def counted(path: Path) -> LayerFile:
        def opener() -> BinaryIO:
            opened.append(path)
            return path.open("rb")

        return LayerFile(opener=opener)

    def restored(name: str, layers: list[Path], marks: list[bool]) -> Path:
        target = tmp_path / f"restored-{name}"
        target.mkdir()
        (target / "keep").write_bytes(b"unchanged, linked later\n")
        apply_layers(target, [counted(x) for x in layers], continues=marks)
        return target

    expected = snapshot(restored("uncut", [uncut, newer], []))
    assert "d5/link-to-d0" in expected and "d4/link-to-d2" in expected
    opened.clear()
    problems = diff_snapshots(expected, snapshot(restored("cut", cut, continues)))
    assert not problems, "\n".join(problems[:10])
    # Read again: only the segment that holds the hidden target, not the whole layer.
    hidden = {"target": "d0/f1", "directory": "d2/f3", "replaced": "d0/f1"}[how]
    assert sorted(opened) == sorted([*cut, files.paths[where[hidden]]])

    squashed = tmp_path / "squashed"
    told: list[int] = []
    opened.clear()
    with squashed.open("wb") as f:
        squash_layers(
            [counted(x) for x in cut], f, continues=continues,
            progress=lambda done, _total: told.append(done),
        )  # fmt: skip
    assert sorted(opened) == sorted([*cut, files.paths[where[hidden]]])
    assert len(told) == len(cut) and told == sorted(set(told))  # after every segment
    problems = diff_snapshots(expected, snapshot(restored("squashed", [squashed], [])))
    assert not problems, "\n".join(problems[:10])


def test_the_merge_reads_each_layer_newest_first_and_its_segments_in_order() -> None:
    assert read_order(3) == [2, 1, 0]
    assert read_order(5, [False, True, True, False, True]) == [3, 4, 0, 1, 2]
    # A mark on the first blob means nothing; marks must match the blobs.
    assert read_order(2, [True, False]) == [1, 0]
    with pytest.raises(ValueError, match="marks"):
        read_order(2, [False])


@pytest.mark.parametrize("size", [MiB, MiB + 1], ids=["read-whole", "streamed"])
def test_segments_end_at_about_their_size_when_the_compressor_says_so(
    tmp_path: Path, size: int
) -> None:
    """No forcing: the compressed size as the compressor reports it decides, for
    files read whole into the buffer and for larger ones streamed past it."""
    root = tmp_path / "root"
    root.mkdir()
    for i in range(12):
        (root / f"f{i}").write_bytes(os.urandom(size))
    files = _Files(tmp_path)
    done = scan_and_write(
        root, Excluder(root, [], []), {}, files.open(),
        segment_bytes=2 * MiB, next_segment=files.next_segment,
    )  # fmt: skip
    files.close()
    assert done.layer is not None
    sizes = [s.size for s in done.layer.segments]
    assert 4 <= len(sizes) <= 7, sizes
    assert all(2 * MiB <= size < 3.5 * MiB for size in sizes[:-1]), sizes
    assert sizes[-1] < 3.5 * MiB, sizes


def test_no_segment_is_left_without_an_entry(tmp_path: Path) -> None:
    """A segment full before an entry that is not written after all (a socket, the
    last of the walk) is not ended for it."""
    root = tmp_path / "root"
    root.mkdir()
    for i in range(8):
        (root / f"f{i}").write_bytes(os.urandom(3000))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "zz.sock"))
        files = _Files(tmp_path)
        with _cut_everywhere():
            done = scan_and_write(
                root, Excluder(root, [], []), {}, files.open(),
                segment_bytes=1, next_segment=files.next_segment,
            )  # fmt: skip
        files.close()
    assert done.layer is not None
    assert [path for path, _ in done.layer.skipped] == ["zz.sock"]
    assert len(files.paths) > 2
    assert all(_members(path) for path in files.paths)
    assert all(seg.entries for seg in done.layer.segments)


def test_a_segment_that_cannot_be_written_is_the_layers_error_not_a_files(
    tmp_path: Path,
) -> None:
    """A segment that fails while a file's entry begins fails the layer: the file
    is not reported unreadable, nor left out as if it were."""
    root = tmp_path / "root"
    root.mkdir()
    for i in range(30):
        (root / f"f{i:02}").write_bytes(os.urandom(3000))
    records = _entries(root)
    files = _Files(tmp_path)
    handed: list[Segment] = []
    refuse = _refusing(files, 2, handed)
    with _cut_everywhere():
        writer = LayerWriter(root, files.open(), segment_bytes=1, next_segment=refuse)
        with pytest.raises(OSError, match="No space left"):
            for path in sorted(p for p in records if p):
                writer.add(path, records[path])
            writer.finish([], records)
    writer.abandon()
    files.close()
    assert len(handed) == 2
    assert writer.result.skipped == [] and writer.result.reverted == []


def test_a_segment_that_cannot_be_stored_stops_the_layer(tmp_path: Path) -> None:
    root = tmp_path / "root"
    parent = _tree(root)
    files = _Files(tmp_path)
    handed: list[Segment] = []
    refuse = _refusing(files, 3, handed)
    with _cut_everywhere(), pytest.raises(OSError, match="No space left"):
        scan_and_write(
            root, Excluder(root, [], []), parent, files.open(),
            segment_bytes=1, next_segment=refuse, state=tmp_path / "next.state",
        )  # fmt: skip
    files.close()
    assert len(handed) == 3
    assert not (tmp_path / "next.state").exists()
    assert [t for t in threading.enumerate() if t.name == "layer-compress"] == []


# -- sessions: every checkpoint restores exactly when cut at every chance ------------------


def _cut_local(tmp: Path) -> Store:
    store = LocalStore(tmp / "work")
    store.segment_size = 1
    return store


@settings(max_examples=40, deadline=None, suppress_health_check=_SLOW)
@given(ops=st.lists(OPS, min_size=1, max_size=8), data=st.data())
def test_every_cut_checkpoint_restores_exactly(ops: list[str], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp, _cut_everywhere():
        asyncio.run(_scenario(Path(tmp), _cut_local, ops, data))


@settings(max_examples=8, deadline=None, suppress_health_check=_SLOW)
@given(ops=st.lists(OPS, min_size=1, max_size=5), data=st.data())
def test_every_cut_checkpoint_restores_exactly_through_s3(
    s3_workdir: str, ops: list[str], data: st.DataObject
) -> None:
    settings_ = load_settings(s3_part_size=5 << 20, s3_segment_size=1)

    def make_store(_tmp: Path) -> Store:
        return S3Store.from_url(f"{s3_workdir}/{uuid.uuid4().hex[:8]}", settings_)

    with tempfile.TemporaryDirectory() as tmp, _cut_everywhere():
        asyncio.run(_scenario(Path(tmp), make_store, ops, data))


def _cut_session(tmp: Path) -> tuple[Path, Path, Store, Session]:
    """An empty image (``base``), a root on it, and its session on a store that
    cuts every layer."""
    base = tmp / "base"
    base.mkdir()
    live = tmp / "live"
    copy_tree(base, live)
    store = _cut_local(tmp)
    return base, live, store, Session(settings_for(live, tmp / "work", tmp / "state"), store)


async def test_a_cut_chain_squashed_restores_the_same(tmp_path: Path) -> None:
    base, live, store, session = _cut_session(tmp_path)
    with _cut_everywhere():
        await session.baseline()
        for step in range(3):
            for i in range(20):
                (live / f"s{step}-f{i}").write_bytes(os.urandom(700))
            os.link(live / f"s{step}-f0", live / f"s{step}-zz-link")
            if step:
                (live / f"s{step - 1}-f3").unlink()
            await session.checkpoint(f"c{step}")
        expected = snapshot(live)
        before = session.chain
        assert len(before) > 6 and sum(not x.continues for x in before) == 3
        outcome = await session.squash("c2")
    assert outcome.squashed >= 2
    target = tmp_path / "target"
    copy_tree(base, target)
    restorer = Session(settings_for(target, tmp_path / "work", tmp_path / "st2"), store)
    await restorer.start("c2", required=True)
    problems = diff_snapshots(expected, snapshot(target))
    assert not problems, "\n".join(problems[:10])


class _Saw:
    """What the change watch (``checkpoint/watch.py``, tested on its own) reports
    for the unlink of one name: the name, and its directory's own mtime in the
    directory above.  It stands in for the watch so the checkpoint reads only
    that, as a watched one does, and not the other name's link count."""

    def __init__(self, dirty: dict[str, set[str]]) -> None:
        self._dirty: dict[str, set[str]] | None = dirty

    def take(self) -> dict[str, set[str]] | None:
        dirty, self._dirty = self._dirty, None
        return dirty

    def spoil(self) -> None:
        self._dirty = None


async def test_a_session_restores_a_hardlink_whose_first_name_went_after_its_segment(
    tmp_path: Path,
) -> None:
    """A file's first name removed in a watched checkpoint, its other name, in a
    later segment of an older checkpoint, not seen to change: restored (and squashed,
    then restored) with its content, as the uncut layer restores it."""
    base, live, store, session = _cut_session(tmp_path)
    with _cut_everywhere():
        await session.baseline()
        for d in ("a", "m", "z"):
            (live / d).mkdir()
            for i in range(20):
                (live / f"{d}/f{i}").write_bytes(os.urandom(900))
        os.link(live / "a/f0", live / "z/second-name")
        await session.checkpoint("c0")
        assert sum(x.continues for x in session.chain) > 2
        (live / "a/f0").unlink()
        await session.checkpoint("c1", changes_since=_Saw({"a": {"f0"}, "": {"a"}}))
        expected = snapshot(live)
        assert "z/second-name" in expected
        targets = []
        for name, squash in (("restored", False), ("squashed", True)):
            if squash:
                outcome = await session.squash("c1")
                assert outcome.squashed >= 2
            target = tmp_path / name
            copy_tree(base, target)
            restorer = Session(
                settings_for(target, tmp_path / "work", tmp_path / f"st-{name}"), store
            )
            await restorer.start("c1", required=True)
            targets.append(target)
    for target in targets:
        problems = diff_snapshots(expected, snapshot(target))
        assert not problems, f"{target.name}: " + "\n".join(problems[:10])


# -- a segment the store refuses ---------------------------------------------------------


async def test_a_segment_s3_refuses_fails_the_checkpoint_and_loses_nothing(
    fault_proxy: FaultProxy,
    s3_env: Callable[[str], None],
    s3_workdir: str,
    store_settings: Settings,
    tmp_path: Path,
) -> None:
    s3_env(fault_proxy.endpoint_url)
    store = S3Store.from_url(
        s3_workdir,
        store_settings.model_copy(update={"s3_segment_size": 256 << 10}),
        backoff_base=0.01,
    )
    base = tmp_path / "base"
    base.mkdir()
    live = tmp_path / "live"
    copy_tree(base, live)
    state = tmp_path / "state"
    try:
        session = Session(settings_for(live, tmp_path / "work", state), store)
        await session.baseline()
        (live / "first").write_bytes(b"the checkpoint that must survive\n")
        await session.checkpoint("before")
        kept = snapshot(live)
        for i in range(10):
            (live / f"big{i}").write_bytes(os.urandom(MiB))
        # The first segment goes; every later put of a blob fails.
        fault_proxy.add(Fault("status", operation="PutObject", path="/blobs/", skip=1, times=None))
        with pytest.raises(StoreUnavailable, match="PutObject"):
            await session.checkpoint("after")
        assert fault_proxy.count("PutObject", "status") >= 3
        assert [p.name for p in (state / "spool").iterdir()] == []
        assert [c.name for c in await session.list_checkpoints()] == ["before"]

        target = tmp_path / "target"
        copy_tree(base, target)
        restorer = Session(settings_for(target, tmp_path / "work", tmp_path / "st2"), store)
        await restorer.start("before", required=True)
        assert not diff_snapshots(kept, snapshot(target))

        fault_proxy.clear()
        await session.checkpoint("after")
        assert sum(x.continues for x in session.chain) >= 2
        shutil.rmtree(target)
        copy_tree(base, target)
        restorer = Session(settings_for(target, tmp_path / "work", tmp_path / "st3"), store)
        await restorer.start("after", required=True)
        problems = diff_snapshots(snapshot(live), snapshot(target))
        assert not problems, "\n".join(problems[:10])
    finally:
        await store.close()


async def test_a_checkpoint_killed_between_segments_keeps_the_last_one_whole(
    fault_proxy: FaultProxy,
    s3_env: Callable[[str], None],
    s3_workdir: str,
    s3_endpoint: S3Endpoint,
    store_settings: Settings,
    tmp_path: Path,
) -> None:
    """SIGKILL with two segments stored and the third stalled: no ref moves, the
    next start clears the spool, and its checkpoint holds everything."""
    s3_env(fault_proxy.endpoint_url)
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    bucket = Bucket(s3_endpoint, S3Store.from_url(s3_workdir, store_settings))

    async def agent(*args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "--root", str(root), "--workdir", s3_workdir,
            "--studio", "k", "--state-dir", str(state), "--s3-segment-size", str(MiB), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def run(*args: str) -> None:
        proc = await agent(*args)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()

    await run("baseline")
    (root / "first").write_text("kept\n")
    await run("checkpoint", "--name", "before")
    refs = {k: bucket.read(k) for k in bucket.keys("refs/")}
    fill_root(root, 8, 6)  # six segments of incompressible MiB
    fault_proxy.add(Fault("stall", operation="PutObject", path="/blobs/", skip=2, times=None))
    proc = await agent("checkpoint", "--name", "work")
    async with asyncio.timeout(120):
        while fault_proxy.count("PutObject", "stall") == 0:
            await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    await proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    fault_proxy.clear()

    assert {k: bucket.read(k) for k in bucket.keys("refs/")} == refs
    assert len(list((state / "spool").iterdir())) >= 2  # segments still spooled
    await run("checkpoint", "--name", "work")
    assert list((state / "spool").iterdir()) == []
    for name in ("before", "work"):
        target = tmp_path / f"target-{name}"
        target.mkdir()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "--root", str(target), "--workdir", s3_workdir,
            "--studio", "k", "--state-dir", str(tmp_path / f"st-{name}"), "restore",
            "--checkpoint", name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
    assert (tmp_path / "target-before/first").read_text() == "kept\n"
    assert not (tmp_path / "target-before/data").exists()
    assert diff_snapshots(snapshot(root), snapshot(tmp_path / "target-work")) == []


async def test_no_segment_narrows_the_lease_after_the_whole_layer_was_named(
    tmp_path: Path,
) -> None:
    """A segment whose store starts after the lease named the whole layer (and its
    manifest) writes no lease of its own, which would leave the manifest out."""
    store = LocalStore(tmp_path / "work")
    spool = tmp_path / "spool"
    spool.mkdir()
    calls: list[tuple[str, list[str]]] = []
    gate = asyncio.Event()

    async def cover(digests: list[str]) -> None:
        calls.append(("segments", digests))
        await gate.wait()

    async def final() -> None:
        calls.append(("whole", []))

    uploads = SegmentUploads(store, spool, "a" * 32, cover)
    out = uploads.open()
    segments = []
    for i in range(2):
        data = f"segment {i}".encode() * 100
        out.write(data)
        seg = Segment("sha256:" + hashlib.sha256(data).hexdigest(), len(data), len(data), 1, 1)
        segments.append(seg)
        out = await asyncio.to_thread(uploads.next_segment, seg)
        if i == 0:
            while not calls:  # the first one's lease write has begun, and waits
                await asyncio.sleep(0.01)
            whole = asyncio.ensure_future(uploads.cover_last(final))
            for _ in range(3):  # it runs, and waits for the lock the first one holds
                await asyncio.sleep(0)
    gate.set()
    await whole
    await uploads.stored()
    assert calls == [("segments", [segments[0].digest]), ("whole", [])]
    for seg in segments:
        assert await store.has_blob(seg.digest)
    await uploads.discard()
    assert list(spool.iterdir()) == []
    await store.close()


async def test_a_checkpoint_given_up_names_and_stores_no_segment_after(tmp_path: Path) -> None:
    """Once the checkpoint is given up (``discard``, as when the final checkpoint
    runs out of time), a segment its walk still completes is refused, so no
    lease write or put lands after the checkpoint ended, and no spool file stays."""
    store = LocalStore(tmp_path / "work")
    spool = tmp_path / "spool"
    spool.mkdir()
    named: list[list[str]] = []

    async def cover(digests: list[str]) -> None:
        named.append(digests)

    uploads = SegmentUploads(store, spool, "b" * 32, cover)
    out = uploads.open()
    data = b"the first segment" * 100
    out.write(data)
    first = Segment("sha256:" + hashlib.sha256(data).hexdigest(), len(data), len(data), 1, 1)
    out = await asyncio.to_thread(uploads.next_segment, first)
    out.write(b"the second, never complete")
    await uploads.discard()
    late = Segment("sha256:" + "1" * 64, 10, 10, 1, 1)
    with pytest.raises(AgentError, match="given up"):
        await asyncio.to_thread(uploads.next_segment, late)
    with pytest.raises(AgentError, match="given up"):
        uploads.open()
    await asyncio.sleep(0)
    assert named == [[first.digest]]
    assert await store.has_blob(first.digest)  # stored before: left for gc
    assert list(spool.iterdir()) == []
    await store.close()


# -- the squash policy counts a cut layer once ------------------------------------------


def _layer(mb: int, *, continues: bool = False, replaced: int = 0) -> LayerDesc:
    return LayerDesc("sha256:" + "0" * 64, mb * MiB, 1, mb * MiB, replaced * MiB, continues)


def test_the_policy_never_merges_a_cut_layer_for_its_segments() -> None:
    baseline = [_layer(12), *(_layer(12, continues=True) for _ in range(40))]
    assert plan(baseline, 16) is None
    assert plan([*baseline, _layer(1), _layer(1)], 16) is None


def test_the_policy_starts_a_squash_only_where_a_checkpoint_starts() -> None:
    baseline = [_layer(12), *(_layer(12, continues=True) for _ in range(3))]
    install = [_layer(2), _layer(2, continues=True), _layer(2, continues=True)]
    small = [_layer(1) for _ in range(4)]
    chain = [*baseline, *install, *small]
    start = plan(chain, 4)  # six checkpoints: more than four
    assert start == len(baseline)  # the install's first segment, with the small ones
    assert plan(chain, 8) is None
