"""What a checkpoint sees: mounts, excluded trees, files that change or vanish
while read, and what it reports instead of silently dropping."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fsutil import copy_tree, diff_snapshots, settings_for, snapshot

from agent.checkpoint.diff import diff
from agent.checkpoint.layer_reader import LayerReader
from agent.checkpoint.layer_writer import LayerWriter
from agent.checkpoint.scan import Excluder, scan
from agent.session import Session
from agent.settings import Settings
from agent.store.local import LocalStore


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")


@pytest.fixture
def mounted_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    (root / "workspace/data/bucket").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/hosts").write_text("image hosts\n")
    host_file = tmp_path / "host-hosts"
    host_file.write_text("127.0.0.1 from the host\n")
    _mount("-t", "tmpfs", "none", str(root / "workspace/data/bucket"))
    try:
        _mount("--bind", str(host_file), str(root / "etc/hosts"))
        try:
            yield root
        finally:
            subprocess.run(["umount", str(root / "etc/hosts")], check=False)
    finally:
        subprocess.run(["umount", str(root / "workspace/data/bucket")], check=False)


def test_mount_points_are_never_scanned(mounted_root: Path) -> None:
    (mounted_root / "workspace/data/bucket/huge.csv").write_text("a,b\n" * 1000)
    entries = scan(mounted_root, Excluder(mounted_root, [], [])).entries
    assert "workspace/data" in entries
    assert "workspace/data/bucket" not in entries
    assert "workspace/data/bucket/huge.csv" not in entries
    assert "etc/hosts" not in entries  # a bind-mounted file, same filesystem or not
    assert "etc" in entries


def test_volatile_state_and_excluded_paths_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in ("proc/1", "sys/fs", "dev/pts", "run/lock", "tmp/x", "var/cache/pip", "home/u/.cache"):
        (root / d).mkdir(parents=True)
    (root / "home/u/work.py").write_text("print(1)\n")
    (root / "home/u/.studio-restore-77-3").write_text("left by a killed restore")
    (root / "home/u/big.ckpt").write_text("x")
    ex = Excluder(root, [root / "var/lib/studio-agent"], ["var/cache", "home/*/.cache", "*.ckpt"])
    entries = scan(root, ex).entries
    assert set(entries) == {"var", "home", "home/u", "home/u/work.py"}


async def test_state_dir_and_local_workdir_inside_root_are_excluded(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "mnt/work").mkdir(parents=True)
    settings = Settings(root=root, workdir=str(root / "mnt/work"), studio="s")
    session = Session(settings, LocalStore(root / "mnt/work"))
    await session.baseline()
    (root / "new").write_text("x")
    result = await session.checkpoint()
    assert result is not None
    report = await session.diff()
    assert report.lines == []  # neither the state dir nor the store show up as changes
    assert (root / "var/lib/studio-agent/session.json").exists()


async def test_vanished_and_unreadable_entries_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "sock-dir").mkdir()
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock-dir/agent.sock"))
    try:
        session = Session(
            settings_for(root, tmp_path / "w", tmp_path / "st"), LocalStore(tmp_path / "w")
        )
        await session.baseline()
        os.mknod(root / "sock-dir/pipe", 0o600 | 0o010000)  # a FIFO is kept
        (root / "sock-dir/agent2.sock").unlink(missing_ok=True)
        s2 = socket.socket(socket.AF_UNIX)
        s2.bind(str(root / "sock-dir/agent2.sock"))
        result = await session.checkpoint()
        s2.close()
    finally:
        s.close()
    assert result is not None
    reasons = {x.path: x.reason for x in result.skipped}
    assert reasons == {"sock-dir/agent2.sock": "socket not checkpointed"}
    # Reported once: the next checkpoint does not repeat it.
    again = await session.checkpoint(skip_unchanged=True)
    assert again is None


def test_file_changing_while_read_is_written_consistently_and_again_next_time(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    big = root / "growing.log"
    big.write_bytes(os.urandom(40 << 20))
    current = scan(root, Excluder(root, [], [])).entries
    changes = diff({}, current)
    stop = threading.Event()

    def scribble() -> None:
        n = 0
        while not stop.is_set():
            with open(big, "r+b") as f:
                f.seek((n * 7919) % (40 << 20))
                f.write(os.urandom(4096))
            n += 1

    t = threading.Thread(target=scribble)
    t.start()
    try:
        out = tmp_path / "layer.tar.zst"
        with open(out, "wb") as f:
            writer = LayerWriter(root, f, level=1)
            written = [writer.add(path, current[path]) for path in changes.upserts]
            writer.finish(changes.deletions, current)
    finally:
        stop.set()
        t.join()
    # Consistent: the layer parses and the entry has exactly its declared size.
    with open(out, "rb") as f, LayerReader(f) as reader:
        sizes = {m.name: m.size for m in reader.members()}
    assert sizes["growing.log"] == 40 << 20
    # Written again next time: the new parent record can't match any scan.
    rescan = scan(root, Excluder(root, [], [])).entries
    parent = dict(current)
    parent.update((p, r) for p, r in zip(changes.upserts, written, strict=True) if r is not None)
    assert "growing.log" in diff(parent, rescan).upserts


async def test_checkpoint_then_restore_through_cli_on_a_real_tree(tmp_path: Path) -> None:
    """The quickstart: baseline, change, checkpoint, restore elsewhere, compare."""
    base = tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc/motd").write_text("hi\n")
    root = tmp_path / "root"
    copy_tree(base, root)
    work = tmp_path / "work"
    env = dict(os.environ, STUDIO_ROOT=str(root), STUDIO_WORKDIR=str(work), STUDIO_STUDIO="q")
    env["STUDIO_STATE_DIR"] = str(tmp_path / "st")
    cli = [sys.executable, "-m", "agent"]
    subprocess.run([*cli, "baseline"], env=env, check=True, capture_output=True)
    (root / "opt/tool/bin").mkdir(parents=True)
    (root / "opt/tool/bin/run").write_text("#!/bin/sh\necho ok\n")
    os.chmod(root / "opt/tool/bin/run", 0o755)
    (root / "etc/motd").unlink()
    proc = await asyncio.create_subprocess_exec(
        *cli, "checkpoint", env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and b"changes" in out
    target = tmp_path / "target"
    copy_tree(base, target)
    env2 = dict(env, STUDIO_ROOT=str(target), STUDIO_STATE_DIR=str(tmp_path / "st2"))
    subprocess.run([*cli, "restore"], env=env2, check=True, capture_output=True)
    assert diff_snapshots(snapshot(root), snapshot(target)) == []
