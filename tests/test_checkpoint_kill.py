"""A checkpoint or a restore killed with SIGKILL at random moments: the previous
checkpoint still restores, the listing never shows a half-written one, the next
run after the kill is complete and correct, and nothing of the killed one stays
behind in the spool, the store or the root."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fsutil import copy_tree, diff_snapshots, snapshot


def agent(root: Path, work: Path, state: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "agent", "--root", str(root), "--workdir", str(work),
        "--studio", "k", "--state-dir", str(state), *args,
    ]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def make_files(d: Path, n: int, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"f{i:04d}.bin").write_bytes(rnd.randbytes(size))


def test_sigkill_never_leaves_a_half_written_checkpoint(tmp_path: Path) -> None:
    base = tmp_path / "base"
    make_files(base / "usr/share/base", 20, 1000, 0)
    root = tmp_path / "root"
    copy_tree(base, root)
    work, state = tmp_path / "work", tmp_path / "state"
    run(agent(root, work, state, "baseline"))
    make_files(root / "opt/first", 50, 20_000, 1)
    run(agent(root, work, state, "checkpoint", "--name", "first"))
    first_snap = snapshot(root)

    # A change big enough that a checkpoint of it takes a while.
    make_files(root / "opt/second", 300, 100_000, 2)
    t0 = time.monotonic()
    probe = run(agent(root, work, state, "diff", "--json"))
    assert json.loads(probe.stdout)["count"] >= 300
    scan_time = time.monotonic() - t0

    rnd = random.Random(42)
    kills = 0
    left_behind = 0
    for attempt in range(6):
        proc = subprocess.Popen(
            agent(root, work, state, "checkpoint", "--name", f"killed{attempt}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if attempt % 2:
            # Kill somewhere between process start and a little past a full checkpoint.
            time.sleep(rnd.uniform(0.05, max(0.3, 4 * scan_time)))
        else:  # or while the layer is being written
            wait_for(lambda p=proc: any((state / "spool").glob("layer-*")) or p.poll() is not None)
            # the first one the moment its layer appears, so some kill leaves one behind
            time.sleep(rnd.uniform(0, 0.2) if attempt else 0)
        if proc.poll() is None:
            kills += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left_behind += bool(leftovers(state, work, root))

        listed = json.loads(run(agent(root, work, state, "checkpoints", "--json")).stdout)
        names = {c["name"] for c in listed}
        assert "first" in names
        for c in listed:
            assert c["state"] == "finalized"
    assert kills > 0, "no checkpoint was ever interrupted; the test proved nothing"

    # Every listed checkpoint restores, and `first` is exactly what it was.
    listed = json.loads(run(agent(root, work, state, "checkpoints", "--json")).stdout)
    final_snap = snapshot(root, skip=("state",))
    for c in listed:
        target = tmp_path / f"restore-{c['name']}"
        copy_tree(base, target)
        run(agent(target, work, tmp_path / f"st-{c['name']}", "restore", "--checkpoint", c["name"]))
        got = snapshot(target)
        want = first_snap if c["name"] == "first" else final_snap
        assert diff_snapshots(want, got) == [], c["name"]

    # The session carries on: the next checkpoint completes and restores exactly.
    run(agent(root, work, state, "checkpoint", "--name", "after"))
    target = tmp_path / "restore-after"
    copy_tree(base, target)
    run(agent(target, work, tmp_path / "st-after", "restore", "--checkpoint", "after"))
    assert diff_snapshots(snapshot(root), snapshot(target)) == []
    refs = work / ".studios/checkpoints/refs/k"
    assert not any(p.name.endswith(".tmp") for p in refs.iterdir())
    # what the killed checkpoints left (their layers in the spool, partial blobs in
    # the store) was cleared by the next one
    assert left_behind > 0, "no kill left anything behind; the test proved nothing"
    assert leftovers(state, work, root) == []


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def leftovers(state: Path, work: Path, root: Path) -> list[str]:
    """What a killed run of the agent could leave: spool files, partial blobs, the
    restore's temporaries in the root."""
    found = [str(p) for p in (state / "spool").glob("*")]
    found += [str(p) for p in (work / ".studios/checkpoints/tmp").glob("*")]
    found += [str(p) for p in state.glob("*.tmp")]
    found += [str(p) for p in root.rglob(".studio-restore-*")]
    return found


def test_sigkill_of_a_restore_over_an_existing_tree_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    base = tmp_path / "base"
    make_files(base / "usr/share/base", 20, 1000, 0)
    src = tmp_path / "src"
    copy_tree(base, src)
    work = tmp_path / "work"
    run(agent(src, work, tmp_path / "src-state", "baseline"))
    make_files(src / "opt/data", 200, 100_000, 3)
    run(agent(src, work, tmp_path / "src-state", "checkpoint", "--name", "full"))
    want = snapshot(src, skip=("src-state",))

    # the target already holds every path, with other bytes: each file of the
    # restore is written under a temporary name, then renamed over the old one
    target, state = tmp_path / "target", tmp_path / "state"
    copy_tree(base, target)
    make_files(target / "opt/data", 200, 100_000, 4)
    t0 = time.monotonic()
    run(agent(target, work, state, "restore", "--checkpoint", "full"))
    restore_time = time.monotonic() - t0
    make_files(target / "opt/data", 200, 100_000, 4)  # back to the other bytes

    rnd = random.Random(7)
    interrupted = 0
    left_behind = 0
    for attempt in range(6):
        proc = subprocess.Popen(
            agent(target, work, state, "restore", "--checkpoint", "full", "--force"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if attempt % 2:
            time.sleep(rnd.uniform(0.05, max(0.3, 1.5 * restore_time)))
        else:  # or while it writes into the root
            wait_for(lambda p=proc: any(target.rglob(".studio-restore-*")) or p.poll() is not None)
        if proc.poll() is None:
            interrupted += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left_behind += bool(leftovers(state, work, target))
    assert interrupted > 0, "no restore was ever interrupted; the test proved nothing"
    assert left_behind > 0, "no kill left anything behind; the test proved nothing"

    # the next run after the kills: a restore that needs no --force (the differences
    # are the killed restore's doing), complete, and nothing of the killed ones left
    run(agent(target, work, state, "restore", "--checkpoint", "full"))
    assert diff_snapshots(want, snapshot(target, skip=("state",))) == []
    assert leftovers(state, work, target) == []
    run(agent(target, work, state, "checkpoint", "--name", "after"))
    assert leftovers(state, work, target) == []
