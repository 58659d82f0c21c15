"""Chains where a path changes type or is deleted and recreated across layers:
the merged newest-first pass must hide what the older layers removed."""

from __future__ import annotations

import shutil
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
