"""The restore's writer threads: with files in flight, every later entry that
touches the same path (a hardlink to it, a replacement, a removal, the
directory's metadata) still sees what the one ordered pass would have made; a
worker's error is the restore's error, leaving nothing half-written; and N
writers make the tree one writer makes, to the last attribute.

``held`` keeps every job from running until the ordered pass waits for one, so
a job is surely still in flight when the entries after it are applied."""

from __future__ import annotations

import errno
import os
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fsutil import Entry, diff_snapshots, small_tmpfs, snapshot, tar_bytes, zstd
from hypothesis import HealthCheck, given, settings
from test_restore_hostile_random import base_st, build_base, layer_bytes, layers_st, make_sentinel

from agent.checkpoint import tarformat as tf
from agent.checkpoint import writers as writers_module
from agent.checkpoint.diff import diff
from agent.checkpoint.layer_writer import write_layer
from agent.checkpoint.paths import RESTORE_TEMP_PREFIX
from agent.checkpoint.restore import LayerFile, apply_layers
from agent.checkpoint.scan import Excluder, Stat, scan
from agent.checkpoint.writers import SAMPLE_MAX, SAMPLE_WINDOW, FileJob, WritePolicy, Writers
from agent.errors import AgentError

ONE = WritePolicy(workers=1)
# Every file handed over from the first; few files and bytes in flight, so the
# bounds are met often; files over 64 KiB written by the pass itself.
MANY = WritePolicy(workers=4, blocked_us=0, max_files=5, max_bytes=256 << 10)
# Every file handed over; the bytes bound is what holds them back.
MANY_LARGE = WritePolicy(workers=8, blocked_us=0, max_files=16, max_bytes=4 << 20)
LAYER_TIME = 1_700_000_000 * 10**9  # every entry's mtime in fsutil's crafted layers
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="owners, and a small tmpfs, need root")


@dataclass
class Held:
    ran: list[str] = field(default_factory=list)  # jobs, in the order they ran
    waits: list[list[str]] = field(default_factory=list)  # what was in flight at each wait


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[Held]:
    """Jobs run only once the ordered pass waits for one."""
    gate = threading.Event()
    seen = Held()
    run, wait = writers_module._run, Writers._wait

    def held_run(job: FileJob) -> None:
        gate.wait()
        seen.ran.append(job.rel)
        run(job)

    def opening_wait(self: Writers) -> FileJob:
        seen.waits.append(sorted(self.pending))
        gate.set()
        try:
            return wait(self)
        finally:
            gate.clear()

    monkeypatch.setattr(writers_module, "_run", held_run)
    monkeypatch.setattr(Writers, "_wait", opening_wait)
    yield seen
    assert writer_threads() == []


def writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("restore-writer")]


def layer(tmp: Path, name: str, entries: list[Entry]) -> Path:
    path = tmp / f"{name}.tar.zst"
    path.write_bytes(zstd(tar_bytes(entries)))
    return path


def temporaries(root: Path) -> list[str]:
    return [
        os.path.join(d, n)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
        if n.startswith(RESTORE_TEMP_PREFIX)
    ]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    return root


# -- ordering with jobs in flight ---------------------------------------------------------


@pytest.mark.parametrize("replaces", [False, True], ids=["new", "replacing"])
def test_hardlink_to_a_file_still_being_written(
    root: Path, tmp_path: Path, held: Held, replaces: bool
) -> None:
    """The link is made once the target is whole and in place: linked before
    that, it would name the image's old file (a temporary not yet renamed)."""
    if replaces:
        (root / "etc/target").write_text("the image's")
    path = layer(
        tmp_path,
        "l",
        [
            Entry("etc/target", data=b"new content" * 100),
            Entry("etc/other", data=b"o"),
            Entry("etc/link", tarfile.LNKTYPE, linkname="etc/target"),
        ],
    )
    apply_layers(root, [path], writing=MANY)
    assert held.waits[0] == ["etc/other", "etc/target"]  # the link waited for it
    target, link = root / "etc/target", root / "etc/link"
    assert os.path.samefile(target, link)
    assert link.read_bytes() == b"new content" * 100
    assert target.stat().st_nlink == 2
    assert temporaries(root) == []


