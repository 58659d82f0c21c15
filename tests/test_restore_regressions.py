"""Chains where a path changes type or is deleted and recreated across layers:
the merged newest-first pass must hide what the older layers removed."""

from __future__ import annotations

import errno
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from fsutil import copy_tree, diff_snapshots, settings_for, snapshot

from agent.session import Session
from agent.store.local import LocalStore

Step = Callable[[Path], None]


async def _every_checkpoint_restores(tmp: Path, steps: list[Step]) -> None:
    base = tmp / "base"
    (base / "usr/lib").mkdir(parents=True)
    (base / "usr/lib/os-release").write_text("ID=test\n")
    live = tmp / "live"
    copy_tree(base, live)
    work = tmp / "work"
    session = Session(settings_for(live, work, tmp / "st"), LocalStore(work))
    await session.baseline()
    snaps = []
    for i, step in enumerate(steps):
        step(live)
        await session.checkpoint(f"c{i}")
        snaps.append(snapshot(live))
    for i, snap in enumerate(snaps):
        target = tmp / f"r{i}"
        copy_tree(base, target)
        restorer = Session(settings_for(target, work, tmp / f"st{i}"), LocalStore(work))
        await restorer.start(f"c{i}", required=True)
        assert diff_snapshots(snap, snapshot(target)) == [], f"checkpoint c{i}"


def dir_to_file(live: Path) -> None:
    shutil.rmtree(live / "usr")
    (live / "usr").write_text("now a file")


def file_to_dir(live: Path) -> None:
    (live / "usr").unlink()
    (live / "usr").mkdir()
    (live / "usr/inner").write_text("inner")


def delete_dir(live: Path) -> None:
    shutil.rmtree(live / "usr")


def recreate_dir(live: Path) -> None:
    (live / "usr").mkdir()
    (live / "usr/new").write_text("new")


def add_to_dir(live: Path) -> None:
    (live / "usr/lib/extra").write_text("extra")


def dir_to_symlink(live: Path) -> None:
    shutil.rmtree(live / "usr")
    (live / "usr").symlink_to("/opt")


def symlink_to_dir(live: Path) -> None:
    (live / "usr").unlink()
    (live / "usr/lib").mkdir(parents=True)
    (live / "usr/lib/back").write_text("back")


@pytest.mark.parametrize(
    "steps",
    [
        [dir_to_file, file_to_dir],
        [add_to_dir, delete_dir, recreate_dir],
        [add_to_dir, dir_to_symlink, symlink_to_dir],
        [dir_to_file, file_to_dir, dir_to_file, file_to_dir],
    ],
    ids=["dir-file-dir", "delete-recreate", "dir-symlink-dir", "flip-flop"],
)
async def test_type_changes_across_layers(tmp_path: Path, steps: list[Step]) -> None:
    await _every_checkpoint_restores(tmp_path, steps)


def _default_acl(owner: int, group: int, other: int) -> bytes:
    """A POSIX default ACL as the kernel stores it (u::, g::, o:: entries only)."""
    head = struct.pack("<I", 2)
    tags = ((0x01, owner), (0x04, group), (0x20, other))
    return head + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in tags)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files other groups")
async def test_owner_and_mode_kept_where_new_files_inherit_and_under_any_umask(
    tmp_path: Path,
) -> None:
    """Restore leaves out fchown and fchmod when they would change nothing; files
    created below a setgid directory (whose group they inherit), below a default
    ACL (which sets their mode bits instead of the umask) or under a strict umask
    still end with the recorded owner and mode."""
    base = tmp_path / "base"
    (base / "srv").mkdir(parents=True)
    os.chown(base / "srv", 0, 1234)
    os.chmod(base / "srv", 0o2775)
    for d in ("acl", "acl-dropped"):
        (base / d).mkdir()
        try:
            os.setxattr(base / d, "system.posix_acl_default", _default_acl(7, 5, 0))
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            pytest.skip("the test directory's filesystem has no POSIX ACLs")
    live = tmp_path / "live"
    copy_tree(base, live)
    work = tmp_path / "work"
    session = Session(settings_for(live, work, tmp_path / "st"), LocalStore(work))
    await session.baseline()
    (live / "srv/root-owned").write_text("a")
    (live / "srv/inherited").write_text("b")  # takes group 1234 from the directory
    (live / "srv/sub").mkdir()  # a setgid directory too, by inheritance
    (live / "srv/sub/root-owned").write_text("c")
    (live / "srv/root-dir").mkdir()
    (live / "plain").write_text("d")
    (live / "plain").chmod(0o644)
    (live / "acl/f").write_text("e")
    (live / "acl/f").chmod(0o644)  # the ACL alone would make it 0o640
    (live / "acl/sub").mkdir()  # inherits the default ACL
    (live / "acl/sub/g").write_text("f")
    (live / "acl/sub/g").chmod(0o644)
    # A directory made where the image's has a default ACL the session removed:
    # the restore must not leave the ACL it inherits meanwhile.
    os.removexattr(live / "acl-dropped", "system.posix_acl_default")
    (live / "acl-dropped/sub").mkdir()
    for p in ("srv/root-owned", "srv/sub/root-owned", "srv/root-dir"):
        os.chown(live / p, 0, 0)
    await session.checkpoint("c")
    want = snapshot(live)
    assert os.stat(live / "srv/inherited").st_gid == 1234

    for umask in (0o022, 0o077):  # the usual one, where a default ACL matters; a strict one
        target = tmp_path / f"target-{umask:o}"
        copy_tree(base, target)
        old = os.umask(umask)
        try:
            state = tmp_path / f"st-{umask:o}"
            restorer = Session(settings_for(target, work, state), LocalStore(work))
            await restorer.start("c", required=True)
        finally:
            os.umask(old)
        assert diff_snapshots(want, snapshot(target)) == []
        assert os.stat(target / "srv/sub/root-owned").st_gid == 0
        assert os.stat(target / "srv/root-dir").st_gid == 0
        for p in ("plain", "acl/f", "acl/sub/g"):
            assert os.stat(target / p).st_mode & 0o7777 == 0o644, p
