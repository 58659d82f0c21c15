"""The squash engine: a run of layers compacted into one gives, on the same base,
the very root the layers gave (every kept attribute compared), and reports what
of each layer was superseded."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
from fsutil import (
    Entry,
    Snapshot,
    copy_tree,
    diff_snapshots,
    settings_for,
    snapshot,
    tar_bytes,
    zstd,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_roundtrip import OPS, _apply, _make_base

from agent.checkpoint.layer_reader import LayerReader
from agent.checkpoint.restore import apply_layers
from agent.checkpoint.squash import Cancelled, squash_layers
from agent.errors import CorruptLayer
from agent.session import Session
from agent.store.local import LocalStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown and xattrs need root")

_SLOW = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def _blob(work: Path, digest: str) -> Path:
    return work / ".studios/checkpoints/blobs/sha256" / digest.split(":")[1]


def _squashed(tmp: Path, layers: list[Path], start: int) -> list[Path]:
    """The chain with ``layers[start:]`` squashed into one layer."""
    out = tmp / f"squashed-{start}-{len(layers)}.tar.zst"
    with open(out, "wb") as f:
        result = squash_layers(layers[start:], f)
    assert result.layer.digest and result.layer.size == out.stat().st_size
    assert len(result.inputs) == len(layers) - start
    return [*layers[:start], out]


def _restored(tmp: Path, base: Path, layers: list[Path], name: str) -> Path:
    target = tmp / name
    copy_tree(base, target)
    apply_layers(target, layers)
    return target


def _untimed_dirs(snap: Snapshot) -> Snapshot:
    """A crafted layer changes directories without an entry of their own: their
    times are the restore's, so only theirs are left out."""
    return {k: ((*v[:4], None, *v[5:]) if v[0] == stat.S_IFDIR else v) for k, v in snap.items()}


def _same_root(tmp: Path, base: Path, chain: list[Path], other: list[Path]) -> None:
    a = _restored(tmp, base, chain, "chain")
    b = _restored(tmp, base, other, "other")
    try:
        problems = diff_snapshots(_untimed_dirs(snapshot(a)), _untimed_dirs(snapshot(b)))
        assert not problems, "\n".join(problems[:10])
    finally:
        shutil.rmtree(a)
        shutil.rmtree(b)


# -- property: the engine's random change sequences ----------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=_SLOW)
@given(ops=st.lists(OPS, min_size=1, max_size=10), data=st.data())
def test_squashed_suffix_restores_like_the_chain(ops: list[str], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_suffixes(Path(tmp), ops, data))


async def _suffixes(tmp: Path, ops: list[str], data: st.DataObject) -> None:
    base = tmp / "base"
    base.mkdir()
    _make_base(base)
    live = tmp / "live"
    copy_tree(base, live)
    work = tmp / "work"
    session = Session(settings_for(live, work, tmp / "state"), LocalStore(work))
    await session.baseline()
    for i, op in enumerate(ops):
        _apply(op, live, data)
        await session.checkpoint(f"c{i}")
    layers = [_blob(work, d.digest) for d in session.chain]
    start = data.draw(st.integers(0, max(0, len(layers) - 1)))
    squashed = _squashed(tmp, layers, start)
    # the base holds what the first layers deleted, so kept whiteouts matter
    target = _restored(tmp, base, squashed, "target")
    assert diff_snapshots(snapshot(live), snapshot(target)) == []


# -- crafted chains -------------------------------------------------------------------------


def _layer(tmp: Path, name: str, entries: list[Entry]) -> Path:
    p = tmp / f"{name}.tar.zst"
    p.write_bytes(zstd(tar_bytes(entries)))
    return p


def _names(layer: Path) -> list[str]:
    with open(layer, "rb") as f, LayerReader(f) as r:
        return [m.name for m in r.members()]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    b = tmp_path / "base"
    (b / "etc/app").mkdir(parents=True)
    (b / "etc/app/conf").write_text("image")
    (b / "etc/app/extra").write_text("image extra")
    (b / "etc/keep").write_text("keep")
    (b / "usr/share").mkdir(parents=True)
    (b / "usr/share/doc").write_text("doc")
    return b


D, F, L, S = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE


def test_whiteout_of_an_image_path_is_kept(tmp_path: Path, base: Path) -> None:
    chain = [
        _layer(tmp_path, "1", [Entry("etc/new", data=b"n")]),
        _layer(tmp_path, "2", [Entry("etc/.wh.keep"), Entry("etc/new", data=b"n2")]),
    ]
    squashed = _squashed(tmp_path, chain, 0)
    assert "etc/.wh.keep" in _names(squashed[-1])
    _same_root(tmp_path, base, chain, squashed)


def test_created_then_deleted_leaves_no_content(tmp_path: Path, base: Path) -> None:
    chain = [
        _layer(
            tmp_path, "1", [Entry("tmpdir", D, mode=0o755), Entry("tmpdir/big", data=b"x" * 5000)]
        ),
        _layer(tmp_path, "2", [Entry(".wh.tmpdir")]),
    ]
    with open(tmp_path / "out", "wb") as f:
        result = squash_layers(chain, f)
    names = _names(tmp_path / "out")
    assert names == [".wh.tmpdir"]  # the image might have had it: the whiteout stays
    assert result.inputs[0].superseded == result.inputs[0].bytes - 512  # all but the end block
    assert result.inputs[1].superseded == 0
    _same_root(tmp_path, base, chain, [tmp_path / "out"])


