"""The layer writer's compiled framer writes what its Python path writes.

``LayerWriter.add_listing`` hands runs of a directory's small plain files to
``agent.checkpoint._tarfiles.frame_files``, which reads them and frames them
as tar entries without the GIL, and stops at the first file it does not frame;
``add`` writes that one.  These tests compare its bytes with
``tarformat.encode_header``'s, check what it declines and what it reports as
changed since the scan, and compare whole layers written with and without it.
"""

from __future__ import annotations

import io
import os
import string
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from agent.checkpoint import layer_writer
from agent.checkpoint import tarformat as tf
from agent.checkpoint._tarfiles import frame_files
from agent.checkpoint.layer_writer import WHOLE_FILE_MAX, LayerWriter, poisoned
from agent.checkpoint.pipeline import scan_and_write
from agent.checkpoint.scan import Excluder, Stat, stat_record

LIMIT = 1 << 20


def _record(path: Path) -> Stat:
    return stat_record(os.lstat(path))


def _python_entry(name: str, rec: Stat, data: bytes) -> bytes:
    """The entry as ``LayerWriter.add`` writes a small file."""
    header = tf.encode_header(name, tf.REGTYPE, rec[0], rec[1], rec[2], rec[3], rec[4])
    return header + data + tf.padding(rec[3])


class Dir:
    """A directory's listing, as the walk gives it to the writer."""

    def __init__(self, path: Path, prefix: str = "d/") -> None:
        self.path, self.prefix = path, prefix
        self.names = sorted(os.listdir(path))
        self.records = [_record(path / n) for n in self.names]

    def frame(
        self, which: list[int] | None = None, start: int = 0, limit: int = LIMIT
    ) -> tuple[bytearray, int, int, list[int]]:
        buf = bytearray()
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            which = list(range(len(self.names))) if which is None else which
            count, content, dirty = frame_files(
                buf, fd, self.prefix.encode(), self.names, self.records, which, start, limit,
                WHOLE_FILE_MAX,
            )  # fmt: skip
        finally:
            os.close(fd)
        return buf, count, content, dirty

    def expected(self, upto: int) -> bytes:
        return b"".join(
            _python_entry(self.prefix + n, r, (self.path / n).read_bytes())
            for n, r in zip(self.names[:upto], self.records[:upto], strict=True)
        )


def _files(d: Path, sizes: list[int]) -> None:
    d.mkdir(exist_ok=True)
    for i, size in enumerate(sizes):
        (d / f"f{i:03d}").write_bytes(os.urandom(size))


def test_the_writer_uses_the_built_framer() -> None:
    # CI installs from source: a build that quietly left it out fails here.
    assert layer_writer._frame_files is frame_files


def test_sizes_around_the_block_frame_as_python_frames_them(tmp_path: Path) -> None:
    sizes = [0, 1, 511, 512, 513, 1024, 4095, WHOLE_FILE_MAX]
    _files(tmp_path / "d", sizes)
    os.utime(tmp_path / "d" / "f001", ns=(0, 1_700_000_000_000_000_000))  # whole seconds: no PAX
    os.utime(tmp_path / "d" / "f002", ns=(0, 0))
    d = Dir(tmp_path / "d")
    buf, count, content, dirty = d.frame()
    assert (count, content, dirty) == (len(sizes), sum(sizes), [])
    assert bytes(buf) == d.expected(len(sizes))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    files=hs.dictionaries(
        hs.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=100),
        hs.tuples(hs.integers(0, 3000), hs.integers(0, 2**33 - 1), hs.integers(0, 999_999_999)),
        min_size=1,
        max_size=12,
    ),
    prefix=hs.sampled_from(["", "d/", "a/deeper/path/of/some/length/"]),
)
def test_any_small_files_frame_as_python_frames_them(
    tmp_path_factory: pytest.TempPathFactory,
    files: dict[str, tuple[int, int, int]],
    prefix: str,
) -> None:
    d = tmp_path_factory.mktemp("d")
    for name, (size, secs, frac) in files.items():
        if name in (".", ".."):
            continue
        (d / name).write_bytes(os.urandom(size))
        os.utime(d / name, ns=(0, secs * 1_000_000_000 + frac))
    listing = Dir(d, prefix)
    fits = [len(prefix) + len(n) <= 100 for n in listing.names]
    upto = fits.index(False) if False in fits else len(fits)
    buf, count, _, dirty = listing.frame()
    assert (count, dirty) == (upto, [])  # a path too long for ustar is the caller's
    assert bytes(buf) == listing.expected(upto)