@dataclass(frozen=True)
class Linked:
    """A chain with a hardlink whose name is already a link of its target."""

    layers: list[list[tuple[str, str]]]  # (path, content), or "@target" for a hardlink
    nlinks: dict[str, int]  # what each path ends with
    same: tuple[str, str] | None = None  # two names of one file
    image: tuple[str, ...] = ()  # the image's files, "link=target" for its links


ALREADY_LINKED = {
    # The target in flight, then a link of it to itself.
    "to-itself": Linked([[("a", ""), ("a", "@a")]], {"a": 1}),
    # The target in flight, then the same link twice.
    "twice": Linked(
        [[("etc/t", "t"), ("etc/l", "@etc/t"), ("etc/l", "@etc/t")]],
        {"etc/t": 2},
        ("etc/t", "etc/l"),
    ),
    # A link the image has already, linked again after the layer's pass.
    "image-link-again": Linked(
        [[("etc/l", "@etc/t"), ("etc/n", "n")]],
        {"etc/t": 2, "etc/n": 1},
        ("etc/t", "etc/l"),
        ("etc/t", "etc/l=etc/t"),
    ),
    # A target a newer layer replaced, read again for the same link twice.
    "read-again-twice": Linked(
        [[("etc/t", "old"), ("etc/l", "@etc/t"), ("etc/l", "@etc/t")], [("etc/t", "new")]],
        {"etc/t": 1, "etc/l": 1},
    ),
}


@pytest.mark.parametrize("policy", [ONE, MANY], ids=["one-writer", "writers"])
@pytest.mark.parametrize("case", list(ALREADY_LINKED))
def test_a_hardlink_already_in_place_leaves_no_temporary(
    root: Path, tmp_path: Path, held: Held, policy: WritePolicy, case: str
) -> None:
    """rename(2) of one link of a file over another link of the same file does
    nothing and succeeds: a link made under a temporary and renamed over a name
    that is a link of its target already would leave the temporary beside it.
    Such a link is in place already and left as it is."""
    c = ALREADY_LINKED[case]
    for f in c.image:
        link, _, target = f.partition("=")
        if target:
            os.link(root / target, root / link)
        else:
            (root / f).write_text("the image's")
    layers = [
        layer(
            tmp_path,
            f"l{i}",
            [
                Entry(p, tarfile.LNKTYPE, linkname=d[1:])
                if d.startswith("@")
                else Entry(p, data=d.encode())
                for p, d in entries
            ],
        )
        for i, entries in enumerate(c.layers)
    ]
    apply_layers(root, layers, writing=policy)
    assert temporaries(root) == []
    assert {p: (root / p).stat().st_nlink for p in c.nlinks} == c.nlinks
    if c.same is not None:
        assert os.path.samefile(root / c.same[0], root / c.same[1])
    if case == "read-again-twice":  # the older layer's link keeps the older content
        assert (root / "etc/l").read_text() == "old"
        assert (root / "etc/t").read_text() == "new"


def test_a_later_entry_at_the_same_path_wins(root: Path, tmp_path: Path, held: Held) -> None:
    """Two entries at one path in one layer: the later is what stays, though
    the earlier one's job is still in flight when it comes (both replace the
    image's file, each by a temporary renamed over it)."""
    (root / "etc/f").write_text("the image's")
    path = layer(
        tmp_path,
        "l",
        [
            Entry("etc/f", data=b"first" * 1000),
            Entry("etc/g", data=b"g"),
            Entry("etc/f", data=b"second", mode=0o600),
        ],
    )
    apply_layers(root, [path], writing=MANY)
    assert (root / "etc/f").read_bytes() == b"second"
    assert (root / "etc/f").stat().st_mode & 0o777 == 0o600
    assert temporaries(root) == []


def test_a_file_in_flight_then_a_directory_at_its_path(
    root: Path, tmp_path: Path, held: Held
) -> None:
    path = layer(
        tmp_path,
        "l",
        [
            Entry("etc/x", data=b"a file first"),
            Entry("etc/x", tarfile.DIRTYPE, mode=0o755),
            Entry("etc/x/inner", data=b"inner"),
        ],
    )
    apply_layers(root, [path], writing=MANY)
    assert (root / "etc/x").is_dir()
    assert (root / "etc/x/inner").read_bytes() == b"inner"