def test_recreated_directory_hides_the_image_below_it(tmp_path: Path, base: Path) -> None:
    chain = [
        _layer(tmp_path, "1", [Entry("etc/app/mine", data=b"older layer")]),
        _layer(tmp_path, "2", [Entry("etc/.wh.app")]),
        _layer(tmp_path, "3", [Entry("etc/app", D, mode=0o750), Entry("etc/app/new", data=b"n")]),
    ]
    squashed = _squashed(tmp_path, chain, 0)
    names = _names(squashed[-1])
    assert "etc/app/.wh..wh..opq" in names and "etc/app/mine" not in names
    assert "etc/.wh.app" not in names
    _same_root(tmp_path, base, chain, squashed)
    root = _restored(tmp_path, base, squashed, "r")
    assert sorted(os.listdir(root / "etc/app")) == ["new"]


def test_opaque_whiteout_and_a_suffix_over_lower_layers(tmp_path: Path, base: Path) -> None:
    chain = [
        _layer(tmp_path, "1", [Entry("usr/share/low", data=b"low")]),
        _layer(tmp_path, "2", [Entry("usr/share", D, mode=0o755), Entry("usr/share/.wh..wh..opq")]),
        _layer(tmp_path, "3", [Entry("usr/share/top", data=b"top"), Entry("usr/share/.wh.gone")]),
    ]
    for start in range(3):
        squashed = _squashed(tmp_path, chain, start)
        _same_root(tmp_path, base, chain, squashed)
    root = _restored(tmp_path, base, _squashed(tmp_path, chain, 1), "r")
    assert sorted(os.listdir(root / "usr/share")) == ["top"]


def test_file_made_directory_made_file(tmp_path: Path, base: Path) -> None:
    chain = [
        _layer(tmp_path, "1", [Entry("etc/app", data=b"a file now")]),
        _layer(tmp_path, "2", [Entry("etc/app", D, mode=0o700), Entry("etc/app/x", data=b"x")]),
        _layer(tmp_path, "3", [Entry("etc/keep", D, mode=0o755), Entry("etc/keep/y", data=b"y")]),
    ]
    for start in range(3):
        _same_root(tmp_path, base, chain, _squashed(tmp_path, chain, start))


def test_hardlinks_across_squashed_layers(tmp_path: Path, base: Path) -> None:
    chain = [
        _layer(
            tmp_path, "1", [Entry("data/a", data=b"first"), Entry("data/b", L, linkname="data/a")]
        ),
        # a newer layer replaces the target: the older link keeps the older content
        _layer(tmp_path, "2", [Entry("data/a", data=b"second")]),
        # a link to a file of an older layer and one to the image
        _layer(
            tmp_path,
            "3",
            [Entry("data/c", L, linkname="data/b"), Entry("etc/k2", L, linkname="etc/keep")],
        ),
    ]
    for start in range(3):
        squashed = _squashed(tmp_path, chain, start)
        names = _names(squashed[-1])
        for link in ("data/c", "etc/k2"):
            if link in names:  # every hardlink comes after its target
                with open(squashed[-1], "rb") as f, LayerReader(f) as r:
                    members = list(r.members())
                m = next(m for m in members if m.name == link)
                if m.linkname in names:
                    assert names.index(m.linkname) < names.index(link)
        _same_root(tmp_path, base, chain, squashed)
    root = _restored(tmp_path, base, _squashed(tmp_path, chain, 0), "r")
    assert (root / "data/a").read_bytes() == b"second"
    assert (root / "data/b").read_bytes() == b"first"
    assert os.stat(root / "data/b").st_ino == os.stat(root / "data/c").st_ino
    assert os.stat(root / "etc/k2").st_ino == os.stat(root / "etc/keep").st_ino


def test_link_to_content_a_newer_layer_replaced_is_refused_like_the_restore(
    tmp_path: Path, base: Path
) -> None:
    chain = [
        _layer(tmp_path, "1", [Entry("f", data=b"old")]),
        _layer(tmp_path, "2", [Entry("g", L, linkname="f")]),
        _layer(tmp_path, "3", [Entry("f", data=b"new")]),
    ]
    with pytest.raises(CorruptLayer), open(tmp_path / "out", "wb") as f:
        squash_layers(chain, f)
    target = tmp_path / "t"
    copy_tree(base, target)
    with pytest.raises(CorruptLayer):
        apply_layers(target, chain)


