"""gc beside live writers, as users run them: real CLI processes checkpointing,
cloning (``restore --checkpoint OTHER/NAME``) and deleting in one thread while
two loops of ``gc --grace 0s`` run in others; afterwards every blob of every
listed checkpoint is present with its digest, and each checkpoint restores.
And the commands' output: what a user reads."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.checkpoint.manifest import EMPTY_DIGEST
from agent.session.reach import ManifestReader
from agent.settings import load_settings
from agent.store import open_store


class Agent:
    """``studio-agent`` of one studio on one root."""

    def __init__(self, tmp: Path, workdir: str, studio: str, tag: str) -> None:
        self.root = tmp / f"root-{tag}"
        self.root.mkdir(parents=True)
        self.state = tmp / f"state-{tag}"
        self.workdir = workdir
        self.studio = studio

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable, "-m", "agent", "--root", str(self.root), "--workdir", self.workdir,
            "--studio", self.studio, "--state-dir", str(self.state), *args,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if ok:
            assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    def files(self) -> dict[str, str]:
        return {str(p.relative_to(self.root)): p.read_text() for p in self.root.rglob("*.txt")}

    def checkpoint(self, *args: str) -> str:
        out = self("checkpoint", *args).stdout
        m = re.match(r"checkpoint (\S+) ", out)
        assert m, out
        return m.group(1)


@pytest.fixture(params=["local", "s3"])
def workdir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "work")
    return str(request.getfixturevalue("s3_workdir"))


def test_gc_beside_live_writers(tmp_path: Path, workdir: str) -> None:
    a = Agent(tmp_path, workdir, "a", "a")
    b = Agent(tmp_path, workdir, "b", "b")
    expected: dict[str, dict[str, str]] = {}
    writing = threading.Event()
    writing.set()
    gc_runs: list[subprocess.CompletedProcess[str]] = []

    def writers() -> None:
        try:
            a("baseline")
            for i in range(8):
                (a.root / f"f{i}.txt").write_text(f"{i} " + os.urandom(200).hex())
                (a.root / "same.txt").write_text(f"version {i}")
                named = i % 3 == 0
                name = a.checkpoint(*(["--name", f"n{i}"] if named else []))
                expected[f"a/{name}"] = a.files()
                if i == 1:  # a clone of a's first named checkpoint
                    b("restore", "--checkpoint", "a/n0")
                    (b.root / "b.txt").write_text("b's own")
                    expected[f"b/{b.checkpoint()}"] = b.files()
                if i == 7:  # an older named checkpoint (not the chain's head) goes
                    a("delete", "n3")
                    del expected["a/n3"]
            (b.root / "b.txt").write_text("b again")
            expected[f"b/{b.checkpoint()}"] = b.files()
            a("delete", "a/n0")  # the checkpoint b was cloned from
            del expected["a/n0"]
        finally:
            writing.clear()

    def collector() -> None:
        gc = Agent(tmp_path, workdir, "gc", f"gc-{threading.get_ident()}")
        while writing.is_set():
            gc_runs.append(gc("gc", "--grace", "0s", ok=False))

    threads = [threading.Thread(target=f) for f in (writers, collector, collector)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not writing.is_set()
    assert len(expected) == 3 and gc_runs  # a's latest, a/n6, b's latest
    for run in gc_runs:  # each either ran, or found the other holding the lease
        assert run.returncode == 0 or "holds the lease" in run.stderr, run.stderr
    assert any(r.returncode == 0 for r in gc_runs)

    asyncio.run(_every_blob_present(workdir, tmp_path / "verify", set(expected)))
    for source, content in expected.items():
        r = Agent(tmp_path, workdir, "r", f"restore-{source.replace('/', '-')}")
        r("restore", "--checkpoint", source)
        assert r.files() == content, source
    final = Agent(tmp_path, workdir, "gc", "gc-final")("gc", "--grace", "0s")
    assert "deleted" in final.stdout


async def _every_blob_present(workdir: str, scratch: Path, listed: set[str]) -> None:
    store = open_store(load_settings(workdir=workdir))
    try:
        reader = ManifestReader(store, scratch)
        seen: set[str] = set()
        for studio in ("a", "b"):
            for name, ref in (await store.list_refs(studio)).items():
                seen.add(f"{studio}/{name}")
                _, kids = await reader.read(ref.digest)  # verified against its digest
                for kid in kids:
                    if kid.digest == EMPTY_DIGEST:  # the empty config, never stored
                        continue
                    path = await store.get_blob(kid.digest, kid.size, scratch)
                    if path.parent == scratch:
                        path.unlink()
        assert listed <= seen
    finally:
        await store.close()


# -- what the commands say ------------------------------------------------------------------


def test_storage_commands_output(tmp_path: Path) -> None:
    a = Agent(tmp_path, str(tmp_path / "work"), "st", "a")
    a("baseline")
    (a.root / "x.txt").write_text(os.urandom(3000).hex())
    a.checkpoint("--name", "one")
    (a.root / "y.txt").write_text(os.urandom(3000).hex())
    a.checkpoint("--name", "two")
    table = a("checkpoints").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "CREATED", "UPDATED", "SIZE", "FREES", "LAYERS"]

    for bad in ("5x", "h", "", "1.5h", "1h-", "30m1h"):
        proc = a("gc", "--grace", bad, ok=False)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("studio-agent: error: invalid duration")

    proc = a("delete", "nothing", ok=False)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "studio-agent: error: no checkpoint 'nothing' in studio st"
    )
    assert "deleted checkpoint st/two" in a("delete", "st/two").stdout
    dry = a("gc", "--grace", "1h30m", "--dry-run").stdout
    assert "would free 0 B: 0 of" in dry  # everything is younger than the grace
    dry = a("gc", "--grace", "0s", "--dry-run").stdout.splitlines()
    assert len([x for x in dry if x.startswith("would delete sha256:")]) == 2
    assert re.match(r"dry run: would free [\d.]+ KB: 2 of 5 blobs", dry[-1]), dry[-1]
    out = a("gc", "--grace", "0s").stdout
    assert re.search(r"deleted 2 of 5 blobs, freed [\d.]+ KB", out), out

    # Another gc holding the lease: one line that says until when.
    from agent.session.lease import GcLease

    async def hold() -> None:
        store = open_store(load_settings(workdir=str(tmp_path / "work")))
        await GcLease(store).take()
        await store.close()

    asyncio.run(hold())
    proc = a("gc", ok=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "another gc holds the lease" in lines[0]
    assert "expires at" in lines[0]

    assert "deleted 1 checkpoints of studio st" in a("delete-studio", "st").stdout
    assert a("checkpoints").stdout.strip() == "studio st has no checkpoints"
    proc = a("delete-studio", "st", ok=False)
    assert proc.stderr.strip() == "studio-agent: error: studio st has no checkpoints"
