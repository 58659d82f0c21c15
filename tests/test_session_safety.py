"""No work lost to ordinary mistakes: a one-shot beside another agent, the wrong work
directory, a restore over unsaved changes, two sessions started in the same second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fsutil import copy_tree, diff_snapshots, snapshot

from agent.session import Session
from agent.session.owner import Owner
from agent.settings import load_settings
from agent.store.local import LocalStore


class Agent:
    """``python -m agent`` on one root and state dir; ``work`` may be changed per call."""

    def __init__(self, root: Path, work: Path, state: Path, studio: str = "k") -> None:
        self.root, self.work, self.state, self.studio = root, work, state, studio

    def __call__(
        self, *args: str, ok: bool = True, work: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable, "-m", "agent", "--root", str(self.root),
            "--workdir", str(work or self.work), "--studio", self.studio,
            "--state-dir", str(self.state), *args,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("studio-agent: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    b = tmp_path / "base"
    (b / "etc").mkdir(parents=True)
    (b / "etc" / "hostname").write_text("studio\n")
    (b / "home" / "u").mkdir(parents=True)
    (b / "home" / "u" / "notes.txt").write_text("first notes\n")
    return b


@pytest.fixture
def agent(tmp_path: Path, base: Path) -> Agent:
    root = tmp_path / "root"
    copy_tree(base, root)
    a = Agent(root, tmp_path / "work", tmp_path / "state")
    a("baseline")
    return a


def restored_copy(tmp_path: Path, base: Path, work: Path, name: str, tag: str) -> Path:
    target = tmp_path / f"restored-{tag}"
    copy_tree(base, target)
    Agent(target, work, tmp_path / f"st-{tag}")("restore", "--checkpoint", name)
    return target


# -- one agent process per state dir ------------------------------------------------------


def test_a_second_process_on_the_state_dir_is_refused_naming_the_holder(agent: Agent) -> None:
    (agent.root / "home/u/work.py").write_text("print(1)\n")
    with Owner(agent.state, "checkpoint"):  # as if another checkpoint were running
        for args in (["checkpoint"], ["restore", "--force"], ["baseline"], ["rename", "a", "b"]):
            one_line_error(agent(*args, ok=False), f"(pid {os.getpid()})", str(agent.state))
        # reading is fine beside it
        assert agent("diff", "--json", ok=True).returncode == 0
    agent("checkpoint", "--name", "after")  # and once it is gone, the session carries on


# -- a session bound to its store ----------------------------------------------------------


def test_a_checkpoint_to_another_store_starts_a_new_chain_there_and_says_so(
    agent: Agent, tmp_path: Path, base: Path
) -> None:
    (agent.root / "opt/tool").mkdir(parents=True)
    (agent.root / "opt/tool/bin").write_bytes(os.urandom(5000))
    agent("checkpoint", "--name", "one")
    (agent.root / "home/u/notes.txt").write_text("second notes\n")

    other = tmp_path / "typo-work"
    proc = agent("checkpoint", "--name", "two", work=other)
    assert "starts a new chain" in proc.stderr and str(agent.work) in proc.stderr
    # restorable from that store alone: its chain holds the whole root
    got = restored_copy(tmp_path, base, other, "two", "other")
    assert diff_snapshots(snapshot(agent.root, skip=("state",)), snapshot(got)) == []

    # and back in the first store, the session's chain there goes on as before
    (agent.root / "home/u/third.txt").write_text("3\n")
    proc = agent("checkpoint", "--name", "three")
    assert "starts a new chain" in proc.stderr  # the session is now the other store's
    got = restored_copy(tmp_path, base, agent.work, "three", "back")
    assert diff_snapshots(snapshot(agent.root, skip=("state",)), snapshot(got)) == []


def test_a_chain_with_a_layer_gone_from_the_store_is_never_published(
    agent: Agent, tmp_path: Path, base: Path
) -> None:
    (agent.root / "home/u/a.txt").write_text("a\n")
    agent("checkpoint", "--name", "one")
    listed = json.loads(agent("checkpoints", "--json").stdout)
    manifest = json.loads(
        (agent.work / ".studios/checkpoints/blobs/sha256" / listed[0]["digest"][7:]).read_text()
    )
    layer = manifest["layers"][0]["digest"]
    (agent.work / ".studios/checkpoints/blobs/sha256" / layer[7:]).unlink()
    (agent.root / "home/u/b.txt").write_text("b\n")
    proc = agent("checkpoint", "--name", "two")
    assert "missing from" in proc.stderr and "starts a new chain" in proc.stderr
    got = restored_copy(tmp_path, base, agent.work, "two", "two")
    assert diff_snapshots(snapshot(agent.root, skip=("state",)), snapshot(got)) == []


def test_listing_a_store_that_does_not_exist_says_so(agent: Agent, tmp_path: Path) -> None:
    nowhere = tmp_path / "no-such-work"
    for args in (["checkpoints"], ["checkpoints", "--json"], ["studios"], ["restore"]):
        one_line_error(agent(*args, ok=False, work=nowhere), "no checkpoint store at", str(nowhere))
    assert not nowhere.exists()  # and looking did not create it


def test_studios_lists_what_a_work_directory_holds(agent: Agent, tmp_path: Path) -> None:
    agent("checkpoint", "--name", "one")
    agent("checkpoint", "--name", "two")
    other = Agent(tmp_path / "root2", agent.work, tmp_path / "state2", studio="other")
    other.root.mkdir()
    other("baseline")
    other("checkpoint", "--name", "x")
    assert json.loads(agent("studios", "--json").stdout) == [
        {"studio": "k", "checkpoints": 2},
        {"studio": "other", "checkpoints": 1},
    ]
    lines = agent("studios").stdout.splitlines()
    assert lines[0].split() == ["STUDIO", "CHECKPOINTS"] and lines[1].split() == ["k", "2"]
    # a forgotten studio id: the listing names what is there
    stray = Agent(agent.root, agent.work, agent.state, studio="studio")
    assert "it holds: k, other" in stray("checkpoints").stdout


# -- a restore over unsaved changes ------------------------------------------------------------


def test_a_restore_over_unsaved_changes_is_refused_unless_forced(agent: Agent, base: Path) -> None:
    (agent.root / "home/u/notes.txt").write_text("saved notes\n")
    agent("checkpoint", "--name", "one")
    (agent.root / "home/u/notes.txt").write_text("edited, never saved\n")
    (agent.root / "home/u/new.py").write_text("x = 1\n")
    line = one_line_error(
        agent("restore", "--checkpoint", "one", ok=False), "2 changes", "/home/u/", "--force"
    )
    assert "/home/u/new.py" in line and "/home/u/notes.txt" in line
    assert (agent.root / "home/u/notes.txt").read_text() == "edited, never saved\n"

    agent("restore", "--checkpoint", "one", "--force")
    assert (agent.root / "home/u/notes.txt").read_text() == "saved notes\n"
    # the checkpoint does not hold new.py: still there, and still to be saved
    assert json.loads(agent("diff", "--json").stdout)["changes"] == [
        {"path": "/home/u/new.py", "kind": "added", "size": 6}
    ]
    agent("checkpoint", "--name", "two")
    agent("restore", "--checkpoint", "one")  # nothing unsaved now: no refusal


# -- automatic names ---------------------------------------------------------------------------


async def test_two_sessions_started_in_the_same_second_get_names_of_their_own(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path / "work")
    sessions = []
    for i in range(3):
        root = tmp_path / f"root{i}"
        (root / "home").mkdir(parents=True)
        settings = load_settings(root=root, workdir=str(tmp_path / "work"), studio="s")
        sessions.append(Session(settings, store, clock=lambda: 1_700_000_000.0))
    for s in sessions:
        await s.baseline()  # all before any of them writes: each sees the name free
    for i, s in enumerate(sessions):
        (s.root / "home" / f"{i}.txt").write_text(str(i))
        result = await s.checkpoint()
        assert result is not None
    names = [s.auto_name for s in sessions]
    assert names == ["s_1700000000", "s_1700000000_2", "s_1700000000_3"]
    # each keeps its own name from then on
    for s in sessions:
        result = await s.checkpoint()
        assert result is not None and result.info.name == s.auto_name
    assert sorted(await store.list_refs("s")) == sorted(names)


# -- clearing a killed process's leftovers touches nothing else ---------------------------------


def test_only_the_agents_own_leftovers_are_cleared(tmp_path: Path) -> None:
    from agent.checkpoint.scan import Excluder
    from agent.session.leftovers import (
        begin_restore,
        clear_restore_temps,
        clear_state_dir,
    )

    state, root = tmp_path / "state", tmp_path / "root"
    spool = state / "spool"
    (spool / "restore-abc_12").mkdir(parents=True)
    (spool / "restore-abc_12" / "blob").write_text("x")
    ours = [spool / "layer-0af3.tmp", spool / f"put-{'a' * 64}.tmp", spool / ("b" * 64)]
    ours += [spool / f"put-{'c' * 16}-{'d' * 8}.tmp"]  # as put_bytes names them
    ours += [state / "parent-1234abcd.state", state / "session.json.tmp"]
    theirs = [spool / "notes.txt", state / "api-token", state / "parent-99.state.bak"]
    kept = [state / "session.json", state / "parent-feed.state", state / "owner.lock"]
    for p in ours + theirs + kept:
        p.write_text("x")
    assert clear_state_dir(state, spool, "parent-feed.state") == len(ours) + 1
    assert not any(p.exists() for p in ours) and not (spool / "restore-abc_12").exists()
    assert all(p.exists() for p in theirs + kept)

    # a restore's temporaries: only after a restore that never ended, only its pid's
    (root / "home/u").mkdir(parents=True)
    (root / "skip").mkdir()
    user = [root / "home/u/.studio-restore-notes", root / "home/u/.studio-restore-1-2"]
    for p in user:
        p.write_text("a user's file, or another process's")
    mine = root / f"home/u/.studio-restore-{os.getpid()}-7"
    mine.write_text("left by a killed restore")
    excluded = root / f"skip/.studio-restore-{os.getpid()}-8"
    excluded.write_text("in what checkpoints leave out")
    excluder = Excluder(root, [], ["skip"])
    assert clear_restore_temps(root, state, excluder) == 0  # no restore recorded
    assert mine.exists()
    begin_restore(state)  # as a restore that is then killed
    assert clear_restore_temps(root, state, excluder) == 1
    assert not mine.exists() and excluded.exists() and all(p.exists() for p in user)
    assert not (state / "restore.pending").exists()
