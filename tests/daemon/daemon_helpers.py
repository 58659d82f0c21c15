"""Helpers for the daemon's tests: a small root, a fake control plane, a harness.

Every server binds 127.0.0.1 on a free port and is stopped by its fixture;
waits are bounded polls on a condition, never fixed sleeps.  A daemon on a
``ManualClock`` only sees time pass when its test moves the clock, so what a
test asserts about timing is in the daemon's time, whatever the machine's load.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from agent.checkpoint.manifest import Manifest
from agent.daemon.clock import ManualClock
from agent.daemon.main import Daemon
from agent.store.local import LocalStore

FAKE_IDE = Path(__file__).with_name("fake_ide.py")
TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    cond: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "",
    tick: Callable[[], Awaitable[None]] | None = None,
) -> Any:
    """Poll ``cond`` (sync or async) until it returns something truthy; fail after ``timeout``.

    ``tick``, if given, runs between polls (to move a manual clock on).
    """
    end = time.monotonic() + timeout
    last: Any = None
    while True:
        last = cond()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout}s: {what or cond} ({last!r})")
        if tick is not None:
            await tick()
        await asyncio.sleep(interval)


async def read_manifest(workdir: Path, studio: str, name: str) -> Manifest | None:
    """The manifest a checkpoint ref points at, read straight from the local store."""
    store = LocalStore(workdir)
    ref = await store.get_ref(studio, name)
    if ref is None:
        return None
    return Manifest.decode(await store.get_bytes(ref.digest, workdir / "spool-test"))


async def layer_names(workdir: Path, digest: str) -> set[str]:
    """Paths in a checkpoint layer (a zstd tar), as relative paths."""
    import tarfile

    import zstandard

    store = LocalStore(workdir)
    path = await store.get_blob(digest, None, workdir / "spool-test")
    with (
        open(path, "rb") as f,
        zstandard.ZstdDecompressor().stream_reader(f) as z,
        tarfile.open(fileobj=z, mode="r|") as tar,
    ):
        return {m.name.removeprefix("./").rstrip("/") for m in tar}


def make_tree(root: Path) -> None:
    """A small root filesystem: a few dirs, files, a symlink."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("studio\n")
    (root / "home" / "user").mkdir(parents=True)
    (root / "home" / "user" / "README.md").write_text("# hello\n")
    (root / "usr" / "bin").mkdir(parents=True)
    tool = root / "usr" / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    (root / "usr" / "bin" / "tool-link").symlink_to("tool")
    (root / "tmp").mkdir()


def fake_ide(*args: str) -> list[str]:
    return [sys.executable, str(FAKE_IDE), *args]


# -- a fake control plane --------------------------------------------------------------------


@dataclass
class Received:
    kind: str  # "heartbeat" | "event"
    studio: str
    body: dict[str, Any]
    auth: str


@dataclass
class FakeControlPlane:
    """Records heartbeats and events; can be taken down and brought back on the same port."""

    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    reply_interval: float | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        return [r.body for r in self.received if r.kind == "event"]

    def statuses(self) -> list[str]:
        return [e["status"] for e in self.events() if e.get("type") == "status"]

    def heartbeats(self) -> list[dict[str, Any]]:
        return [r.body for r in self.received if r.kind == "heartbeat"]

    async def start(self) -> None:
        async def heartbeat(request: web.Request) -> web.Response:
            self.received.append(
                Received(
                    "heartbeat",
                    request.match_info["studio"],
                    await request.json(),
                    request.headers.get("Authorization", ""),
                )
            )
            reply: dict[str, Any] = {"ok": True}
            if self.reply_interval is not None:
                reply["heartbeat_interval"] = self.reply_interval
            return web.json_response(reply)

        async def event(request: web.Request) -> web.Response:
            self.received.append(
                Received(
                    "event",
                    request.match_info["studio"],
                    await request.json(),
                    request.headers.get("Authorization", ""),
                )
            )
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/studios/{studio}/heartbeat", heartbeat)
        app.router.add_post("/studios/{studio}/events", event)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# -- running a daemon in-process ----------------------------------------------------------------


class Harness:
    """A daemon run as a task of the test's loop, and an authenticated client for its API."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.task: asyncio.Task[int] | None = None
        self.http: aiohttp.ClientSession | None = None

    @property
    def base(self) -> str:
        assert self.daemon.api is not None
        return f"http://127.0.0.1:{self.daemon.api.port}"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.daemon.run())
        self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
        await eventually(
            lambda: (
                self.task is not None
                and (self.task.done() or (self.daemon.api is not None and self.daemon.api.port))
            ),
            what="API up",
        )
        await eventually(self._healthy, what="API answers")

    async def _healthy(self) -> bool:
        if self.task is not None and self.task.done():
            return True
        try:
            status, _ = await self.get("/healthz")
        except aiohttp.ClientError:
            return False
        return status == 200

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.request("GET", path, **kw)

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.request(method, self.base + path, **kw) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def status(self) -> dict[str, Any]:
        code, body = await self.get("/v1/status")
        assert code == 200, body
        assert isinstance(body, dict)
        return body

    async def wait_status(self, *wanted: str, timeout: float = 60.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            s = self.daemon.lifecycle.status.value
            if s in wanted:
                return {"status": s}
            return None

        await eventually(check, timeout=timeout, what=f"status in {wanted}")
        return {"status": self.daemon.lifecycle.status.value}

    async def wait_exit(self, timeout: float = 60.0) -> int:
        """The exit code; ``timeout`` (real seconds) only keeps a broken test from hanging."""
        assert self.task is not None
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)

    # -- a daemon on a manual clock

    @property
    def clock(self) -> ManualClock:
        clock = self.daemon.clock
        assert isinstance(clock, ManualClock), "this daemon runs on real time"
        return clock

    async def step_until(
        self, cond: Callable[[], Any], *, within: float, timeout: float = 60.0, what: str = ""
    ) -> Any:
        """Let daemon time pass until ``cond`` holds: between polls, the clock jumps to the
        next deadline if it is due within ``within`` seconds.

        Time thus passes only for timers that are short enough (a probe, a backoff, a
        kill), while work done in real time (a checkpoint, an HTTP request) sees the
        clock stand still, however long it takes.
        """
        clock = self.clock

        async def tick() -> None:
            due = clock.next_deadline()
            if due is not None and due <= within:
                await clock.advance(max(0.0, due))

        return await eventually(cond, timeout=timeout, what=what, tick=tick)

    def said(self, text: str) -> bool:
        """Whether the IDE's recent output holds ``text``."""
        return any(text in line.text for line in self.daemon.output.tail(200))

    async def wait_running(self, probe_interval: float = 0.5) -> None:
        """Wait (in real time) until the IDE listens, then step the probe until it is seen."""
        done = self.task is not None and self.task.done
        await eventually(lambda: self.said("listening on") or done(), what="the IDE listening")
        await self.step_until(
            lambda: self.daemon.lifecycle.status.value != "starting",
            within=probe_interval,
            what="the IDE seen ready",
        )
        assert self.daemon.lifecycle.status.value == "running", self.daemon.lifecycle.reason

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.daemon.request_stop("test teardown")
            with contextlib.suppress(Exception):
                if isinstance(self.daemon.clock, ManualClock):
                    task = self.task
                    await self.step_until(task.done, within=3600.0)
                await asyncio.wait_for(self.task, 60)
        if self.http is not None:
            await self.http.close()