def test_a_file_in_flight_then_its_directory_removed(
    root: Path, tmp_path: Path, held: Held
) -> None:
    """A whiteout of the directory, later in the same layer, removes it with the
    file in it; the file's job (replacing the image's, by a temporary in that
    directory) is finished first, not left to rename into a removed directory."""
    (root / "etc/d").mkdir()
    (root / "etc/d/f").write_text("the image's")
    path = layer(
        tmp_path,
        "l",
        [Entry("etc/d/f", data=b"new" * 1000), Entry("etc/.wh.d"), Entry("etc/after", data=b"a")],
    )
    apply_layers(root, [path], writing=MANY)
    assert not (root / "etc/d").exists()
    assert (root / "etc/after").read_bytes() == b"a"
    assert temporaries(root) == []


def test_an_older_layer_resets_a_directory_with_files_in_flight(
    root: Path, tmp_path: Path, held: Held
) -> None:
    """The newer layer's file replaces the image's under a temporary; the older
    layer's opaque whiteout then prunes everything undecided below the
    directory: the temporary of the job in flight is none of it."""
    (root / "etc/p").mkdir()
    (root / "etc/p/f").write_text("the image's")
    (root / "etc/p/old").write_text("goes")
    older = layer(tmp_path, "older", [Entry("etc/p/.wh..wh..opq"), Entry("etc/p/mid", data=b"m")])
    newer = layer(tmp_path, "newer", [Entry("etc/p/f", data=b"newest" * 1000)])
    apply_layers(root, [older, newer], writing=MANY)
    assert sorted(p.name for p in (root / "etc/p").iterdir()) == ["f", "mid"]
    assert (root / "etc/p/f").read_bytes() == b"newest" * 1000


def test_directory_times_are_set_after_its_files_land(
    root: Path, tmp_path: Path, held: Held
) -> None:
    """Renaming a finished temporary into place changes its directory's mtime:
    the directory's own metadata comes after every job in it has landed."""
    (root / "etc/d").mkdir()
    for i in range(8):
        (root / f"etc/d/f{i}").write_text("the image's")
    entries = [Entry("etc/d", tarfile.DIRTYPE, mode=0o750)]
    entries += [Entry(f"etc/d/f{i}", data=b"x" * 5000) for i in range(8)]
    apply_layers(root, [layer(tmp_path, "l", entries)], writing=MANY)
    s = (root / "etc/d").stat()
    assert s.st_mtime_ns == LAYER_TIME
    assert s.st_mode & 0o7777 == 0o750
    assert all((root / f"etc/d/f{i}").read_bytes() == b"x" * 5000 for i in range(8))


# -- a worker's error ---------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real filesystem that fills up."""
    with small_tmpfs(tmp_path, "4m") as mnt:
        yield mnt


@as_root
@pytest.mark.parametrize("policy", [ONE, MANY], ids=["one", "many"])
def test_a_full_disk_stops_the_restore_with_nothing_half_written(
    tmp_path: Path, small_fs: Path, policy: WritePolicy
) -> None:
    """The kernel's ENOSPC, met by a worker (the free-space guard is told to
    allow anything, so the disk itself fills): the same one-line error as one
    writer gives, naming an entry of the layer; every file left holds all of
    its content, or is the image's untouched; no temporary, thread or fd is left."""
    root = small_fs / "root"
    root.mkdir()
    (root / "f0").write_bytes(b"the image's")
    sizes = [60_000] * 40 + [900_000] * 4
    contents = {f"f{i}": bytes([i]) * n for i, n in enumerate(sizes)}
    path = layer(tmp_path, "l", [Entry(k, data=v) for k, v in contents.items()])
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as caught:
        apply_layers(root, [path], reserve=-(1 << 40), writing=policy)
    e = caught.value
    assert e.errno == errno.ENOSPC
    assert "(restoring layer 1 of 1)" in str(e) and "\n" not in str(e)
    assert isinstance(e.filename, str) and e.filename.startswith(f"{root}/f")
    for p in root.iterdir():
        assert p.read_bytes() in (contents[p.name], b"the image's" if p.name == "f0" else None)
    assert temporaries(root) == []
    assert writer_threads() == []
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_failed_restore_leaves_no_job_behind(root: Path, tmp_path: Path, held: Held) -> None:
    """A refusal of the ordered pass while jobs are in flight: the refusal is the
    error; a job not yet started is not written; what is left is whole (a new
    file with all its content, or the image's file), never a temporary."""
    (root / "etc/old").write_text("the image's")
    path = layer(
        tmp_path,
        "l",
        [
            Entry("etc/old", data=b"new"),
            Entry("etc/new", data=b"new"),
            Entry("etc/dev", tarfile.CHRTYPE),
        ],
    )
    with pytest.raises(AgentError, match="device node"):
        apply_layers(root, [path], writing=MANY)
    assert held.waits[0] == ["etc/new", "etc/old"]  # none ran before the refusal
    assert (root / "etc/old").read_text() == "the image's"  # its temporary went
    assert sorted(p.name for p in (root / "etc").iterdir()) in (["old"], ["new", "old"])
    if (root / "etc/new").exists():
        assert "etc/new" in held.ran and (root / "etc/new").read_text() == "new"
    assert temporaries(root) == []


