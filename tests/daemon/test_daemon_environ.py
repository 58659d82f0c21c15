"""What a running session shows of its tokens: neither the IDE's environment nor
the agent's own ``/proc/<pid>/environ`` holds them; the IDE still gets the rest
of the agent's environment (AWS credentials included, for the user's own work)."""

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
from daemon_helpers import eventually, fake_ide, free_port

API_TOKEN = "api-token-never-shown-7f3a"
CP_TOKEN = "control-plane-token-never-shown-91c2"


def environ_of(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


async def test_no_token_is_visible_in_the_ide_or_the_agent(root: Path, workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STUDIO_", "CONNECT_"))}
    env.update(
        STUDIO_ROOT=str(root),
        STUDIO_WORKDIR=str(workdir),
        STUDIO_STUDIO="env1",
        STUDIO_API_PORT=str(free_port()),
        STUDIO_API_TOKEN=API_TOKEN,
        STUDIO_CONTROL_PLANE_TOKEN=CP_TOKEN,
        STUDIO_IDE_COMMAND=json.dumps(fake_ide()),
        CONNECT_TOOL_PORT=str(free_port()),
        AWS_ACCESS_KEY_ID="AKIA-for-the-users-own-work",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", env=env, stdout=subprocess.DEVNULL
    )
    api = f"http://127.0.0.1:{env['STUDIO_API_PORT']}"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_TOKEN}"}) as c:

            async def running() -> dict[str, Any] | None:
                assert proc.returncode is None
                try:
                    async with c.get(api + "/v1/status") as r:
                        st: dict[str, Any] = await r.json()
                        return st if st["status"] == "running" else None
                except aiohttp.ClientError:
                    return None

            st = await eventually(running, timeout=60)  # the token still works
        ide = environ_of(st["ide"]["pid"])
        agent = environ_of(proc.pid)
        for token in (API_TOKEN, CP_TOKEN):
            assert token.encode() not in ide
            assert token.encode() not in agent
        assert b"AWS_ACCESS_KEY_ID=AKIA-for-the-users-own-work" in ide
        assert b"STUDIO_ROOT=" in agent  # the rest of the agent's environment stands
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0
