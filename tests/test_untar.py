"""The restore's compiled writer of plain files (``agent.checkpoint._untar``).

It writes the runs of new files of one directory that the newest layer holds;
every test here compares what it made with what the Python pass makes alone
(``restore._write_files`` set to None), and counts the files it wrote, so a
test cannot pass by the compiled path never being taken."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fsutil import Entry, diff_snapshots, small_tmpfs, snapshot, tar_bytes, zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.checkpoint import restore
from agent.checkpoint.pipeline import scan_and_write
from agent.checkpoint.restore import apply_layers
from agent.checkpoint.scan import Excluder
from agent.errors import CorruptLayer, NoSpace, UnsafeLayer

ROOT = os.geteuid() == 0


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names the compiled writer wrote, in order."""
    real = restore._write_files
    assert real is not None, "the _untar module is not built"
    names: list[str] = []

    def count(*args: object) -> tuple[int, list[str], int]:
        pos, written, content = real(*args)
        names.extend(written)
        return pos, written, content

    monkeypatch.setattr(restore, "_write_files", count)
    return names


def apply_without_untar(root: Path, layers: list[Path]) -> None:
    real = restore._write_files
    restore._write_files = None
    try:
        apply_layers(root, layers)
    finally:
        restore._write_files = real


def layer_file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / f"{name}.tar.zst"
    path.write_bytes(zstd(data))
    return path


def our_layer(tree: Path, out: Path) -> Path:
    """``tree`` as our writer writes it (nanosecond mtimes in one-record PAX headers)."""
    buf = io.BytesIO()
    done = scan_and_write(tree, Excluder(tree, [], []), {}, buf)
    assert done.layer is not None
    out.write_bytes(buf.getvalue())
    return out


NAMES = st.sampled_from(
    ["a", "b", "c", ".hidden", "sp ace", "ünï", "x" * 100, "long-" + "y" * 120, ".wh.z", "a..b"]
)
MODES = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777, 0o444, 0o000])
IDS = st.sampled_from([0, 1000, 65534, 3_000_000] if ROOT else [os.geteuid()])
FILES = st.lists(
    st.tuples(
        st.sampled_from(["", "d", "d/e"]),
        NAMES,
        st.binary(max_size=1500),
        MODES,
        IDS,
        st.integers(min_value=0, max_value=4_000_000_000_000_000_000),
    ),
    min_size=1,
    max_size=20,
)
# What the root holds before the restore: files and symlinks (out of the root too)
# at names the layer may write, and a directory the layer's files go into.
BASE = st.lists(
    st.tuples(
        st.sampled_from(["", "d"]),
        st.sampled_from(["a", "b", ".hidden"]),
        st.sampled_from(["file", "symlink", "dir"]),
    ),
    max_size=4,
)


def make_tree(tree: Path, files: list[tuple[str, str, bytes, int, int, int]]) -> None:
    for head, name, data, mode, uid, mtime in files:
        d = tree / head if head else tree
        d.mkdir(parents=True, exist_ok=True)
        p = d / name
        if p.is_dir() or p.exists():
            continue
        p.write_bytes(data)
        if ROOT:
            os.chown(p, uid, uid)
        os.chmod(p, mode)
        os.utime(p, ns=(mtime, mtime))


def make_base(root: Path, outside: Path, base: list[tuple[str, str, str]]) -> None:
    for head, name, kind in base:
        d = root / head if head else root
        d.mkdir(parents=True, exist_ok=True)
        p = d / name
        if os.path.lexists(p):
            continue
        if kind == "file":
            p.write_bytes(b"image")
        elif kind == "symlink":
            p.symlink_to(outside / "target")
        else:
            p.mkdir()
    made = sorted(root.rglob("*"), key=lambda p: -len(p.parts))  # deepest first
    for p in made:
        os.utime(p, ns=(1_600_000_000_000_000_000,) * 2, follow_symlinks=False)


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    made = iter(range(1 << 30))
    return lambda: tmp_path_factory.mktemp(f"u{next(made)}")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(files=FILES, base=BASE)