def test_writer_threads_that_cannot_start_leave_no_temporary(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's pids limit can refuse a new thread: the file that would
    have been the first handed over is still the pass's then, and its
    temporary goes with the error (the image's file stays as it was)."""
    (root / "etc/old").write_text("the image's")
    start = threading.Thread.start

    def refused(self: threading.Thread) -> None:
        if self.name == "restore-writer-1":  # one thread started, the next refused
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", refused)
    path = layer(tmp_path, "l", [Entry("etc/old", data=b"new")])
    with pytest.raises(RuntimeError, match="start new thread"):
        apply_layers(root, [path], writing=MANY)
    assert (root / "etc/old").read_text() == "the image's"
    assert temporaries(root) == []
    assert writer_threads() == []


# -- N writers make the tree one writer makes --------------------------------------------


def _xattrs_work(path: Path) -> bool:
    probe = path / ".probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


def _tree(live: Path, step: int) -> None:
    """A tree with every kept attribute, changed a little at each step."""
    for d in range(6):
        sub = live / f"pkg{d}/sub"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(12):
            p = sub / f"m{f}.py"
            if p.is_dir():
                continue
            size = [0, 10, 3000, 70_000, 200_000][(d + f + step) % 5]
            p.write_bytes(os.urandom(size))
            os.chmod(p, [0o644, 0o600, 0o755, 0o4755, 0o444][f % 5])
            if os.geteuid() == 0:
                os.chown(p, 1000 + f, 2000 + d)
            os.utime(p, ns=(1, 1_600_000_000_000_000_000 + d * 1000 + f + step))
        os.link(sub / "m3.py", sub / f"hard{step}")
        os.symlink("m2.py", sub / f"sym{step}")
        os.utime(sub, ns=(1, 1_500_000_000_000_000_007 + d))
        os.chmod(live / f"pkg{d}", 0o750)
    if step == 1:
        for p in (live / "pkg1/sub").glob("m1*.py"):
            p.unlink()
        (live / "pkg2/sub/m4.py").unlink()
        (live / "pkg2/sub/m4.py").mkdir()


@as_root
def test_many_writers_make_the_tree_one_writer_makes(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    xattrs = _xattrs_work(live)
    layers: list[Path] = []
    parent: dict[str, Stat] = {}
    for step in range(3):
        _tree(live, step)
        if xattrs:
            os.setxattr(live / "pkg0/sub/m0.py", "user.step", str(step).encode())
            os.setxattr(live / "pkg3/sub", "user.dir", b"d")
        current = scan(live, Excluder(live, [], [])).entries
        out = tmp_path / f"layer{step}.tar.zst"
        with open(out, "wb") as f:
            write_layer(live, diff(parent, current), current, f)
        layers.append(out)
        parent = current
    trees = []
    for name, policy in [("one", ONE), ("many", MANY), ("many-large", MANY_LARGE)]:
        target = tmp_path / name
        target.mkdir()
        (target / "pkg0/sub").mkdir(parents=True)  # an image below the layers
        (target / "pkg0/sub/m0.py").write_text("the image's")
        (target / "pkg1/sub").mkdir(parents=True)
        (target / "pkg1/sub/gone").write_text("the image's")
        os.utime(target / "pkg1/sub/gone", ns=(1, 1))
        apply_layers(target, [LayerFile(p) for p in layers], writing=policy)
        trees.append(snapshot(target))
        assert temporaries(target) == []
    assert diff_snapshots(trees[0], trees[1]) == []
    assert diff_snapshots(trees[0], trees[2]) == []
    live_tree = snapshot(live)
    assert (
        diff_snapshots({k: v for k, v in trees[0].items() if k != "pkg1/sub/gone"}, live_tree) == []
    )


@settings(
    max_examples=int(os.environ.get("STUDIO_TEST_HOSTILE_EXAMPLES", "300")) // 3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(base=base_st, chain=layers_st)
def test_random_chains_restore_alike_with_jobs_in_flight(
    held: Held, base: list[object], chain: list[list[object]]
) -> None:
    """Whatever the chain (names, links in and out of the root, whiteouts, opaque
    directories), N writers with their jobs held back end as one writer does:
    the same tree, or the same error and no temporary left."""
    outcomes = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_sentinel(tmp / "outside")
        fill = {"out": str(tmp / "outside"), "root": str(tmp / "root")}
        paths = []
        for i, ops in enumerate(chain):
            p = tmp / f"{i}.tar.zst"
            p.write_bytes(zstd(layer_bytes(ops, fill)))  # type: ignore[arg-type]
            paths.append(LayerFile(p))
        for policy in (ONE, MANY):
            r = tmp / "root"
            r.mkdir()
            build_base(r, base, fill)  # type: ignore[arg-type]
            for dirpath, dirs, files in os.walk(r, topdown=False):  # the image's times
                for n in dirs + files:
                    os.utime(os.path.join(dirpath, n), ns=(1, 1), follow_symlinks=False)
            try:
                apply_layers(r, paths, writing=policy)
                error = ""
            except AgentError as e:
                error = f"{type(e).__name__}: {e}"
            assert temporaries(r) == []
            # A directory made for an entry below it, with none of its own, has the
            # time it was made (the layers' and the image's times are far older).
            tree = {
                k: (*v[:4], "now" if v[4] > LAYER_TIME else v[4], *v[5:])  # type: ignore[operator]
                for k, v in snapshot(r).items()
            }
            outcomes.append((error, tree))
            subprocess.run(["rm", "-rf", str(r)], check=True)
    assert outcomes[0][0] == outcomes[1][0]
    if outcomes[0][0]:
        return  # failed: a job not run by then was never written (one writer wrote it)
    assert diff_snapshots(outcomes[0][1], outcomes[1][1]) == []


def test_content_held_in_memory_is_bounded() -> None:
    """Jobs wait for room: never more files or bytes in flight than the policy's."""
    seen: list[tuple[int, int]] = []
    landed: list[FileJob] = []
    w = Writers(WritePolicy(workers=2, blocked_us=0, max_files=3, max_bytes=100), landed.append)
    with tempfile.TemporaryFile() as f:
        for i in range(20):
            size = (i * 7) % 60
            w.room(size)
            member = tf.Member(f"f{i}", tf.REGTYPE, 0o644, 0, 0, size, 0)
            fd = os.dup(f.fileno())
            w.submit(
                FileJob(fd, -1, f"f{i}", None, f"f{i}", "l", member, [b"x" * size], False, None)
            )
            seen.append((len(w.pending), w.bytes))
        w.drain()
        w.close(landed.append)
    assert len(landed) == 20 and all(j.error is None for j in landed)
    assert max(n for n, _ in seen) <= 3
    assert max(b for _, b in seen) <= 100
    assert writer_threads() == []


def test_the_writers_start_only_once_most_small_files_block() -> None:
    """A file that met a busy CPU now and then is no slow disk; most files
    taking 1 ms each is; large files, slow anywhere, are not counted."""
    w = Writers(WritePolicy(workers=2, blocked_us=500), lambda job: None)
    assert w.sampling and not w.active
    for i in range(10 * SAMPLE_WINDOW):
        w.observe(0.010 if i % 8 == 0 else 0.000_006, 3000)
        w.observe(1.0, SAMPLE_MAX + 1)
    assert not w.active
    for _ in range(SAMPLE_WINDOW):
        w.observe(0.001, 3000)
    assert w.active and w.takes(3000) and not w.takes(w.policy.max_job + 1)
    assert not Writers(WritePolicy(workers=1), lambda job: None).sampling
