"""The README's quickstart, run as written: the first thing a new user tries must work.

The shell block is taken from the README and run with bash, unchanged; only the
variables it reads with defaults (``DEMO``, ``TOOL_PORT``, ``API_PORT``) point it
at a scratch directory and free ports, and ``.venv/bin/studio-agent`` is this
checkout's agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def quickstart_block() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m, "the README's quickstart lost its shell block"
    return m.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_block_reads_its_places_from_the_environment() -> None:
    """Copy-pasteable as it stands, and adaptable: every place it uses has a default.
    It waits for the session to be running: /healthz answers while it is starting,
    when a manual checkpoint cannot be taken yet."""
    block = quickstart_block()
    for var, default in (("DEMO", "/tmp/demo"), ("TOOL_PORT", "8080"), ("API_PORT", "7070")):
        assert f"{var}=${{{var}:-{default}}}" in block
    assert "/tmp/demo" not in block.replace("${DEMO:-/tmp/demo}", "")
    assert "/v1/status" in block and "running" in block  # not only /healthz: see below


def test_the_quickstart_runs_and_leaves_a_checkpoint(tmp_path: Path) -> None:
    cwd = tmp_path / "checkout"
    (cwd / ".venv/bin").mkdir(parents=True)
    agent = cwd / ".venv/bin/studio-agent"
    agent.write_text(f'#!/bin/sh\nexec {sys.executable} -m agent "$@"\n')
    agent.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_")}
    env.update(
        DEMO=str(tmp_path / "demo"),
        TOOL_PORT=str(_free_port()),
        API_PORT=str(_free_port()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    script = "set -e\n" + quickstart_block()
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the daemon it starts goes with it if anything hangs
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the quickstart hung\nstdout:\n{out}\nstderr:\n{err}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left of it: as it should be
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    listing = out.strip().splitlines()
    header = next(i for i, line in enumerate(listing) if line.startswith("NAME "))
    rows = listing[header + 1 :]
    assert rows and rows[0].startswith("demo_"), out
    assert "finalized" in rows[0]

    listed = subprocess.run(
        [str(agent), "checkpoints", "--json"],
        cwd=cwd,
        env=dict(
            env,
            STUDIO_ROOT=env["DEMO"] + "/root",
            STUDIO_WORKDIR=env["DEMO"] + "/work",
            STUDIO_STUDIO="demo",
        ),
        capture_output=True,
        text=True,
        check=True,
    )
    [checkpoint] = json.loads(listed.stdout)
    assert checkpoint["state"] == "finalized" and checkpoint["layers"] >= 1