def test_what_it_writes_is_what_the_pass_writes(
    scratch: Callable[[], Path],
    files: list[tuple[str, str, bytes, int, int, int]],
    base: list[tuple[str, str, str]],
) -> None:
    """Our writer's layer of any such files over any such root: the same tree,
    the same untouched outside, with the compiled writer and without it."""
    tmp = scratch()
    tree, outside = tmp / "tree", tmp / "outside"
    tree.mkdir()
    outside.mkdir()
    (outside / "target").write_bytes(b"outside")
    make_tree(tree, files)
    layer = our_layer(tree, tmp / "layer.tar.zst")
    results = []
    for label, apply in (("untar", apply_layers), ("pass", apply_without_untar)):
        root = tmp / label
        root.mkdir()
        make_base(root, outside, base)
        try:
            apply(root, [layer])
            results.append(("ok", snapshot(root)))
        except (CorruptLayer, UnsafeLayer) as e:  # the same refusal either way
            results.append((type(e).__name__, {}))
        assert (outside / "target").read_bytes() == b"outside"
        assert sorted(p.name for p in outside.iterdir()) == ["target"]
    assert results[0][0] == results[1][0]
    assert diff_snapshots(results[0][1], results[1][1]) == []


def test_a_software_install_is_written_in_runs(tmp_path: Path, counted: list[str]) -> None:
    """Most files of a tree of many small files in few directories go through it,
    and the tree restores exactly."""
    tree = tmp_path / "tree"
    for d in range(10):
        (tree / f"pkg{d}" / "sub").mkdir(parents=True)
        for i in range(50):
            f = tree / f"pkg{d}" / ("sub" if i % 2 else "") / f"m{i}.py"
            f.write_bytes(b"x" * (i * 37))
            os.utime(f, ns=(1_700_000_000_123_456_789 + i, 1_700_000_000_123_456_789 + i))
    layer = our_layer(tree, tmp_path / "layer.tar.zst")
    root = tmp_path / "root"
    root.mkdir()
    apply_layers(root, [layer])
    assert diff_snapshots(snapshot(tree), snapshot(root)) == []
    # All but the first file of each directory, and one where the decompressed
    # buffers meet.
    assert len(counted) >= 500 - 20 - 5
    assert "pkg3/sub/m7.py" in counted


def test_a_symlink_planted_at_a_name_is_replaced_not_followed(
    tmp_path: Path, counted: list[str]
) -> None:
    """A name that exists stops the run (O_EXCL, which never follows a symlink);
    the pass replaces it, and the run goes on after it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_bytes(b"outside")
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f2").symlink_to(outside / "target")
    layer = tar_bytes([Entry(f"d/f{i}", data=b"%d" % i) for i in range(1, 6)])
    apply_layers(root, [layer_file(tmp_path, "l", layer)])
    assert (outside / "target").read_bytes() == b"outside"
    assert not (root / "d" / "f2").is_symlink()
    assert [(root / "d" / f"f{i}").read_bytes() for i in range(1, 6)] == [
        b"%d" % i for i in range(1, 6)
    ]
    assert "d/f2" not in counted and {"d/f3", "d/f4", "d/f5"} <= set(counted)


@pytest.mark.parametrize(
    "name",
    ["d/../../escape", "d/..", "d/./x", "d//x", "d/.wh..wh..opq", "/abs", "d/x\\"],
)
def test_a_crafted_name_in_a_run_is_judged_by_the_pass(tmp_path: Path, name: str) -> None:
    """A run never writes a name that is not one plain name in its directory:
    what follows a good file is refused, or applied, as the pass alone does."""
    entries = [
        Entry("d", type=tarfile.DIRTYPE, mode=0o755),
        Entry("d/ok", data=b"ok"),
        Entry(name, data=b"bad"),
        Entry("d/after", data=b"a"),
    ]
    layer = layer_file(tmp_path, "l", tar_bytes(entries))
    results: list[tuple[str, dict[str, object]]] = []
    for label, apply in (("untar", apply_layers), ("pass", apply_without_untar)):
        root = tmp_path / label / "root"
        root.mkdir(parents=True)
        try:
            apply(root, [layer])
            results.append(("ok", snapshot(root)))
        except (CorruptLayer, UnsafeLayer) as e:  # before the directories' times were set
            contents = {k: v[6] for k, v in snapshot(root).items()}
            results.append((str(e).replace(str(root), "<root>"), contents))
        assert sorted(p.name for p in (tmp_path / label).iterdir()) == ["root"]
    assert results[0] == results[1]


def test_a_corrupt_header_in_a_run_is_refused(tmp_path: Path, counted: list[str]) -> None:
    data = bytearray(tar_bytes([Entry(f"d/f{i}", data=b"z" * 10) for i in range(4)]))
    third = 2 * 2 * 512  # each entry: its header and one block of content
    data[third + 148] ^= 1  # the third file's checksum
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(CorruptLayer, match="checksum"):
        apply_layers(root, [layer_file(tmp_path, "l", bytes(data))])
    assert counted == ["d/f1"]
    assert not (tmp_path / "root" / "d" / "f2").exists()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs the right to mount: root with CAP_SYS_ADMIN)."""
    with small_tmpfs(tmp_path, "4m") as mnt:
        yield mnt