def test_it_stops_at_each_kind_of_file_it_leaves_to_python(tmp_path: Path) -> None:
    odd = {  # each sorts after "f000"
        "g-xattr": lambda p: (p.write_bytes(b"x"), os.setxattr(p, "user.k", b"v")),
        "h-link": lambda p: (p.write_bytes(b"x"), os.link(p, p.with_name("other"))),
        "i-large": lambda p: p.write_bytes(bytes(WHOLE_FILE_MAX + 1)),
        "j-fifo": lambda p: os.mkfifo(p),
        "k-symlink": lambda p: os.symlink("f000", p),
        "l-dir": lambda p: p.mkdir(),
        "m-é": lambda p: p.write_bytes(b"x"),
        "n-" + "x" * 97: lambda p: p.write_bytes(b"x"),  # "d/n-xxx…": 101 bytes
    }
    for k, (name, make) in enumerate(odd.items()):
        sub = tmp_path / f"case{k}"
        _files(sub, [3])
        make(sub / name)
        listing = Dir(sub)
        assert listing.names[:2] == ["f000", name]
        buf, count, _, _ = listing.frame(which=[0, 1])
        assert count == 1, name
        assert bytes(buf) == listing.expected(1), name
    fits = tmp_path / "fits"
    _files(fits, [])
    (fits / ("n-" + "x" * 96)).write_bytes(b"x")  # "d/n-xxx…": 100 bytes, the most ustar holds
    assert Dir(fits).frame()[1] == 1


def test_a_file_gone_or_replaced_since_the_walk_is_left_to_python(tmp_path: Path) -> None:
    d = tmp_path / "d"
    _files(d, [5, 6, 7])
    listing = Dir(d)
    (d / "f001").unlink()
    buf, count, _, _ = listing.frame()
    assert count == 1 and bytes(buf) == listing.expected(1)
    os.mkfifo(d / "f001")  # a FIFO in its place: not opened for reading, never waited on
    buf, count, _, _ = listing.frame()
    assert count == 1 and bytes(buf) == listing.expected(1)
    # (and the writer's Python path reverts it: its record stays the parent's)
    writer = LayerWriter(tmp_path, io.BytesIO())
    out = writer.add_listing("d", listing.names, listing.records, [0, 1, 2])
    writer.abandon()
    assert out == {1: None} and writer.result.reverted == ["d/f001"]


def test_a_file_changed_since_its_record_is_written_at_the_recorded_size_and_dirty(
    tmp_path: Path,
) -> None:
    d = tmp_path / "d"
    _files(d, [100, 100, 100, 100])
    listing = Dir(d)
    (d / "f001").write_bytes(b"short")  # truncated: zeros up to the recorded size
    (d / "f002").write_bytes(bytes(range(256)) * 2)  # grown: only the recorded size
    rec = listing.records[3]
    listing.records[3] = (*rec[:4], rec[4] + 1, *rec[5:])  # type: ignore[assignment]
    buf, count, content, dirty = listing.frame()
    assert (count, content, dirty) == (4, 400, [1, 2, 3])
    entries = [
        _python_entry("d/f000", listing.records[0], (d / "f000").read_bytes()),
        _python_entry("d/f001", listing.records[1], b"short" + bytes(95)),
        _python_entry("d/f002", listing.records[2], (bytes(range(256)) * 2)[:100]),
        _python_entry("d/f003", listing.records[3], (d / "f003").read_bytes()),
    ]
    assert bytes(buf) == b"".join(entries)
    # The writer keeps poisoned records for them, so the next checkpoint reads them again.
    writer = LayerWriter(tmp_path, io.BytesIO())
    out = writer.add_listing("d", listing.names, listing.records, [0, 1, 2, 3])
    writer.abandon()
    assert out == {i: poisoned(listing.records[i]) for i in (1, 2, 3)}


