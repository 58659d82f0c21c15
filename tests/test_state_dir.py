"""The agent's state dir (by default under the root it restores) can't be turned
into a way to write elsewhere: a restored layer never touches it, and a symlink
or a foreign directory planted there is refused in one line before anything is
written through it."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fsutil import Entry, put_checkpoint, put_layer_blob, tar_bytes, zstd

from agent.errors import UnsafeLayer
from agent.session import Session
from agent.settings import Settings
from agent.statedir import UnsafeStateDir
from agent.store.local import LocalStore

STATE = "var/lib/studio-agent"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/keep").write_text("image content")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    return {"root": root, "outside": outside, "work": tmp_path / "work", "tmp": tmp_path}


def session(env: dict[str, Path]) -> Session:
    # The default state dir: <root>/var/lib/studio-agent.
    settings = Settings(root=env["root"], workdir=str(env["work"]), studio="s")
    return Session(settings, LocalStore(env["work"]))


def outside_untouched(env: dict[str, Path]) -> None:
    assert sorted(p.name for p in env["outside"].iterdir()) == ["secret"]
    assert (env["outside"] / "secret").read_text() == "do not touch"


def own_dirs_intact(root: Path) -> None:
    for d in (root / STATE, root / STATE / "spool"):
        assert d.is_dir() and not d.is_symlink(), d
    assert not (root / "var/lib").is_symlink()


async def restore_crafted(env: dict[str, Path], entries: list[Entry]) -> Session:
    put_checkpoint(env["work"], "s", "cp", [put_layer_blob(env["work"], zstd(tar_bytes(entries)))])
    s = session(env)
    await s.start("cp", required=True)
    return s


async def test_entries_under_the_state_dir_are_skipped(env: dict[str, Path]) -> None:
    out = str(env["outside"])
    s = await restore_crafted(
        env,
        [
            Entry(f"{STATE}/spool", tarfile.SYMTYPE, linkname=out),
            Entry(f"{STATE}/session.json", data=b"{}"),
            Entry(f"{STATE}/api-token", data=b"planted"),
            Entry("var/lib/.wh.studio-agent", data=b""),
            Entry(f"{STATE}/.wh..wh..opq", data=b""),
            Entry("opt/app.txt", data=b"restored"),
        ],
    )
    assert (env["root"] / "opt/app.txt").read_text() == "restored"
    own_dirs_intact(env["root"])
    assert not (env["root"] / STATE / "api-token").exists()
    # The next checkpoint writes its spool file where the agent means it to.
    (env["root"] / "opt/new.txt").write_text("new")
    result = await s.checkpoint()
    assert result is not None and result.changed > 0
    outside_untouched(env)


@pytest.mark.parametrize(
    "entry",
    [
        Entry("var/lib", tarfile.SYMTYPE, linkname="/elsewhere"),
        Entry("var", data=b"not a directory"),
        Entry("var/lib/.wh..wh..opq", data=b""),
        Entry(".wh.var", data=b""),
        Entry("stolen", tarfile.LNKTYPE, linkname=f"{STATE}/session.json"),
    ],
    ids=["parent-symlink", "parent-file", "opaque-parent", "whiteout-parent", "link"],
)
async def test_a_layer_that_would_replace_the_state_dir_is_refused(
    env: dict[str, Path], entry: Entry
) -> None:
    await session(env).baseline()  # a session's files are there to lose
    before = sorted(p.name for p in (env["root"] / STATE).iterdir())
    with pytest.raises(UnsafeLayer, match="agent's own"):
        await restore_crafted(env, [entry])
    own_dirs_intact(env["root"])
    assert sorted(p.name for p in (env["root"] / STATE).iterdir()) == before


def plant_symlink(d: Path, target: Path) -> None:
    os.rename(d, target / d.name)
    d.symlink_to(target / d.name)


@pytest.mark.parametrize("where", ["spool", "state", "parent"])
async def test_a_planted_symlink_is_refused(env: dict[str, Path], where: str) -> None:
    s = session(env)
    await s.baseline()
    (env["root"] / STATE / "spool").mkdir(exist_ok=True)
    target = env["tmp"] / "elsewhere"
    target.mkdir()
    d = {"spool": STATE + "/spool", "state": STATE, "parent": "var/lib"}[where]
    plant_symlink(env["root"] / d, target)
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    (env["root"] / "opt").mkdir()
    (env["root"] / "opt/new.txt").write_text("new")
    with pytest.raises(UnsafeStateDir, match="is a symlink"):
        await session(env).checkpoint()
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before


async def test_a_planted_file_name_is_not_written_through(env: dict[str, Path]) -> None:
    s = session(env)
    await s.baseline()
    state = env["root"] / STATE
    (state / "session.json.tmp").symlink_to(env["outside"] / "secret")
    (state / "spool").mkdir(exist_ok=True)
    await s.checkpoint()
    outside_untouched(env)
    assert not (state / "session.json.tmp").exists()


async def test_a_state_dir_others_can_write_is_refused(env: dict[str, Path]) -> None:
    s = session(env)
    await s.baseline()
    os.chmod(env["root"] / STATE, 0o777)
    with pytest.raises(UnsafeStateDir, match="writable by others"):
        await session(env).checkpoint()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
async def test_a_state_dir_of_another_user_is_refused(env: dict[str, Path]) -> None:
    s = session(env)
    await s.baseline()
    os.chown(env["root"] / STATE / "spool", 4321, 4321)
    with pytest.raises(UnsafeStateDir, match="belongs to uid 4321"):
        await session(env).checkpoint()


def test_the_cli_says_so_in_one_line(env: dict[str, Path]) -> None:
    cmd = [
        sys.executable, "-m", "agent", "--root", str(env["root"]),
        "--workdir", str(env["work"]), "--studio", "s",
    ]  # fmt: skip
    subprocess.run([*cmd, "baseline"], check=True, capture_output=True)
    plant_symlink(env["root"] / STATE, env["outside"])
    proc = subprocess.run([*cmd, "checkpoint"], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the state directory" in lines[0], proc.stderr