def test_a_run_stops_at_the_free_space_budget(
    tmp_path: Path, small_fs: Path, counted: list[str]
) -> None:
    """Files of a run are charged as the pass charges them: the layer that does
    not fit stops with NoSpace, every file written before it whole."""
    layer = tar_bytes([Entry(f"d/f{i:03}", data=bytes([i]) * 60_000) for i in range(100)])
    root = small_fs / "root"
    root.mkdir()
    with pytest.raises(NoSpace, match=r"'d/f\d+'"):
        apply_layers(root, [layer_file(tmp_path, "l", layer)], reserve=0)
    written = sorted((root / "d").iterdir())
    assert counted and len(written) < 100
    for f in written:
        i = int(f.name[1:])
        assert f.read_bytes() == bytes([i]) * 60_000


_FSIZE = """
import resource, signal, sys
from pathlib import Path
from agent.checkpoint import restore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
written = []
real = restore._write_files
def count(*args):
    pos, names, content = real(*args)
    written.extend(names)
    return pos, names, content
restore._write_files = count
try:
    restore.apply_layers(Path(sys.argv[1]), [Path(sys.argv[2])])
except OSError as e:
    print("failed:", e)
print("untar wrote:", written)
"""


def test_a_file_it_cannot_write_is_left_to_the_pass_with_nothing_behind(tmp_path: Path) -> None:
    """A write that fails in a run (here past the file-size limit) removes what
    it created: the pass then fails on that file, naming it, and leaves no part
    of it under its name, while the files before it stay whole."""
    layer = tar_bytes(
        [
            Entry("d/a", data=b"a" * 100),
            Entry("d/b", data=b"b" * 100),
            Entry("d/big", data=b"x" * 8000),
        ]
    )
    path = layer_file(tmp_path, "l", layer)
    root = tmp_path / "root"
    root.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _FSIZE, str(root), str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "failed: [Errno 27] File too large" in done.stdout and "/d/big'" in done.stdout
    assert "untar wrote: ['d/b']" in done.stdout  # it tried d/big too, and gave it back
    assert sorted(p.name for p in (root / "d").iterdir()) == ["a", "b"]
    assert (root / "d" / "b").read_bytes() == b"b" * 100


def test_a_global_pax_header_leaves_everything_after_it_to_the_pass(
    tmp_path: Path, counted: list[str]
) -> None:
    """Its records apply to every later entry, which only the parser knows."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as tar:  # fmt: skip
        for i in range(4):
            info = tarfile.TarInfo(f"d/f{i}")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"g"))
    root = tmp_path / "root"
    root.mkdir()
    apply_layers(root, [layer_file(tmp_path, "l", buf.getvalue())])
    assert counted == []
    assert [(root / "d" / f"f{i}").read_bytes() for i in range(4)] == [b"g"] * 4


def test_older_layers_and_protected_directories_are_the_pass_alone(
    tmp_path: Path, counted: list[str]
) -> None:
    """Only the newest layer's files skip the merge decisions; below a protected
    path nothing is written at all, as without the compiled writer."""
    old = layer_file(tmp_path, "old", tar_bytes([Entry(f"o/f{i}", data=b"o") for i in range(5)]))
    new = layer_file(
        tmp_path, "new",
        tar_bytes([Entry(f"n/f{i}", data=b"n") for i in range(5)]
                  + [Entry(f"keep/f{i}", data=b"k") for i in range(5)]),
    )  # fmt: skip
    root = tmp_path / "root"
    root.mkdir()
    apply_layers(root, [old, new], protected=["keep"])
    assert sorted(counted) == [f"n/f{i}" for i in range(1, 5)]
    assert sorted(p.name for p in (root / "o").iterdir()) == [f"f{i}" for i in range(5)]
    assert not (root / "keep").exists()
