"""Fixtures for the daemon's tests: a small root, settings, a fake control plane, a harness.

Every server binds 127.0.0.1 on a free port and is stopped by its fixture;
waits are bounded polls on a condition, never fixed sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import TOKEN, FakeControlPlane, Harness, free_port, make_tree

from agent.daemon.main import Daemon
from agent.settings import Settings, load_settings
from agent.store import Store


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    make_tree(r)
    return r


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    return w


@pytest.fixture
def make_settings(root: Path, workdir: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "root": root,
            "workdir": str(workdir),
            "studio": "s1",
            "api_port": free_port(),
            "api_token": TOKEN,
            "tool_port": free_port(),
            "tool_path_prefix": "/",
            "checkpoint_interval": 3600.0,
            "stop_grace": 20.0,
            "ide_stop_timeout": 3.0,
            "ready_timeout": 20.0,
            "ide_max_restarts": 3,
            "ide_restart_window": 60.0,
            "heartbeat_interval": 3600.0,
            "compression_threads": 1,
            "log_level": "debug",
        }
        base.update(overrides)
        return load_settings(**base)

    return make


@pytest.fixture
async def control_plane() -> AsyncIterator[FakeControlPlane]:
    cp = FakeControlPlane()
    await cp.start()
    try:
        yield cp
    finally:
        await cp.stop()


@pytest.fixture
async def harness() -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    made: list[Harness] = []

    async def make(
        settings: Settings, argv: list[str], *, store: Store | None = None, **kw: Any
    ) -> Harness:
        h = Harness(Daemon(settings, argv, store=store, handle_signals=False, **kw))
        made.append(h)
        await h.start()
        return h

    try:
        yield make
    finally:
        for h in made:
            await h.close()
