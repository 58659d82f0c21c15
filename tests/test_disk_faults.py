"""A full or read-only disk under the store or the state dir: a clear one-line
error, the previous checkpoint intact and restorable, nothing half-written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fsutil import diff_snapshots, snapshot


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs: a real filesystem that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "none", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def cli(root: Path, work: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "--root", str(root), "--workdir", str(work),
         "--studio", "d", "--state-dir", str(state), *args],
        capture_output=True, text=True,
    )  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("studio-agent: error: "), proc.stderr
    assert needle in lines[0], lines[0]


def blobs_sound(work: Path) -> None:
    blobs = work / ".studios/checkpoints/blobs/sha256"
    for b in blobs.iterdir():
        assert hashlib.sha256(b.read_bytes()).hexdigest() == b.name
    leftovers = list((work / ".studios/checkpoints/tmp").iterdir())
    assert leftovers == []


def test_full_store_disk(tmp_path: Path, small_disk: Path) -> None:
    root, state, work = tmp_path / "root", tmp_path / "state", small_disk / "work"
    root.mkdir()
    assert cli(root, work, state, "baseline").returncode == 0
    (root / "notes.txt").write_text("keep me\n")
    assert cli(root, work, state, "checkpoint", "--name", "first").returncode == 0
    first = snapshot(root)
    (root / "big.bin").write_bytes(os.urandom(4 << 20))  # does not fit in 2 MB

    one_line_error(cli(root, work, state, "checkpoint", "--name", "second"), "No space left")
    listed = json.loads(cli(root, work, state, "checkpoints", "--json").stdout)
    assert [c["name"] for c in listed] == ["first"]
    blobs_sound(work)
    target = tmp_path / "target"
    target.mkdir()
    assert cli(target, work, tmp_path / "st2", "restore", "--checkpoint", "first").returncode == 0
    assert diff_snapshots(first, snapshot(target)) == []

    # Space again: the same change goes into the next checkpoint, nothing was lost.
    (root / "big.bin").write_bytes(os.urandom(1 << 10))
    assert cli(root, work, state, "checkpoint", "--name", "second").returncode == 0
    target2 = tmp_path / "target2"
    target2.mkdir()
    assert cli(target2, work, tmp_path / "st3", "restore", "--checkpoint", "second").returncode == 0
    assert diff_snapshots(snapshot(root), snapshot(target2)) == []


def test_full_state_disk(tmp_path: Path, small_disk: Path) -> None:
    root, work, state = tmp_path / "root", tmp_path / "work", small_disk / "state"
    root.mkdir()
    assert cli(root, work, state, "baseline").returncode == 0
    (root / "big.bin").write_bytes(os.urandom(4 << 20))
    one_line_error(cli(root, work, state, "checkpoint"), "No space left")
    # nothing was published: not even the store exists
    one_line_error(cli(root, work, state, "checkpoints", "--json"), "no checkpoint store at")
    assert not any((state / "spool").iterdir())


def test_read_only_store(tmp_path: Path, small_disk: Path) -> None:
    root, state, work = tmp_path / "root", tmp_path / "state", small_disk / "work"
    root.mkdir()
    work.mkdir()
    assert cli(root, work, state, "baseline").returncode == 0
    (root / "x").write_text("x")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    one_line_error(cli(root, work, state, "checkpoint"), "Read-only file system")