def test_metadata_is_kept_exactly(tmp_path: Path, base: Path) -> None:
    live = tmp_path / "live"
    copy_tree(base, live)
    work = tmp_path / "work"

    async def run() -> list[Path]:
        s = Session(settings_for(live, work, tmp_path / "st"), LocalStore(work))
        await s.baseline()
        f = live / "etc/app/conf"
        f.write_text("v1")
        os.setxattr(f, "user.k", b"v" * 300)
        os.chown(f, 3_000_000, 12345)
        os.chmod(f, 0o4751)
        os.utime(f, ns=(1, 1_700_000_000_123_456_789))
        await s.checkpoint()
        os.symlink("conf", live / "etc/app/sl")
        os.lchown(live / "etc/app/sl", 7, 8)
        os.mkfifo(live / "etc/fifo", 0o640)
        (live / "etc/app/conf").write_text("v2")
        os.utime(live / "etc/app", ns=(5, 1_600_000_000_000_000_001))
        await s.checkpoint()
        return [_blob(work, d.digest) for d in s.chain]

    chain = asyncio.run(run())
    squashed = _squashed(tmp_path, chain, 0)
    target = _restored(tmp_path, base, squashed, "target")
    assert diff_snapshots(snapshot(live), snapshot(target)) == []


def test_large_file_is_streamed(tmp_path: Path, base: Path) -> None:
    data = os.urandom(3 << 20)
    chain = [
        _layer(tmp_path, "1", [Entry("big", data=data)]),
        _layer(tmp_path, "2", [Entry("small", data=b"s")]),
    ]
    squashed = _squashed(tmp_path, chain, 0)
    root = _restored(tmp_path, base, squashed, "r")
    assert (root / "big").read_bytes() == data


def test_cancel_stops_the_squash(tmp_path: Path) -> None:
    import threading

    chain = [_layer(tmp_path, str(i), [Entry(f"f{i}", data=b"x")]) for i in range(3)]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled), open(tmp_path / "out", "wb") as f:
        squash_layers(chain, f, cancel=cancel)


def test_reported_bytes_add_up(tmp_path: Path) -> None:
    chain = [
        _layer(tmp_path, "1", [Entry("a", data=b"1" * 2000), Entry("b", data=b"b")]),
        _layer(tmp_path, "2", [Entry("a", data=b"2" * 100)]),
    ]
    with open(tmp_path / "out", "wb") as f:
        result = squash_layers(chain, f)
    low, high = result.inputs
    assert (low.entries, low.kept, high.entries, high.kept) == (2, 1, 1, 1)
    assert high.superseded == 0
    # "a" of layer 1: its header block(s) and 2000 bytes padded to 2048
    assert 2048 + 512 <= low.superseded <= 2048 + 1536
    assert low.bytes == 512 + 2048 + 512 + 512 + 512  # two members, then the end block
    assert result.superseded == low.superseded


def test_directory_recreated_by_an_entry_below_it(tmp_path: Path, base: Path) -> None:
    """A layer writing below a directory an older layer removed recreates it (as
    applying the layers in order does): the older whiteout hides only what was below."""
    chain = [
        _layer(tmp_path, "1", [Entry("etc/.wh.app")]),
        _layer(tmp_path, "2", [Entry("etc/app/new", data=b"n")]),
    ]
    for layers in (chain, _squashed(tmp_path, chain, 0)):
        root = _restored(tmp_path, base, layers, f"r{len(layers)}")
        assert sorted(os.listdir(root / "etc/app")) == ["new"]


_MILLION = r"""
import sys, zstandard
from pathlib import Path
from agent.checkpoint import tarformat as tf
from agent.checkpoint.squash import squash_layers

tmp = Path(sys.argv[1])
n = int(sys.argv[2])
def layer(path, entries):
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as z:
        for e in entries:
            z.write(e)
        z.write(tf.end_of_archive())
def first():
    for d in range(n // 1000):
        base = f"usr/lib/python3.11/site-packages/package_{d:04d}"
        yield tf.encode_header(base + "/", tf.DIRTYPE, 0o755, 0, 0, 0, 1_700_000_000_123_456_789)
        for i in range(1000):
            yield tf.encode_header(f"{base}/module_{i:04d}.py", tf.REGTYPE, 0o644, 0, 0, 0,
                                   1_700_000_000_123_456_789)
def second():
    for d in range(0, n // 1000, 10):
        base = f"usr/lib/python3.11/site-packages/package_{d:04d}"
        yield tf.encode_header(f"{base}/module_0001.py", tf.REGTYPE, 0o644, 0, 0, 0, 1)
        yield tf.encode_header(f"{base}/.wh.module_0002.py", tf.REGTYPE, 0o644, 0, 0, 0, 0)
layer(tmp / "1", first())
layer(tmp / "2", second())
def hwm():  # VmHWM, not ru_maxrss: that keeps the forking parent's peak across exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
base = hwm()
with open(tmp / "out", "wb") as f:
    result = squash_layers([tmp / "1", tmp / "2"], f, threads=1)
assert result.layer.entries >= n, result.layer.entries
print(hwm() // 1024, base // 1024)
"""


def test_a_million_paths_squash_in_bounded_memory(tmp_path: Path) -> None:
    """Memory holds a key per path, never their names or content: 1M paths under 200 MB."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _MILLION, str(tmp_path), "1000000"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    peak_mb, _before_mb = (int(x) for x in proc.stdout.split())
    assert peak_mb < 200, f"peak RSS {peak_mb} MB ({proc.stdout.strip()})"
