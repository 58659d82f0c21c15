"""Property: every checkpoint, restored into a fresh copy of the base, equals the
tree at that step in every kept attribute (content, mode with setuid/setgid/
sticky, owner, nanosecond mtimes of files and directories, symlinks, hardlink
groups, xattrs, deletions, type changes)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fsutil import copy_tree, diff_snapshots, settings_for, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.session import Session
from agent.settings import load_settings
from agent.store.base import Store
from agent.store.local import LocalStore
from agent.store.s3 import S3Store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown and xattrs need root")

NAMES = st.sampled_from(["a", "b", "c", "d", "long-" + "x" * 120, "ünï", "sp ace", ".hidden"])
CONTENT = st.binary(max_size=3000)
MODES = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777, 0o444, 0o700])
IDS = st.sampled_from([0, 1000, 65534, 3_000_000])
MTIMES = st.integers(min_value=0, max_value=2_000_000_000_000_000_000)
OPS = st.sampled_from(
    [
        "create",
        "edit_same_size_mtime",
        "chmod",
        "chown",
        "rename",
        "delete",
        "file_to_dir",
        "dir_to_file",
        "symlink",
        "hardlink",
        "xattr",
        "rmxattr",
        "mkdir",
        "touch",
        "fifo",
    ]
)


def _holds_relative_symlink(p: Path) -> bool:
    if p.is_symlink():
        return not os.readlink(p).startswith("/")
    if p.is_dir():
        return any(
            (Path(d) / n).is_symlink() and not os.readlink(Path(d) / n).startswith("/")
            for d, dirs, names in os.walk(p)
            for n in [*dirs, *names]
        )
    return False


def _entries(root: Path) -> tuple[list[Path], list[Path]]:
    files, dirs = [], [root]
    for dirpath, dnames, fnames in os.walk(root):
        for d in dnames:
            p = Path(dirpath) / d
            (files if p.is_symlink() else dirs).append(p)
        for f in fnames:
            files.append(Path(dirpath) / f)
    return sorted(files), sorted(dirs)


def _apply(op: str, root: Path, data: st.DataObject) -> None:
    files, dirs = _entries(root)
    regular = [f for f in files if f.is_file() and not f.is_symlink()]
    parent = data.draw(st.sampled_from(dirs))
    new = parent / data.draw(NAMES)
    if op == "create" and not new.exists() and not new.is_symlink():
        new.write_bytes(data.draw(CONTENT))
    elif op == "edit_same_size_mtime" and regular:
        f = data.draw(st.sampled_from(regular))
        s = f.stat()
        old = f.read_bytes()
        if old:
            f.write_bytes(bytes(b ^ 0xFF for b in old))
            os.utime(f, ns=(s.st_atime_ns, s.st_mtime_ns))
    elif op == "chmod" and (regular or dirs[1:]):
        target = data.draw(st.sampled_from(regular + dirs[1:]))
        mode = data.draw(MODES)
        os.chmod(target, mode if target.is_file() else mode | 0o700)
    elif op == "chown" and files + dirs[1:]:
        target = data.draw(st.sampled_from(files + dirs[1:]))
        os.chown(target, data.draw(IDS), data.draw(IDS), follow_symlinks=False)
    elif op == "rename" and files + dirs[1:]:
        src = data.draw(st.sampled_from(files + dirs[1:]))
        # A relative symlink moved elsewhere may climb above the root, which a
        # checkpoint rightly refuses to carry: the generator moves none.
        if (
            not new.exists()
            and not new.is_symlink()
            and not str(new).startswith(str(src) + "/")
            and not _holds_relative_symlink(src)
        ):
            os.rename(src, new)
    elif op == "delete" and files + dirs[1:]:
        target = data.draw(st.sampled_from(files + dirs[1:]))
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    elif op == "file_to_dir" and regular:
        f = data.draw(st.sampled_from(regular))
        f.unlink()
        f.mkdir()
        (f / "inner").write_bytes(data.draw(CONTENT))
    elif op == "dir_to_file" and dirs[1:]:
        d = data.draw(st.sampled_from(dirs[1:]))
        shutil.rmtree(d)
        d.write_bytes(data.draw(CONTENT))
    elif op == "symlink" and not new.exists() and not new.is_symlink():
        kind = data.draw(st.sampled_from(["relative", "absolute", "dangling"]))
        target = {
            "relative": os.path.relpath(data.draw(st.sampled_from(files + dirs)), parent),
            "absolute": "/usr/lib/os-release",
            "dangling": "nowhere/at/all",
        }[kind]
        os.symlink(target, new)
    elif op == "hardlink" and regular and not new.exists() and not new.is_symlink():
        os.link(data.draw(st.sampled_from(regular)), new)
    elif op == "xattr" and regular + dirs[1:]:
        target = data.draw(st.sampled_from(regular + dirs[1:]))
        name = data.draw(st.sampled_from(["user.one", "user.two", "trusted.t"]))
        os.setxattr(target, name, data.draw(st.binary(min_size=1, max_size=40)))
    elif op == "rmxattr" and regular:
        f = data.draw(st.sampled_from(regular))
        for k in os.listxattr(f):
            os.removexattr(f, k)
    elif op == "mkdir" and not new.exists() and not new.is_symlink():
        new.mkdir()
    elif op == "touch" and files + dirs[1:]:
        target = data.draw(st.sampled_from(files + dirs[1:]))
        t = data.draw(MTIMES)
        os.utime(target, ns=(t, t), follow_symlinks=False)
    elif op == "fifo" and not new.exists() and not new.is_symlink():
        os.mkfifo(new)


def _make_base(base: Path) -> None:
    (base / "usr/lib").mkdir(parents=True)
    (base / "usr/lib/os-release").write_text("ID=test\n")
    (base / "etc").mkdir()
    (base / "etc/config").write_text("x = 1\n")
    os.link(base / "etc/config", base / "etc/config.link")
    (base / "etc/caps").write_bytes(b"\x7fELF")
    os.setxattr(
        base / "etc/caps",
        "security.capability",
        bytes.fromhex("0100000200200000000000000000000000000000"),
    )
    os.symlink("config", base / "etc/alias")
    (base / "root").mkdir(mode=0o700)
    (base / "root/.profile").write_text("export A=1\n")
    (base / "empty").mkdir()
    os.chown(base / "root/.profile", 1000, 1000)


StoreFactory = Callable[[Path], Store]

_SLOW = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=100, deadline=None, suppress_health_check=_SLOW)
@given(ops=st.lists(OPS, min_size=1, max_size=10), data=st.data())
def test_every_checkpoint_restores_exactly(ops: list[str], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_scenario(Path(tmp), lambda t: LocalStore(t / "work"), ops, data))


@settings(max_examples=20, deadline=None, suppress_health_check=_SLOW)
@given(ops=st.lists(OPS, min_size=1, max_size=6), data=st.data())
def test_every_checkpoint_restores_exactly_through_s3(
    s3_workdir: str, ops: list[str], data: st.DataObject
) -> None:
    """The same property with the S3 store (a real S3 server on loopback)."""
    settings_ = load_settings(s3_part_size=5 << 20)

    def make_store(_tmp: Path) -> Store:
        return S3Store.from_url(f"{s3_workdir}/{uuid.uuid4().hex[:8]}", settings_)

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_scenario(Path(tmp), make_store, ops, data))


async def _scenario(
    tmp: Path, make_store: StoreFactory, ops: list[str], data: st.DataObject
) -> None:
    base = tmp / "base"
    base.mkdir()
    _make_base(base)
    live = tmp / "live"
    copy_tree(base, live)
    workdir = tmp / "work"
    store = make_store(tmp)
    try:
        await _steps_then_restores(tmp, base, live, workdir, store, ops, data)
    finally:
        await store.close()


async def _steps_then_restores(
    tmp: Path, base: Path, live: Path, workdir: Path, store: Store, ops: list[str],
    data: st.DataObject,
) -> None:  # fmt: skip
    session = Session(settings_for(live, workdir, tmp / "state"), store)
    await session.baseline()
    expected = []
    for i, op in enumerate(ops):
        _apply(op, live, data)
        name = f"step{i}"
        await session.checkpoint(name)
        expected.append((name, snapshot(live)))
    for name, snap in expected:
        target = tmp / f"restore-{name}"
        copy_tree(base, target)
        restorer = Session(settings_for(target, workdir, tmp / f"state-{name}"), store)
        await restorer.start(name, required=True)
        problems = diff_snapshots(snap, snapshot(target))
        assert not problems, f"{name} after {ops}: " + "\n".join(problems[:10])
        shutil.rmtree(target)


async def test_restore_extends_chain_across_sessions(tmp_path: Path) -> None:
    """A restored session's next checkpoint extends the chain: session 2 restores
    session 1's work, changes more, and a third restore sees both."""
    base = tmp_path / "base"
    base.mkdir()
    _make_base(base)
    workdir = tmp_path / "work"
    live1 = tmp_path / "live1"
    copy_tree(base, live1)
    s1 = Session(settings_for(live1, workdir, tmp_path / "st1"), LocalStore(workdir))
    await s1.baseline()
    (live1 / "root/notebook.ipynb").write_text("{}")
    r1 = await s1.checkpoint()
    assert r1 is not None and r1.info.layers == 1

    live2 = tmp_path / "live2"
    copy_tree(base, live2)
    s2 = Session(settings_for(live2, workdir, tmp_path / "st2"), LocalStore(workdir))
    out = await s2.start()
    assert out.restored is not None and out.restored.name == r1.info.name
    (live2 / "root/notebook.ipynb").unlink()
    (live2 / "root/data.csv").write_text("a,b\n")
    r2 = await s2.checkpoint()
    assert r2 is not None and r2.info.layers == 2 and r2.changed >= 2

    live3 = tmp_path / "live3"
    copy_tree(base, live3)
    s3 = Session(settings_for(live3, workdir, tmp_path / "st3"), LocalStore(workdir))
    out3 = await s3.start()
    assert out3.restored is not None and out3.restored.name == r2.info.name
    assert not (live3 / "root/notebook.ipynb").exists()
    assert (live3 / "root/data.csv").read_text() == "a,b\n"
    assert diff_snapshots(snapshot(live2), snapshot(live3)) == []


async def test_unchanged_checkpoint_writes_no_layer(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("x")
    workdir = tmp_path / "work"
    s = Session(settings_for(root, workdir, tmp_path / "st"), LocalStore(workdir))
    await s.baseline()
    assert await s.checkpoint(skip_unchanged=True) is None
    first = await s.checkpoint()
    assert first is not None and first.changed == 0 and first.info.layers == 0
    blobs = list((workdir / ".studios/checkpoints/blobs/sha256").iterdir())
    (root / "f").write_text("y")
    r = await s.checkpoint()
    assert r is not None and r.changed == 1 and r.info.layers == 1
    assert len(list((workdir / ".studios/checkpoints/blobs/sha256").iterdir())) == len(blobs) + 2
