"""The walk's compiled lister gives what the careful Python listing gives.

``scan.walk`` lists a directory with nothing excluded through
``agent.checkpoint._listdir`` (after a large directory, the next ones on its
stack read ahead by the lister's pool of threads, ``Lister``) and falls
back to ``_list_careful`` for what the lister declines; each test walks the
same tree both ways, the compiled one listing every directory in batches,
and compares every directory's names and records.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from agent.checkpoint import scan
from agent.checkpoint._listdir import Lister, list_dir
from agent.checkpoint.paths import RESTORE_TEMP_PREFIX
from agent.checkpoint.scan import Excluder, Scan, walk

Listed = list[tuple[str, list[str], list[scan.Stat]]]


def _walk(root: Path, *, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Listed, Scan]:
    with monkeypatch.context() as m:
        if compiled:  # every directory listed with the next ones, two threads at once
            m.setattr(scan, "PARALLEL_FROM", 0)
            m.setattr(scan, "LISTERS", 2)
        else:
            m.setattr(scan, "_list_dir", None)
        result = Scan()
        excluder = Excluder(root, [], [])
        listed = [(d, names, records) for d, names, records, _ in walk(root, excluder, result)]
    return listed, result


def _both(root: Path, monkeypatch: pytest.MonkeyPatch) -> Listed:
    fast, fast_scan = _walk(root, compiled=True, monkeypatch=monkeypatch)
    careful, careful_scan = _walk(root, compiled=False, monkeypatch=monkeypatch)
    assert fast == careful
    assert (fast_scan.count, fast_scan.skipped) == (careful_scan.count, careful_scan.skipped)
    return fast


def _listing(d: Path) -> tuple[list[str], list[scan.Stat]] | None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return list_dir(fd, os.lstat(d).st_dev, os.fsencode(RESTORE_TEMP_PREFIX))
    finally:
        os.close(fd)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    r = tmp_path / "root"
    r.mkdir()
    yield r


def test_the_compiled_lister_is_what_the_walk_uses() -> None:
    # Installed from source, the module is built; the walk must not silently
    # fall back to the careful listing everywhere.
    assert scan._list_dir is list_dir


def test_every_kind_of_entry_is_listed_as_the_careful_walk_lists_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "dir/sub").mkdir(parents=True)
    (root / "dir/sub/file").write_bytes(b"x" * 5000)
    (root / "empty").mkdir()
    (root / "file").write_text("hello")
    os.link(root / "file", root / "dir/hardlink")
    os.symlink("file", root / "link")
    os.symlink("/" + "long/" * 700 + "target", root / "dir/long-link")  # 3.5 KB target
    os.symlink(b"\xff\xfe-target", os.fsencode(root / "dir/odd-link"))
    os.mkfifo(root / "fifo")
    os.chmod(root / "dir/sub", 0o700)
    os.utime(root / "file", ns=(1, -1_500_000_000))  # before 1970, with nanoseconds
    listed = _both(root, monkeypatch)
    by_dir = {d: dict(zip(names, records, strict=True)) for d, names, records in listed}
    assert by_dir["dir"]["long-link"][scan.TARGET] == "/" + "long/" * 700 + "target"
    assert by_dir["dir"]["odd-link"][scan.TARGET] == os.fsdecode(b"\xff\xfe-target")
    assert by_dir[""]["file"][scan.MTIME] == -1_500_000_000
    assert by_dir[""]["file"][scan.NLINK] == 2


def test_names_sort_as_python_strings_not_as_bytes(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A byte that is no UTF-8 decodes to a lone surrogate (U+DC80 to U+DCFF):
    # as a string it sorts after U+20AC and before U+1D11E, as bytes (0x80,
    # 0xff) before or after every multi-byte character.
    names = [b"a", b"B", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9d\x84\x9e", b"\xff", b"\x80x"]
    names.append(b".hidden")
    for n in names:
        Path(os.fsdecode(os.fsencode(root) + b"/" + n)).write_bytes(n)
    listed = _both(root, monkeypatch)
    top = listed[0][1]
    assert top == sorted(os.fsdecode(n) for n in names)
    got = _listing(root)
    assert got is not None and got[0] == top


def test_batches_keep_the_order_and_decline_one_directory_alone(tmp_path: Path) -> None:
    dirs = []
    for i in range(6):
        d = tmp_path / f"d{i}"
        d.mkdir()
        for j in range(i * 30):
            (d / f"f{j}").touch()
        dirs.append(d)
    (dirs[3] / f"{RESTORE_TEMP_PREFIX}t").touch()  # declined, the others not
    fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in dirs]
    try:
        skip = os.fsencode(RESTORE_TEMP_PREFIX)
        dev = os.lstat(tmp_path).st_dev
        now = [list_dir(fd, dev, skip) for fd in fds]
        assert [g is None for g in now] == [False, False, False, True, False, False]
        for threads in (-1, 1, 2, 16, 99):  # (none, and as many as it allows)
            later = Lister(dev, skip, threads).later(_opened(dirs))
            assert [later.take(i) for i in range(len(dirs))] == now
        with pytest.raises(TypeError):
            list_dir("x", dev, skip)  # type: ignore[arg-type]
    finally:
        for fd in fds:
            os.close(fd)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _batch_dirs(tmp_path: Path) -> list[Path]:
    dirs = []
    for i in range(5):
        d = tmp_path / f"d{i}"
        d.mkdir()
        for j in range(i * 40):
            (d / f"f{j}").write_bytes(b"x" * j)
        dirs.append(d)
    (dirs[2] / f"{RESTORE_TEMP_PREFIX}t").touch()  # declined, the others not
    return dirs


def _opened(dirs: list[Path]) -> list[int]:
    return [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in dirs]


def test_a_directory_read_ahead_is_what_it_would_be_now_and_owns_its_descriptor(
    tmp_path: Path,
) -> None:
    dirs = _batch_dirs(tmp_path)
    skip = os.fsencode(RESTORE_TEMP_PREFIX)
    dev = os.lstat(tmp_path).st_dev
    fds = _opened(dirs)
    try:
        now = [list_dir(fd, dev, skip) for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)
    assert now[2] is None and all(now[i] is not None for i in (0, 1, 3, 4))
    before = _open_fds()
    for threads in (0, 1, 2, 16):
        lister = Lister(dev, skip, threads)
        first, second = lister.later(_opened(dirs[:3])), lister.later(_opened(dirs[3:]))
        # Taken in any order, each once: as it would be read now.
        assert [second.take(1), first.take(0), second.take(0)] == [now[4], now[0], now[3]]
        assert [first.take(2), first.take(1)] == [now[2], now[1]]
        with pytest.raises(RuntimeError, match="already taken"):
            first.take(1)
        with pytest.raises(IndexError):
            first.take(3)
        del first, second
        assert _open_fds() == before  # closed, once read
        dropped = lister.later(_opened(dirs))
        dropped.take(4)
        del dropped  # the rest never taken: its descriptors closed all the same
        del lister  # its threads stopped
        assert _open_fds() == before
    with pytest.raises(IndexError):
        Lister(dev, skip, 2).later([]).take(0)


def test_a_batch_takes_its_descriptors_out_of_the_list_or_none_of_them(
    tmp_path: Path,
) -> None:
    """What the caller still owns is what is left in the list: all of it when the
    hand-over fails, none once it succeeded (so an exception right after it
    cannot make the caller close a descriptor twice)."""
    dirs = _batch_dirs(tmp_path)
    lister = Lister(os.lstat(tmp_path).st_dev, os.fsencode(RESTORE_TEMP_PREFIX), 2)
    fds = _opened(dirs[:2])
    later = lister.later(fds)
    assert fds == []
    assert later.take(0) is not None and later.take(1) is not None
    mine = _opened(dirs[:1])
    for bad in ([-1], [-100], [2**40], mine * 2):  # (AT_FDCWD; one descriptor twice)
        given = list(bad)
        with pytest.raises(ValueError, match="descriptor"):
            lister.later(given)
        assert given == bad
    with pytest.raises(TypeError, match="list"):
        lister.later(tuple(mine))
    os.fstat(mine[0])  # still open: still the caller's
    os.close(mine[0])


def test_the_threads_read_ahead_only_within_the_budget(tmp_path: Path) -> None:
    """The threads take no directory while the listings read and not yet taken
    hold the budget's entries: with none, each is read when the walk takes it,
    so a wide tree read ahead cannot fill memory."""
    dirs = _batch_dirs(tmp_path)
    del dirs[2]  # (the declined one)
    skip = os.fsencode(RESTORE_TEMP_PREFIX)
    dev = os.lstat(tmp_path).st_dev
    lister = Lister(dev, skip, 2, budget=0)
    later = lister.later(_opened(dirs))
    for d in dirs:
        (d / "late").touch()  # after the hand-over: seen only where read after it
    for i, d in enumerate(dirs):
        got = later.take(i)
        assert got is not None and got[0] == sorted(os.listdir(d))
        assert "late" in got[0]
    with pytest.raises(ValueError, match="budget"):
        Lister(dev, skip, 1, budget=-1)


def test_a_walk_left_midway_leaves_no_descriptor_open(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(40):
        d = root / f"d{i:02d}"
        d.mkdir()
        for k in range(scan.PARALLEL_FROM):
            (d / f"f{k:03d}").touch()
    monkeypatch.setattr(scan, "LISTERS", 2)
    before = _open_fds()
    walking = walk(root, Excluder(root, [], []), Scan())
    for _ in range(3):  # the root, then two directories, with more being read ahead
        next(walking)
    walking.close()
    assert _open_fds() == before


def test_a_large_tree_walks_alike_with_the_default_batches(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(12):  # directories large enough to start the threads
        for j in range(3):
            d = root / f"top{i:02d}" / f"mid{j}"
            d.mkdir(parents=True)
            for k in range(scan.PARALLEL_FROM + 5):
                (d / f"file{k:03d}").write_bytes(b"x" * k)
        (root / f"top{i:02d}" / "link").symlink_to("mid0")
    fast = [(d, n, r) for d, n, r, _ in walk(root, Excluder(root, [], []), Scan())]
    careful, _ = _walk(root, compiled=False, monkeypatch=monkeypatch)
    assert fast == careful


def test_a_directory_larger_than_one_read_is_listed_whole(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5000):
        (root / f"entry-{i:05d}-{'x' * 40}").touch()
    listed = _both(root, monkeypatch)
    assert len(listed[0][1]) == 5000


def test_what_the_lister_declines_the_careful_listing_does(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = root / "with-temp"
    temp.mkdir()
    (temp / f"{RESTORE_TEMP_PREFIX}abc").write_text("half restored")
    (temp / "kept").write_text("k")
    future = root / "future"
    future.mkdir()
    (future / "f").touch()
    # Nanoseconds past a signed 64-bit integer (the year 2286): Python's ints hold them.
    far = 10**19
    try:
        os.utime(future / "f", ns=(far, far))
    except OSError:
        pytest.skip("this filesystem does not keep times past 2262")
    if os.lstat(future / "f").st_mtime_ns != far:
        pytest.skip("this filesystem clamps times past 2262")
    assert _listing(temp) is None
    assert _listing(future) is None
    assert _listing(root) is not None
    by_dir = {d: (names, records) for d, names, records in _both(root, monkeypatch)}
    assert by_dir["with-temp"][0] == ["kept"]  # the restore temporary is never recorded
    assert by_dir["future"][1][0][scan.MTIME] == far


def test_a_listing_leaves_the_descriptor_where_it_was(root: Path) -> None:
    # The careful listing of a directory the lister declined reads the same
    # descriptor again: it must find every entry.
    (root / "a").touch()
    (root / f"{RESTORE_TEMP_PREFIX}x").touch()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert list_dir(fd, os.lstat(root).st_dev, os.fsencode(RESTORE_TEMP_PREFIX)) is None
        assert sorted(os.listdir(fd)) == sorted(["a", f"{RESTORE_TEMP_PREFIX}x"])
    finally:
        os.close(fd)


def test_a_descriptor_that_is_no_directory_is_declined(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.touch()
    fd = os.open(f, os.O_RDONLY)
    try:
        assert list_dir(fd, 0, b"") is None
    finally:
        os.close(fd)
    with pytest.raises(TypeError):
        list_dir("not a descriptor", 0, b"")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="descriptor"):
        list_dir(-100, 0, b"")  # (AT_FDCWD: never the working directory)


_name = hs.one_of(
    hs.text(string.ascii_letters + string.digits + "._-éü€", min_size=1, max_size=12),
    hs.binary(min_size=1, max_size=8),
).map(lambda n: os.fsencode(n) if isinstance(n, str) else n)


def _valid(name: bytes) -> bool:
    return b"/" not in name and b"\0" not in name and name not in (b".", b"..")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tree=hs.lists(
        hs.tuples(hs.lists(_name.filter(_valid), min_size=1, max_size=3), hs.sampled_from("fdl")),
        max_size=25,
    )
)
def test_any_tree_is_listed_as_the_careful_walk_lists_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tree: list[tuple[list[bytes], str]]
) -> None:
    root = tmp_path / os.urandom(6).hex()
    root.mkdir()
    base = os.fsencode(root)
    for parts, kind in tree:
        path = base + b"/" + b"/".join(parts)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if kind == "f":
                with open(path, "xb") as f:
                    f.write(path[-7:])
            elif kind == "d":
                os.mkdir(path)
            else:
                os.symlink(parts[-1] + b"-target", path)
        except OSError:  # a name taken by another kind, a parent that is a symlink
            continue
    _both(root, monkeypatch)