def test_it_stops_once_the_buffer_reaches_the_limit_and_resumes(tmp_path: Path) -> None:
    d = tmp_path / "d"
    _files(d, [3000] * 10)
    listing = Dir(d)
    buf, count, _, _ = listing.frame(limit=5000)
    assert count == 2 and len(buf) >= 5000
    rest, more, _, _ = listing.frame(start=count, limit=LIMIT)
    assert more == 8 and bytes(buf + rest) == listing.expected(10)
    _, some, _, _ = listing.frame(which=[1, 3, 5])
    assert some == 3


def test_bad_input_raises_and_leaves_the_buffer_as_it_was(tmp_path: Path) -> None:
    d = tmp_path / "d"
    _files(d, [3])
    listing = Dir(d)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    buf = bytearray(b"held")

    def call(**kw: object) -> object:
        args: dict[str, object] = dict(
            buf=buf, dirfd=fd, prefix=b"d/", names=listing.names, records=listing.records,
            which=[0], start=0, limit=LIMIT, max_size=WHOLE_FILE_MAX,
        )  # fmt: skip
        args.update(kw)
        return frame_files(*args.values())  # type: ignore[arg-type]

    try:
        with pytest.raises(IndexError):
            call(which=[5])
        with pytest.raises(TypeError):
            call(records=[("not", "a", "record")])
        with pytest.raises(TypeError):
            call(records=[(*listing.records[0][:3], 3.0, *listing.records[0][4:])])
        with pytest.raises(TypeError):
            call(which=["0"])
        with pytest.raises(ValueError):
            call(start=-1)
        with pytest.raises(TypeError):
            call(buf=b"bytes")
        assert buf == b"held"
        assert call(prefix="é/".encode()) == (0, 0, [])  # a path ustar cannot hold
        assert call(names=["../d/f000"]) == (0, 0, [])  # a name is one component
        assert call(dirfd=-1) == (0, 0, [])  # (the open fails: left to Python)
        assert buf == b"held"
    finally:
        os.close(fd)


def _tree(root: Path) -> None:
    """Every kind of entry the writer meets, with small files around each."""
    data = root / "data"
    for i, d in enumerate(["a", "b/c", "b/é", "x" * 90, "b/e"]):  # data/xxx…/f000: 100 bytes
        (data / d).mkdir(parents=True, exist_ok=True)
        _files(data / d, [0, 1, 700, 5000][i % 4 :] * 3)
    (data / "b" / "large").write_bytes(os.urandom(WHOLE_FILE_MAX + 10))
    (data / "a" / "xattr").write_bytes(b"x")
    os.setxattr(data / "a" / "xattr", "user.k", b"v")
    os.link(data / "a" / "f000", data / "b" / "linked")
    os.symlink("../a/f001", data / "b" / "sym")
    os.mkfifo(data / "b" / "fifo")
    (data / "b" / "c" / ("long-" + "y" * 120)).write_bytes(b"long name")
    (data / "b" / "c" / "whole-second").write_bytes(b"t")
    os.utime(data / "b" / "c" / "whole-second", ns=(0, 1_600_000_000_000_000_000))


def _layer(
    root: Path, state: Path, monkeypatch: pytest.MonkeyPatch, framer: bool
) -> tuple[bytes, tuple[object, ...], int]:
    """The layer's tar stream, what the pass reports, and the files the framer wrote."""
    framed = []

    def counted(*args: object) -> tuple[int, int, list[int]]:
        got = frame_files(*args)  # type: ignore[arg-type]
        framed.append(got[0])
        return got

    with monkeypatch.context() as m:
        m.setattr(layer_writer, "_frame_files", counted if framer else None)
        out = io.BytesIO()
        done = scan_and_write(root, Excluder(root, [], []), {}, out, state=state)
    assert done.layer is not None
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.getvalue())).read()
    layer, upserts = done.layer, done.changes.upserts
    report = (layer.entries, layer.files, sorted(layer.skipped), upserts)
    return tar, report, sum(framed)


def test_a_checkpoint_is_byte_for_byte_the_one_python_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    _tree(root)
    fast = _layer(root, tmp_path / "fast.state", monkeypatch, framer=True)
    careful = _layer(root, tmp_path / "careful.state", monkeypatch, framer=False)
    assert fast[:2] == careful[:2]
    assert (tmp_path / "fast.state").read_bytes() == (tmp_path / "careful.state").read_bytes()
    assert fast[2] >= 30 and careful[2] == 0  # most small files went through the framer
