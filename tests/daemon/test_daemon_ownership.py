"""The daemon as a real process owns its root: one-shots beside it go through its API
or are refused, a second daemon is refused, and a daemon killed and started again on
the same root carries its unsaved work into the next checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from daemon_helpers import TOKEN, eventually, fake_ide, free_port, make_tree


def _env(root: Path, workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STUDIO_", "CONNECT_"))}
    env.update(
        STUDIO_ROOT=str(root),
        STUDIO_WORKDIR=str(workdir),
        STUDIO_STUDIO="p1",
        STUDIO_API_PORT=str(free_port()),
        CONNECT_TOOL_PORT=str(free_port()),
        STUDIO_STOP_GRACE="20",
        STUDIO_COMPRESSION_THREADS="1",
    )
    env.update(extra)
    return env


class Daemon:
    """``python -m agent run`` with the fake IDE, and its API."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.api = f"http://127.0.0.1:{env['STUDIO_API_PORT']}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run", "--", *fake_ide(),
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    async def status(self) -> dict[str, Any] | None:
        token = self.env.get("STUDIO_API_TOKEN") or _token_file(self.env)
        try:
            async with (
                aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as c,
                c.get(self.api + "/v1/status") as r,
            ):
                doc: dict[str, Any] = await r.json()
                return doc if r.status == 200 else None
        except aiohttp.ClientError:
            return None

    async def running(self) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            assert self.proc is not None and self.proc.returncode is None, "the daemon exited"
            st = await self.status()
            return st if st and st["status"] == "running" else None

        st: dict[str, Any] = await eventually(check, timeout=60, what="the daemon running")
        return st

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.proc.communicate(), 30)
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()


def _token_file(env: dict[str, str]) -> str:
    with contextlib.suppress(OSError):
        return (Path(env["STUDIO_ROOT"]) / "var/lib/studio-agent/api-token").read_text().strip()
    return ""


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def _one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("studio-agent: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


async def test_beside_a_running_daemon_one_shots_use_its_api_or_are_refused(
    root: Path, workdir: Path
) -> None:
    env = _env(root, workdir)  # no token configured: the daemon writes one for local tools
    d = Daemon(env)
    await d.start()
    try:
        st = await d.running()
        own = st["session"]["checkpoint"]["name"]
        pid = str(d.proc.pid if d.proc else 0)

        (root / "home/user/by-hand.txt").write_text("checkpointed by hand\n")
        done = await _cli(env, "checkpoint")
        assert done.returncode == 0, done.stderr
        assert f"checkpoint {own} (interim) written by the session daemon (pid {pid})" in (
            done.stdout
        )
        named = await _cli(env, "checkpoint", "--name", "by-hand")
        assert named.returncode == 0 and "checkpoint by-hand (finalized)" in named.stdout
        renamed = await _cli(env, "rename", "by-hand", "kept")
        assert renamed.returncode == 0 and "renamed by-hand to kept" in renamed.stdout

        _one_line(await _cli(env, "restore", "--force"), f"(pid {pid})", "stop it first")
        _one_line(await _cli(env, "baseline"), f"(pid {pid})")
        second = await _cli({**env, "STUDIO_API_PORT": str(free_port())}, "run", "--", *fake_ide())
        _one_line(second, f"the session daemon (pid {pid}) is using the state dir")

        # the daemon's own checkpoints still work, the final one included
        (root / "home/user/late.txt").write_text("after the one-shots\n")
        assert await d.stop() == 0
    finally:
        if d.proc is not None and d.proc.returncode is None:
            await d.kill()
    listed = json.loads((await _cli(env, "checkpoints", "--json")).stdout)
    states = {c["name"]: c["state"] for c in listed}
    assert states == {own: "finalized", "kept": "finalized"}


async def test_a_daemon_killed_and_started_again_keeps_the_unsaved_work(
    root: Path, workdir: Path, tmp_path: Path
) -> None:
    env = _env(root, workdir, STUDIO_API_TOKEN=TOKEN)
    first = Daemon(env)
    await first.start()
    try:
        st = await first.running()
        notes = root / "home/user/notes.txt"
        notes.write_text("saved\n")
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as c,
            c.post(first.api + "/v1/checkpoints") as r,
        ):
            assert r.status == 201, await r.text()
        # written after the last checkpoint: only the root has them
        notes.write_text("unsaved edit\n")
        (root / "home/user/new.txt").write_text("unsaved file\n")
        await first.kill()
        os.kill(st["ide"]["pid"], signal.SIGKILL)  # the IDE has a session of its own
    finally:
        if first.proc is not None and first.proc.returncode is None:
            await first.kill()

    again = Daemon({**env, "STUDIO_API_PORT": str(free_port())})
    await again.start()
    try:
        st2 = await again.running()
        assert st2["session"]["restored"] is None  # nothing restored over the work
        assert notes.read_text() == "unsaved edit\n"
        assert await again.stop() == 0
    finally:
        if again.proc is not None and again.proc.returncode is None:
            await again.kill()

    # the new session's checkpoint holds the work, restored on a fresh root
    fresh = tmp_path / "fresh"
    make_tree(fresh)
    name = st2["session"]["checkpoint"]["name"]
    fresh_env = {**env, "STUDIO_ROOT": str(fresh)}
    done = await _cli(fresh_env, "restore", "--checkpoint", name)
    assert done.returncode == 0, done.stderr
    assert (fresh / "home/user/notes.txt").read_text() == "unsaved edit\n"
    assert (fresh / "home/user/new.txt").read_text() == "unsaved file\n"
