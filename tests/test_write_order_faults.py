"""A checkpoint killed (SIGKILL) right after each step of its write order: the
listing shows the previous checkpoint or the new one, whole, and the next
checkpoint and the next restore are right, including after a kill between
writing the ref and recording it locally (the recovery branch: the ref holds
this session's own manifest)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fsutil import copy_tree, diff_snapshots, snapshot

from agent.faults import ENV, STEPS


def agent(root: Path, work: Path, state: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "agent", "--root", str(root), "--workdir", str(work),
        "--studio", "w", "--state-dir", str(state), *args,
    ]  # fmt: skip


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc


def write_files(d: Path, n: int, seed: int) -> None:
    rnd = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"f{i:03d}").write_bytes(rnd.randbytes(3000))


def ref_digest(work: Path) -> str:
    doc = json.loads((work / ".studios/checkpoints/refs/w/work").read_text())
    digest: str = doc["digest"]
    return digest


def restored(base: Path, work: Path, tmp: Path, tag: str) -> Path:
    target = tmp / f"restore-{tag}"
    copy_tree(base, target)
    run(agent(target, work, tmp / f"st-{tag}", "restore", "--checkpoint", "work"))
    return target


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_each_step_leaves_a_checkpoint_that_carries_on(tmp_path: Path, step: str) -> None:
    base = tmp_path / "base"
    write_files(base / "usr/share", 10, 0)
    root, work, state = tmp_path / "root", tmp_path / "work", tmp_path / "state"
    copy_tree(base, root)
    run(agent(root, work, state, "baseline"))
    write_files(root / "opt/first", 20, 1)
    run(agent(root, work, state, "checkpoint", "--name", "work"))
    first, first_digest = snapshot(root), ref_digest(work)

    write_files(root / "opt/second", 20, 2)
    (root / "usr/share/f000").write_bytes(b"changed")
    shutil.rmtree(root / "opt/first")
    second = snapshot(root)
    killed = subprocess.run(
        agent(root, work, state, "checkpoint", "--name", "work"),
        capture_output=True,
        env={**os.environ, ENV: step},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    recorded = json.loads((state / "session.json").read_text())["refs"]["work"]
    assert recorded == first_digest  # the kill came before the session recorded anything
    if step in ("layer", "manifest"):
        assert ref_digest(work) == first_digest
        assert diff_snapshots(first, snapshot(restored(base, work, tmp_path, "killed"))) == []
    else:  # the ref already names the new checkpoint, which is whole
        assert ref_digest(work) != recorded
        assert diff_snapshots(second, snapshot(restored(base, work, tmp_path, "killed"))) == []

    # The session carries on from where it was recorded: the next checkpoint
    # takes over its own ref and holds every change since the last recorded one.
    write_files(root / "opt/third", 5, 3)
    run(agent(root, work, state, "checkpoint", "--name", "work"))
    assert json.loads((state / "session.json").read_text())["refs"]["work"] == ref_digest(work)
    assert diff_snapshots(snapshot(root), snapshot(restored(base, work, tmp_path, "next"))) == []
    listed = json.loads(run(agent(root, work, state, "checkpoints", "--json")).stdout)
    assert [(c["name"], c["state"]) for c in listed] == [("work", "finalized")]
