"""``studio-agent run`` as a benchmark drives it: a real process, watched from outside.

The daemon runs as a user's session runs it, through ``peak_rss.py`` (which
prints its VmHWM at exit), on a root and a local store of the benchmark's,
with a stand-in IDE that only answers the readiness probe and otherwise
sleeps: what it costs is not the agent's, and it costs next to nothing.
Settings go through the environment (``STUDIO_<NAME>``), never flags, so a
setting this checkout does not know yet is ignored rather than refused.

Everything is read from outside the process: its health and answers over
the local API, its own report of each checkpoint in its log (JSON lines on
stdout), its CPU time and that of its children from ``/proc`` (psutil), its
peak RSS from ``/proc/<pid>/status`` and, at exit, from its own VmHWM line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from peak_rss import peak_kb

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789"

# Answers the probe, then sleeps in select() until SIGTERM: no timer wakes it.
IDLE_IDE = """
import os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class Ok(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
HTTPServer(("127.0.0.1", int(os.environ["CONNECT_TOOL_PORT"])), Ok).serve_forever(3600)
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonRun:
    """One ``studio-agent run`` on ``root``, its state and local store below ``scratch``."""

    def __init__(
        self, root: Path, scratch: Path, name: str, settings: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.name = name
        self.workdir = scratch / f"{name}-work"
        self.log_path = scratch / f"{name}.log"
        self._err_path = scratch / f"{name}.err"
        self.api = f"http://127.0.0.1:{free_port()}"
        self.env = dict(
            os.environ,
            PYTHONPATH=str(REPO),
            STUDIO_ROOT=str(root),
            STUDIO_WORKDIR=str(self.workdir),
            STUDIO_STATE_DIR=str(scratch / f"{name}-state"),
            STUDIO_STUDIO=name,
            STUDIO_API_PORT=self.api.rsplit(":", 1)[1],
            STUDIO_API_TOKEN=TOKEN,
            STUDIO_TOOL_PORT=str(free_port()),
            STUDIO_LOG_LEVEL="info",
        )
        self.env.pop("STUDIO_IDE_COMMAND", None)
        self.env.update({f"STUDIO_{k.upper()}": v for k, v in (settings or {}).items()})
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.exit_code: int | None = None
        self._hwm_kb = 0

    # -- life -------------------------------------------------------------------------

    def start(self) -> None:
        cmd = [
            sys.executable, str(REPO / "bench" / "peak_rss.py"), "run",
            "--", sys.executable, "-c", IDLE_IDE,
        ]  # fmt: skip
        with open(self.log_path, "wb") as out, open(self._err_path, "wb") as err:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=err)

    def wait_running(self, timeout: float = 600.0) -> float:
        """Seconds from the start until the session runs (restored or baselined, IDE ready)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_alive()
            try:
                if self.request("GET", "/healthz", timeout=5)["status"] == "running":
                    return time.perf_counter() - self.started
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: not running within {timeout:.0f} s")

    def stop(self, timeout: float = 120.0) -> float:
        """SIGTERM, then wait: seconds from the signal to the exit (final checkpoint in)."""
        assert self.proc is not None
        self.sample()
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        self.exit_code = self.proc.wait(timeout)
        seconds = time.perf_counter() - t0
        kb = peak_kb(self._err_path.read_text(errors="replace"))
        if kb is not None:
            self._hwm_kb = max(self._hwm_kb, kb)
        return seconds

    def kill(self) -> None:
        """Only after a failure: never leave the daemon (nor its IDE) behind."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> DaemonRun:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self._err_path.read_text(errors="replace")[-1500:]
            tail += self.log_path.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {tail}")

    # -- the API and the log -------------------------------------------------------

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 600
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {TOKEN}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from None
        return json.loads(raw) if raw else None

    def checkpoint(self) -> tuple[dict[str, Any], float]:
        """A checkpoint through the API: the daemon's answer and the round trip's seconds."""
        t0 = time.perf_counter()
        result = self.request("POST", "/v1/checkpoints")
        return result, time.perf_counter() - t0

    def events(self, *names: str) -> list[dict[str, Any]]:
        """The daemon's log lines whose event is one of ``names``, oldest first."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not any(f'"{n}"' in line for n in names):
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") in names:
                out.append(doc)
        return out

    def wait_events(
        self,
        names: tuple[str, ...],
        seen: int,
        timeout: float,
        keep: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any] | None:
        """The first line of ``names`` (that ``keep`` keeps) past the ``seen`` first
        such lines; None after ``timeout`` seconds.  Polled every 0.2 s."""
        end = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(*names) if keep is None or keep(e)]
            if len(found) > seen:
                return found[seen]
            self._check_alive()
            if time.monotonic() > end:
                return None
            time.sleep(0.2)

    # -- from outside ---------------------------------------------------------------

    def cpu_seconds(self) -> float:
        """CPU time of the daemon and every process below it (those reaped included)."""
        assert self.proc is not None
        top = psutil.Process(self.proc.pid)
        total = 0.0
        for p in [top, *top.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    def sample(self) -> None:
        """Read the daemon's VmHWM now (the kernel's high-water mark of its RSS)."""
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self._hwm_kb = max(self._hwm_kb, int(line.split()[1]))
        except OSError:
            pass

    @property
    def peak_rss_mb(self) -> float:
        return self._hwm_kb / 1024
