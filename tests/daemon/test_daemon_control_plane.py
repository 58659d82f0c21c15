"""Heartbeats and status events, against a fake control plane on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from daemon_helpers import FakeControlPlane, Harness, eventually, fake_ide, free_port

from agent.backoff import Backoff
from agent.daemon.clock import ManualClock
from agent.daemon.control_plane import ControlPlane
from agent.daemon.metrics import Metrics
from agent.settings import Settings

HarnessFactory = Callable[..., Awaitable[Harness]]

_ORDER = ["starting", "running", "stopping", "stopped"]


async def test_heartbeats_and_events_carry_the_session_in_order(
    make_settings: Callable[..., Settings],
    control_plane: FakeControlPlane,
    harness: HarnessFactory,
) -> None:
    control_plane.reply_interval = 0.2  # the control plane asks for a faster beat
    settings = make_settings(
        control_plane_url=control_plane.url + "/",
        control_plane_token="cp-secret",
        heartbeat_interval=3600.0,
    )
    h = await harness(settings, fake_ide())
    await h.wait_status("running")
    await eventually(
        lambda: sum(b["status"] == "running" for b in control_plane.heartbeats()) >= 3,
        what="three heartbeats while running",
    )
    assert h.daemon.control_plane is not None and h.daemon.control_plane.interval == 0.2
    h.daemon.request_stop("user stopped the studio")
    assert await h.wait_exit() == 0

    assert control_plane.statuses() == _ORDER
    assert {r.studio for r in control_plane.received} == {"s1"}
    assert {r.auth for r in control_plane.received} == {"Bearer cp-secret"}

    events = control_plane.events()
    for e in events:
        assert e["studio"] == "s1" and e["reason"] and e["time"].endswith("Z")
    by_status = {e["status"]: e for e in events}
    assert by_status["running"]["previous"] == "starting"
    assert "answers" in by_status["running"]["reason"]
    assert by_status["stopping"]["reason"] == "user stopped the studio"
    assert by_status["stopped"]["session"]["checkpoint"]["state"] == "finalized"

    beats = control_plane.heartbeats()
    ranks = [_ORDER.index(b["status"]) for b in beats]
    assert ranks == sorted(ranks)  # a heartbeat never reports an older status
    beat = next(b for b in beats if b["status"] == "running")
    assert beat["studio"] == "s1"
    assert beat["session"]["id"] and beat["session"]["checkpoint"]["name"].startswith("s1_")
    assert beat["ide"]["state"] == "ready" and beat["ide"]["pid"] > 0
    res = beat["resources"]
    for key in ("cpu_percent", "memory_used", "memory_limit", "root_used", "root_free"):
        assert key in res
    assert res["root_free"] > 0 and res["ide_rss"] > 0


async def test_a_control_plane_that_is_down_then_back_gets_only_the_latest_state(
    make_settings: Callable[..., Settings], harness: HarnessFactory
) -> None:
    cp = FakeControlPlane()  # not listening yet
    h = await harness(make_settings(control_plane_url=cp.url, heartbeat_interval=0.5), fake_ide())
    await h.wait_status("running")  # the IDE does not care
    await eventually(
        lambda: (
            (h.daemon.metrics.registry.get_sample_value("studio_heartbeat_failures_total") or 0)
            + (h.daemon.metrics.registry.get_sample_value("studio_event_failures_total") or 0)
            >= 1
        ),
        what="failed sends counted",
    )
    st = await h.status()
    assert st["control_plane"]["reachable"] is False and st["control_plane"]["last_error"]

    await cp.start()
    try:
        await eventually(lambda: cp.heartbeats(), timeout=60, what="heartbeats resume")
        # "starting" was superseded while the control plane was away: only "running" arrives
        assert cp.statuses() == ["running"]
        assert (await h.status())["control_plane"]["reachable"] is True
        h.daemon.request_stop("test")
        assert await h.wait_exit() == 0
        assert cp.statuses() == ["running", "stopping", "stopped"]
    finally:
        await cp.stop()


async def test_heartbeats_follow_the_clock_and_the_servers_interval(
    control_plane: FakeControlPlane,
) -> None:
    clock = ManualClock()
    n = 0

    async def snapshot() -> dict[str, Any]:
        nonlocal n
        n += 1
        return {"status": "running", "n": n}

    client = ControlPlane(
        control_plane.url,
        "",
        "s9",
        clock=clock,
        interval=30.0,
        snapshot=snapshot,
        metrics=Metrics(),
        backoff=Backoff(1.0, 8.0),
    )
    task = asyncio.create_task(client.run())
    try:
        await eventually(lambda: len(control_plane.heartbeats()) == 1)  # at once
        await clock.wait_for_sleepers()
        await clock.advance(29.0)
        assert clock.next_deadline() == 1.0  # nothing woke: the next beat is due in 1 s
        assert len(control_plane.heartbeats()) == 1
        control_plane.reply_interval = 5.0
        await clock.advance(1.0)
        await eventually(lambda: len(control_plane.heartbeats()) == 2)
        await eventually(lambda: client.interval == 5.0)
        await clock.wait_for_sleepers()
        await clock.advance(5.0)
        await eventually(lambda: len(control_plane.heartbeats()) == 3)
        assert [b["n"] for b in control_plane.heartbeats()] == [1, 2, 3]
        assert control_plane.received[0].auth == ""  # no token configured, none sent

        # an event goes out at once, without waiting for the next beat
        client.event("status", {"status": "stopping", "reason": "r"})
        await eventually(lambda: control_plane.events())
        assert control_plane.events()[0] == {"type": "status", "status": "stopping", "reason": "r"}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_while_down_only_one_document_per_kind_waits() -> None:
    clock = ManualClock()
    port = free_port()

    async def snapshot() -> dict[str, Any]:
        return {}

    client = ControlPlane(
        f"http://127.0.0.1:{port}",
        "t",
        "s1",
        clock=clock,
        interval=30.0,
        snapshot=snapshot,
        metrics=Metrics(),
    )
    for i in range(1000):
        client.event("status", {"status": "running", "i": i})
        client.event("checkpoint_failed", {"i": i})
    assert len(client._pending) == 2
    assert client._pending["status"]["i"] == 999
    assert not await client.flush(0.0)


async def test_a_control_plane_that_never_answers_gets_a_small_share_of_the_grace(
    make_settings: Callable[..., Settings], harness: HarnessFactory
) -> None:
    # it accepts connections and reads requests, and never says a word
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = make_settings(control_plane_url=f"http://127.0.0.1:{port}", stop_grace=20.0)
        h = await harness(settings, fake_ide(), clock=ManualClock())
        await h.wait_running()
        await eventually(lambda: held, what="the control plane's connection")
        t0 = h.clock.monotonic()
        h.daemon.request_stop("test")
        task = h.task
        assert task is not None
        # time moves only for timers due within 2 s: the last events' share, not the grace
        await h.step_until(task.done, within=2.0, what="the exit")
        assert await h.wait_exit() == 0
        assert h.clock.monotonic() - t0 <= 2.0
        assert h.daemon.lifecycle.status.value == "stopped"
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
