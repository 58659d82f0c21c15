"""The daemon's memory does not grow with the number of files either: a real
`studio-agent run` with the change watch on, through its start (a walk), a
checkpoint read through the watch after 1% of the files changed, and the final
checkpoint's full walk, peaks as high at 100,000 files as at 10,000 (within a
bound that the watch's per-directory paths and the change list fit in)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from test_memory import PEAK_RSS
from test_memory_files import _change_one_percent, _tree

BOUND_MB = 20
TOKEN = "memory-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(port: int) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(json.load(r))


def _until(port: int, what: str, cond: Any, proc: subprocess.Popen[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the daemon exited: {proc.communicate()[1][-2000:]}"
        try:
            st = _status(port)
        except OSError:
            st = {}
        if st and cond(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"not {what} within 300 s")


def _daemon_peak(tmp: Path, files: int) -> float:
    root = tmp / "root"
    names = _tree(root, files)
    api, tool = _free_port(), _free_port()
    env = {
        **os.environ,
        "STUDIO_ROOT": str(root),
        "STUDIO_WORKDIR": str(tmp / "work"),
        "STUDIO_STATE_DIR": str(tmp / "state"),
        "STUDIO_STUDIO": "m",
        "STUDIO_API_PORT": str(api),
        "STUDIO_API_TOKEN": TOKEN,
        "STUDIO_TOOL_PORT": str(tool),
        "STUDIO_CHECKPOINT_MIN_INTERVAL": "1",
        "STUDIO_COMPRESSION_THREADS": "1",
    }
    ide = [sys.executable, "-m", "http.server", str(tool), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        [sys.executable, str(PEAK_RSS), "run", "--", *ide],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _until(api, "running", lambda s: s["status"] == "running", proc)
        (root / "first-change").write_text("the first checkpoint walks\n")
        _until(api, "checkpointed", lambda s: s["session"]["checkpoint"]["scan"], proc)
        _change_one_percent(names)
        watched = _until(
            api,
            "checkpointed through the watch",
            lambda s: (
                s["session"]["checkpoint"]["scan"] == "watch"
                and s["session"]["checkpoint"]["changed"] > files // 200
            ),
            proc,
        )
        assert watched["session"]["checkpoint"]["last_error"] is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    kb = [int(ln.split()[1]) for ln in err.splitlines() if ln.startswith("VmHWM ")]
    assert kb, err[-2000:]
    return kb[-1] / 1024


def test_the_daemons_peak_rss_does_not_grow_with_the_file_count(tmp_path: Path) -> None:
    small = _daemon_peak(tmp_path / "small", 10_000)
    large = _daemon_peak(tmp_path / "large", 100_000)
    assert large - small < BOUND_MB, f"{small:.0f} MB at 10,000 files, {large:.0f} at 100,000"
