"""A layer that does not match its digest never changes the root: one byte
flipped in the middle of a finalized checkpoint's layer fails the restore with
a one-line "corrupt" error before anything is applied, and the root (a file and
its hardlink of the base included) stays byte for byte as it was."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from fsutil import copy_tree, diff_snapshots, snapshot


def agent(root: Path, work: Path, state: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "agent", "--root", str(root), "--workdir", str(work),
        "--studio", "c", "--state-dir", str(state), *args,
    ]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_a_flipped_byte_fails_the_restore_before_the_root_changes(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "a").mkdir(parents=True)
    (base / "a/file").write_bytes(b"base content\n" * 100)
    os.link(base / "a/file", base / "a/hardlink")
    rnd = random.Random(7)
    (base / "b").mkdir()
    for i in range(40):
        (base / f"b/z{i:02d}").write_bytes(rnd.randbytes(2000))

    live, work = tmp_path / "live", tmp_path / "work"
    copy_tree(base, live)
    run(agent(live, work, tmp_path / "st", "baseline"))
    # The file and its hardlink change first in the walk, then much more after
    # them (20 MB, more than the restore reads ahead), so the flipped byte lies
    # well behind their content in the layer.
    with open(live / "a/file", "r+b") as f:
        f.write(b"CHECKPOINT")
    for i in range(40):
        (live / f"b/z{i:02d}").write_bytes(rnd.randbytes(500_000))
    run(agent(live, work, tmp_path / "st", "checkpoint", "--name", "cp"))

    blobs = work / ".studios/checkpoints/blobs/sha256"
    layer = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    with open(layer, "r+b") as f:  # in place, as bit rot would
        f.seek(layer.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))

    target = tmp_path / "target"
    copy_tree(base, target)
    before = snapshot(target)
    proc = subprocess.run(
        agent(target, work, tmp_path / "st2", "restore", "--checkpoint", "cp"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrupt" in lines[0] and layer.name in lines[0], proc.stderr
    assert diff_snapshots(before, snapshot(target)) == []
    assert (target / "a/file").read_bytes() == b"base content\n" * 100
    assert os.stat(target / "a/file").st_ino == os.stat(target / "a/hardlink").st_ino
