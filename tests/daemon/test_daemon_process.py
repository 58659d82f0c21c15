"""``python -m agent run`` as a real process: SIGINT, the IDE from settings, exit codes, logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from daemon_helpers import TOKEN, eventually, fake_ide, free_port, read_manifest

from agent.checkpoint.manifest import CheckpointState


def _env(root: Path, workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STUDIO_", "CONNECT_"))}
    env.update(
        STUDIO_ROOT=str(root),
        STUDIO_WORKDIR=str(workdir),
        STUDIO_STUDIO="p1",
        STUDIO_API_PORT=str(free_port()),
        STUDIO_API_TOKEN=TOKEN,
        CONNECT_TOOL_PORT=str(free_port()),
        STUDIO_STOP_GRACE="20",
    )
    env.update(extra)
    return env


def _lines(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]


async def test_sigint_stops_a_session_whose_ide_comes_from_the_settings(
    root: Path, workdir: Path
) -> None:
    env = _env(root, workdir, STUDIO_IDE_COMMAND=json.dumps(fake_ide()))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", env=env, stdout=subprocess.PIPE
    )
    api = f"http://127.0.0.1:{env['STUDIO_API_PORT']}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as c:

        async def running() -> dict[str, Any] | None:
            assert proc.returncode is None
            try:
                async with c.get(api + "/v1/status") as r:
                    st: dict[str, Any] = await r.json()
                    return st if st["status"] == "running" else None
            except aiohttp.ClientError:
                return None

        st = await eventually(running, timeout=60)
    proc.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    events = [x["event"] for x in _lines(out)]
    assert "ide.output" in events and events[-1] == "daemon.exit"
    stopping = next(x for x in _lines(out) if x.get("status") == "stopping")
    assert stopping["reason"] == "received SIGINT"
    manifest = await read_manifest(workdir, "p1", st["session"]["checkpoint"]["name"])
    assert manifest is not None and manifest.state is CheckpointState.FINALIZED


async def test_without_an_ide_command_the_agent_exits_2_saying_why(
    root: Path, workdir: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", env=_env(root, workdir), stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    errors = [x for x in _lines(out) if x["level"] == "error"]
    assert errors and "no IDE command" in errors[0]["error"]


async def test_the_log_level_setting_filters_lines(root: Path, workdir: Path) -> None:
    env = _env(root, workdir, STUDIO_LOG_LEVEL="warning", STUDIO_RESTORE_FROM="missing")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--", *fake_ide(), env=env, stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1  # the restore failed: errored
    lines = _lines(out)
    assert lines and {x["level"] for x in lines} <= {"warning", "error"}


_STUCK_STORE_DRIVER = """
import asyncio, sys, time
from agent.daemon import main
from agent.settings import load_settings
from agent.store.local import LocalStore

class StuckStore(LocalStore):
    # a store whose upload hangs in a worker thread, as a wedged network call would
    async def put_blob(self, src, digest, size):
        if self.stuck:
            await asyncio.to_thread(time.sleep, 3600)
        await super().put_blob(src, digest, size)

settings = load_settings()
store = StuckStore(settings.workdir)
store.stuck = False
main.open_store = lambda _settings: store
main.Daemon.request_stop_original = main.Daemon.request_stop
def request_stop(self, reason):
    store.stuck = True  # from the stop on, uploads hang
    main.Daemon.request_stop_original(self, reason)
main.Daemon.request_stop = request_stop
sys.exit(main.run(settings, sys.argv[1:]))
"""


async def test_a_wedged_final_checkpoint_thread_does_not_hold_the_exit(
    root: Path, workdir: Path
) -> None:
    env = _env(root, workdir, STUDIO_STOP_GRACE="4", STUDIO_IDE_STOP_TIMEOUT="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _STUCK_STORE_DRIVER, *fake_ide(), env=env, stdout=subprocess.PIPE
    )
    api = f"http://127.0.0.1:{env['STUDIO_API_PORT']}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as c:

        async def running() -> bool:
            assert proc.returncode is None
            try:
                async with c.get(api + "/v1/status") as r:
                    return bool((await r.json())["status"] == "running")
            except aiohttp.ClientError:
                return False

        await eventually(running, timeout=60)
        (root / "home" / "user" / "late.txt").write_text("changed before the stop\n")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert loop.time() - t0 < 4.0
    assert proc.returncode == 0
    exit_line = _lines(out)[-1]
    assert exit_line["event"] == "daemon.exit" and "did not finish" in exit_line["reason"]
