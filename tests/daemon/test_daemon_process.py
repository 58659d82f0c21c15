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
        **extra,
    )
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
