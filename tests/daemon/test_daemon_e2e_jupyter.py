"""End to end: ``python -m agent run`` supervising a real JupyterLab, stopped by a real SIGTERM.

A notebook written through JupyterLab's contents API lands in the next
periodic checkpoint, the SIGTERM'd agent finalizes it within the grace, and
a new agent on a fresh copy of the root restores it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]
import pytest
from daemon_helpers import (
    TOKEN,
    FakeControlPlane,
    eventually,
    free_port,
    layer_names,
    make_tree,
    read_manifest,
)

from agent.checkpoint.manifest import CheckpointState

pytestmark = pytest.mark.slow

STUDIO = "nb"
PREFIX = f"/studio/{STUDIO}/"
NOTEBOOK: dict[str, Any] = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "a1",
            "metadata": {},
            "outputs": [],
            "source": "import pandas as pd  # the analysis that must survive",
        }
    ],
    "metadata": {},
    "nbformat": 4,
    "nbformat_minor": 5,
}

# how the templates start JupyterLab: port and prefix from the platform's variables
JUPYTER = (
    'exec "$0" -m jupyterlab --no-browser --ServerApp.ip=127.0.0.1'
    ' --ServerApp.port="$CONNECT_TOOL_PORT" --ServerApp.port_retries=0'
    ' --ServerApp.base_url="$CONNECT_TOOL_PATH_PREFIX" --ServerApp.root_dir="$1"'
    " --IdentityProvider.token= --ServerApp.password= --ServerApp.disable_check_xsrf=True"
    " --ServerApp.allow_root=True"
)


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    api: str
    tool: str
    log: Path

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@contextmanager
def agent(tmp: Path, root: Path, workdir: Path, cp: FakeControlPlane, tag: str) -> Iterator[Agent]:
    api_port, tool_port = free_port(), free_port()
    home = tmp / f"home-{tag}"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "STUDIO_ROOT": str(root),
        "STUDIO_WORKDIR": str(workdir),
        "STUDIO_STUDIO": STUDIO,
        "STUDIO_API_PORT": str(api_port),
        "STUDIO_API_TOKEN": TOKEN,
        "CONNECT_TOOL_PORT": str(tool_port),
        "CONNECT_TOOL_PATH_PREFIX": PREFIX,
        "STUDIO_READY_PATH": "/api",
        "STUDIO_READY_TIMEOUT": "180",
        "STUDIO_CHECKPOINT_INTERVAL": "1",
        "STUDIO_CONTROL_PLANE_URL": cp.url,
        "STUDIO_HEARTBEAT_INTERVAL": "2",
        "STUDIO_COMPRESSION_THREADS": "1",
    }
    for k in ("STUDIO_STOP_GRACE", "STUDIO_IDE_COMMAND", "STUDIO_RESTORE_FROM"):
        env.pop(k, None)  # the defaults: 30 s grace, the IDE from the command line
    log = tmp / f"agent-{tag}.log"
    argv = [sys.executable, "-m", "agent", "run", "--", "sh", "-c", JUPYTER]
    argv += [sys.executable, str(root / "home" / "user")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    a = Agent(proc, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{tool_port}{PREFIX}", log)
    try:
        yield a
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@asynccontextmanager
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=aiohttp.ClientTimeout(total=30)
    ) as c:
        yield c


async def _get(c: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    try:
        async with c.get(url) as r:
            return r.status, await r.json() if r.content_type == "application/json" else None
    except aiohttp.ClientError:
        return 0, None


async def _wait_running(c: aiohttp.ClientSession, a: Agent) -> dict[str, Any]:
    async def running() -> dict[str, Any] | None:
        assert a.proc.poll() is None, f"the agent exited early:\n{a.log_tail()}"
        code, st = await _get(c, a.api + "/v1/status")
        return st if code == 200 and st["status"] == "running" else None

    try:
        result: dict[str, Any] = await eventually(running, timeout=240, interval=0.25)
    except AssertionError:
        print(a.log_tail())
        raise
    return result


async def _sigterm_and_wait(a: Agent) -> tuple[int, float]:
    t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(a.proc.wait, 60)
    return code, time.monotonic() - t0


async def test_jupyterlab_session_checkpoints_stops_and_restores(
    tmp_path: Path, control_plane: FakeControlPlane
) -> None:
    image = tmp_path / "image"  # the container image's root, copied for each session
    make_tree(image)
    workdir = tmp_path / "work"
    workdir.mkdir()

    # -- first session: create a notebook, see it checkpointed, stop with SIGTERM
    root1 = tmp_path / "root1"
    shutil.copytree(image, root1, symlinks=True)
    with agent(tmp_path, root1, workdir, control_plane, "1") as a:
        async with client() as c:
            st = await _wait_running(c, a)
            ide_pid = st["ide"]["pid"]
            name = st["session"]["checkpoint"]["name"]
            async with c.put(
                a.tool + "api/contents/analysis.ipynb",
                json={"type": "notebook", "format": "json", "content": NOTEBOOK},
            ) as r:
                assert r.status in (200, 201), await r.text()
            assert (root1 / "home" / "user" / "analysis.ipynb").exists()

            async def checkpointed() -> bool:
                m = await read_manifest(workdir, STUDIO, name)
                if m is None or m.state is not CheckpointState.INTERIM:
                    return False
                for layer in m.layers:
                    if "home/user/analysis.ipynb" in await layer_names(workdir, layer.digest):
                        return True
                return False

            await eventually(checkpointed, timeout=60, what="the notebook in a periodic checkpoint")
            code, elapsed = await _sigterm_and_wait(a)
        assert code == 0, a.log_tail()
        assert elapsed < 30.0  # the platform's SIGKILL comes 30 s after SIGTERM
        assert not psutil.pid_exists(ide_pid) or psutil.Process(ide_pid).status() == "zombie"

    final = await read_manifest(workdir, STUDIO, name)
    assert final is not None and final.state is CheckpointState.FINALIZED
    await eventually(lambda: control_plane.statuses()[-1:] == ["stopped"])
    assert control_plane.statuses() == ["starting", "running", "stopping", "stopped"]
    stopping = next(e for e in control_plane.events() if e.get("status") == "stopping")
    assert stopping["reason"] == "received SIGTERM"
    lines = [json.loads(x) for x in a.log.read_text().splitlines() if x.startswith("{")]
    assert any(x["event"] == "ide.output" for x in lines)  # the IDE's output is in our log

    # -- second session on a fresh copy of the image: the notebook is back
    root2 = tmp_path / "root2"
    shutil.copytree(image, root2, symlinks=True)
    assert not (root2 / "home" / "user" / "analysis.ipynb").exists()
    with agent(tmp_path, root2, workdir, control_plane, "2") as b:
        async with client() as c:
            st = await _wait_running(c, b)
            assert st["session"]["restored"]["name"] == name
            assert st["session"]["restored"]["state"] == "finalized"
            code, nb = await _get(c, b.tool + "api/contents/analysis.ipynb")
            assert code == 200
            assert nb["content"]["cells"][0]["source"] == NOTEBOOK["cells"][0]["source"]
            code, _ = await _sigterm_and_wait(b)
        assert code == 0, b.log_tail()
