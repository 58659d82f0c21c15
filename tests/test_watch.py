"""The change watch and the checkpoint that reads only what it names.

Real inotify on a real tree: a watched checkpoint finds the same changes and
writes the same next parent state as a full walk, whatever the changes were;
the watch never crosses a mount point; when it cannot be trusted (a queue
overflow, the watch limit reached) it says so and the checkpoint walks; and
what inotify cannot see (a write through a shared mmap) is not in the watch's
changes but is in the next full walk's, which is why the daemon walks fully at
the final checkpoint and every ``full_scan_every`` periodic ones.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as strat

from agent.checkpoint.pipeline import Pass, scan_and_write
from agent.checkpoint.scan import Excluder
from agent.checkpoint.state import StateReader, load_state
from agent.checkpoint.watch import ChangeWatch
from agent.checkpoint.watched import Dirty

WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")
QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")
INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")


def _tree(root: Path) -> None:
    for d in ("etc", "opt/tool/lib", "home/u/proj", "srv/empty"):
        (root / d).mkdir(parents=True)
    for i in range(5):
        (root / f"etc/c{i}.conf").write_text(f"conf {i}\n")
        (root / f"opt/tool/lib/m{i}.py").write_text(f"print({i})\n" * (i + 1))
        (root / f"home/u/proj/n{i}.txt").write_text("n" * (100 * i))
    os.symlink("../opt/tool", root / "home/tool")


def _pass(root: Path, parent: Path | None, state: Path, dirty: Dirty | None = None) -> Pass:
    excluder = Excluder(root, [], [])
    with contextlib.ExitStack() as stack:
        blocks = [] if parent is None else stack.enter_context(StateReader(parent)).blocks()
        return scan_and_write(root, excluder, blocks, io.BytesIO(), state=state, dirty=dirty)


@contextlib.contextmanager
def _watching(root: Path) -> Iterator[ChangeWatch]:
    watch = ChangeWatch(root, Excluder(root, [], []))
    watch.start()
    try:
        assert watch.ready.wait(30)
        assert watch.take() is None  # the period before everything was watched
        yield watch
    finally:
        watch.close()


def _same_as_a_walk(root: Path, tmp: Path, watch: ChangeWatch, parent: Path) -> Pass:
    """The watched checkpoint's changes and next state equal a full walk's."""
    dirty = watch.take()
    assert dirty is not None, watch.pending()
    watched = _pass(root, parent, tmp / "watched.state", dirty)
    walked = _pass(root, parent, tmp / "walked.state")
    assert watched.watched and not walked.watched
    assert sorted(watched.changes.upserts) == sorted(walked.changes.upserts)
    assert watched.changes.deletions == walked.changes.deletions
    assert watched.changes.replaced == walked.changes.replaced
    assert load_state(tmp / "watched.state") == load_state(tmp / "walked.state")
    return watched


def test_a_watched_checkpoint_reads_only_what_changed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    _pass(root, None, tmp_path / "base.state")
    with _watching(root) as watch:
        assert watch.watched == 10  # the root and the nine directories below it
        (root / "etc/c1.conf").write_text("changed\n")
        (root / "etc/c2.conf").unlink()
        (root / "opt/tool/lib").rename(root / "opt/tool/lib2")  # a directory moved
        (root / "new/deep").mkdir(parents=True)  # made faster than it is watched
        (root / "new/deep/f").write_text("deep\n")
        shutil.rmtree(root / "home/u/proj")
        (root / "home/u/proj").write_text("a file where a directory was\n")
        os.chmod(root / "etc/c3.conf", 0o600)
        done = _same_as_a_walk(root, tmp_path, watch, tmp_path / "base.state")
        # What was read: the changed names, never the untouched directories' entries.
        assert done.scan.count < 30
        assert "etc/c2.conf" in done.changes.deletions
        assert {"new/deep/f", "opt/tool/lib2/m0.py", "etc/c1.conf"} <= set(done.changes.upserts)
        # The moved directory is watched where it went, and no longer where it was.
        (root / "opt/tool/lib2/m0.py").write_text("moved, then changed\n")
        os.replace(tmp_path / "watched.state", tmp_path / "next.state")
        again = _same_as_a_walk(root, tmp_path, watch, tmp_path / "next.state")
        assert again.changes.upserts == ["opt/tool/lib2/m0.py"]


def test_a_walk_after_restart_begins_a_sound_first_period(tmp_path: Path) -> None:
    # As a session starts: everything watched, then the root walked for the parent
    # state; what changes from the restart on is the watch's, what before, the walk's.
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    watch = ChangeWatch(root, Excluder(root, [], []))
    watch.start()
    try:
        assert watch.ready.wait(30)
        (root / "etc/c0.conf").write_text("before the restart: the walk's\n")
        watch.restart()
        assert watch.pending().sound and watch.pending().names == 0
        _pass(root, None, tmp_path / "base.state")
        (root / "etc/c1.conf").write_text("after the walk: the watch's\n")
        done = _same_as_a_walk(root, tmp_path, watch, tmp_path / "base.state")
        assert done.changes.upserts == ["etc/c1.conf"]
    finally:
        watch.close()


def test_nothing_changed_is_an_empty_period(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    with _watching(root) as watch:
        (root / "etc/c0.conf").read_text()  # reading is no change
        assert watch.take() == {}
        assert watch.pending().sound


_OPS = strat.lists(
    strat.tuples(
        strat.sampled_from(
            [
                "write",
                "append",
                "delete",
                "mkdir",
                "rmtree",
                "rename",
                "chmod",
                "symlink",
                "replace",
            ]
        ),
        strat.integers(0, 40),
        strat.integers(0, 40),
    ),
    min_size=1,
    max_size=25,
)


def _paths(root: Path) -> list[Path]:
    return sorted(root.rglob("*"), key=str)


def _apply(root: Path, op: str, a: int, b: int) -> None:
    paths = _paths(root)
    dirs = [root, *[p for p in paths if p.is_dir() and not p.is_symlink()]]
    target = paths[a % len(paths)] if paths else root
    where = dirs[b % len(dirs)]
    with contextlib.suppress(OSError):
        if op == "write":
            (where / f"w{a}").write_bytes(os.urandom(a * 10))
        elif op == "append" and target.is_file() and not target.is_symlink():
            with open(target, "ab") as f:
                f.write(b"more")
        elif op == "delete" and not target.is_dir():
            target.unlink()
        elif op == "mkdir":
            (where / f"d{a}" / "sub").mkdir(parents=True)
            (where / f"d{a}" / "sub" / "f").write_text("in a new directory")
        elif op == "rmtree" and target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif op == "rename" and target != root and where != target:
            if not str(where).startswith(str(target) + "/"):
                os.rename(target, where / f"r{a}")
        elif op == "chmod" and not target.is_symlink():
            os.chmod(target, 0o700 if a % 2 else 0o644)
        elif op == "symlink":
            os.symlink(f"../t{a}", where / f"l{a}")
        elif op == "replace" and target.is_file() and not target.is_symlink():
            target.unlink()
            target.mkdir()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS)
def test_any_changes_give_what_a_full_walk_gives(tmp_path: Path, ops: list) -> None:  # type: ignore[type-arg]
    case = tmp_path / f"case-{os.urandom(4).hex()}"
    root = case / "root"
    root.mkdir(parents=True)
    _tree(root)
    _pass(root, None, case / "base.state")
    with _watching(root) as watch:
        for op in ops:
            _apply(root, *op)
        _same_as_a_walk(root, case, watch, case / "base.state")
    shutil.rmtree(case)


def test_a_write_through_a_shared_mmap_needs_the_full_walk(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    data = root / "home/u/data.bin"
    data.write_bytes(b"\0" * 4096)
    _pass(root, None, tmp_path / "base.state")
    with _watching(root) as watch:
        with open(data, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
            watch.take()  # a period from here: the file is open and mapped
            m[:5] = b"hello"
            m.flush()
            dirty = watch.take()
        assert dirty == {}  # inotify saw nothing: no event for stores through a mapping
        walked = _pass(root, tmp_path / "base.state", tmp_path / "walked.state")
        assert walked.changes.upserts == ["home/u/data.bin"]


def test_a_change_from_another_mount_namespace_is_seen(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    _pass(root, None, tmp_path / "base.state")
    other = tmp_path / "elsewhere"
    other.mkdir()
    with _watching(root) as watch:
        script = f"mount --bind {root}/etc {other} && echo other > {other}/c0.conf"
        try:
            subprocess.run(["unshare", "-m", "sh", "-c", script], check=True, timeout=30)
        except (OSError, subprocess.CalledProcessError) as e:
            pytest.skip(f"no other mount namespace here: {e}")  # needs CAP_SYS_ADMIN
        done = _same_as_a_walk(root, tmp_path, watch, tmp_path / "base.state")
        assert "etc/c0.conf" in done.changes.upserts


def _mounted(path: Path) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)]).returncode == 0


def test_a_mount_below_the_root_is_never_watched(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "workspace/data").mkdir(parents=True)
    _tree(root)
    data = root / "workspace/data"
    if not _mounted(data):
        pytest.skip("cannot mount a tmpfs here")
    try:
        (data / "big").mkdir()
        with _watching(root) as watch:
            assert watch.watched == 11  # the tree's ten, workspace, and not data nor below
            (data / "big/f").write_text("on the data mount")
            (data / "g").write_text("on the data mount")
            assert watch.take() == {}
    finally:
        subprocess.run(["umount", str(data)], check=True)


@contextlib.contextmanager
def _sysctl(path: Path, value: int) -> Iterator[None]:
    try:
        old = path.read_text()
        path.write_text(f"{value}\n")
    except OSError as e:
        pytest.skip(f"cannot set {path} here: {e}")
    try:
        yield
    finally:
        path.write_text(old)


def test_the_watch_limit_reached_means_full_walks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    watch = ChangeWatch(root, Excluder(root, [], []))
    with _sysctl(WATCHES, 3):
        watch.start()
        assert watch.ready.wait(30)
    try:
        assert "fs.inotify.max_user_watches" in watch.pending().broken
        (root / "etc/c0.conf").write_text("unseen by the watch\n")
        assert watch.take() is None
        assert watch.take() is None  # for good: every checkpoint walks
        assert watch.watched == 0  # the watches it had are given back
    finally:
        watch.close()


def test_no_inotify_instance_left_means_full_walks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    watch = ChangeWatch(root, Excluder(root, [], []))
    with _sysctl(INSTANCES, 0):
        watch.start()
        assert watch.ready.wait(30)
    try:
        assert "max_user_instances" in watch.pending().broken
        assert watch.take() is None
    finally:
        watch.close()


def test_an_overflowed_queue_is_a_full_walk_then_watched_again(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    with _sysctl(QUEUED, 16):  # read when the inotify instance is made
        watch = ChangeWatch(root, Excluder(root, [], []))
        watch.start()
        assert watch.ready.wait(30)
    try:
        assert watch.take() is None
        watch.ready.clear()
        for i in range(200):  # more events than the queue holds
            (root / f"etc/many{i}").write_text("x")
        assert watch.take() is None  # events were lost: walk
        assert watch.ready.wait(30)  # everything watched anew
        # The period that began with that take is sound only if the watch was
        # complete again by then (the watch's thread may have seen the overflow first).
        assert watch.take() in (None, {})
        (root / "etc/c0.conf").write_text("seen again\n")
        dirty = watch.take()
        assert dirty is not None and "c0.conf" in dirty["etc"]
    finally:
        watch.close()


def test_a_failed_checkpoint_spoils_the_period(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    with _watching(root) as watch:
        (root / "etc/c0.conf").write_text("taken, then lost\n")
        assert watch.take() is not None
        watch.spoil()  # the checkpoint that took them failed
        assert watch.take() is None
        assert watch.take() == {}


def test_on_change_is_called_once_a_period(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    calls: list[int] = []
    seen = threading.Event()

    def on_change() -> None:
        calls.append(1)
        seen.set()

    watch = ChangeWatch(root, Excluder(root, [], []), on_change=on_change)
    watch.start()
    try:
        assert watch.ready.wait(30)
        watch.take()
        (root / "etc/c0.conf").write_text("one\n")
        assert seen.wait(30)
        (root / "etc/c1.conf").write_text("two\n")
        pending = watch.pending()
        assert pending.names >= 1 and pending.first is not None
        assert calls == [1]
    finally:
        watch.close()
