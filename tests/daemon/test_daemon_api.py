"""The local API: auth, contract, checkpoints, logs, metrics, and 4xx (never 500) on bad input."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from daemon_helpers import TOKEN, Harness, eventually, fake_ide
from openapi_spec_validator import validate

from agent.daemon import openapi
from agent.daemon.api import build_app
from agent.daemon.clock import ManualClock
from agent.daemon.main import START_WAIT
from agent.settings import Settings

HarnessFactory = Callable[..., Awaitable[Harness]]


def _documented() -> set[tuple[str, str]]:
    doc = openapi.document()
    return {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}


def test_the_openapi_document_is_valid_and_covers_exactly_the_served_routes() -> None:
    doc = openapi.document()
    validate(doc)
    app = build_app(None, "t")  # type: ignore[arg-type]  # routes only; no request is served
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    assert served == _documented()


@pytest.fixture
async def running(make_settings: Callable[..., Settings], harness: HarnessFactory) -> Harness:
    h = await harness(make_settings(), fake_ide())
    await h.wait_status("running")
    return h


async def test_every_route_but_healthz_wants_the_bearer_token(running: Harness) -> None:
    async with aiohttp.ClientSession() as anon:
        for method, path in sorted(_documented()):
            url = running.base + path.replace("{name}", "x")
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                async with anon.request(method, url, headers=headers, json={"name": "y"}) as r:
                    if path == "/healthz":
                        assert r.status == 200
                        assert (await r.json())["status"] == "running"
                        continue
                    assert r.status == 401, (method, path, headers)
                    body = await r.json()
                    assert body == {"error": "missing or wrong bearer token", "status": 401}
    assert running.daemon.lifecycle.status.value == "running"  # the stop was refused too


async def test_checkpoints_create_list_and_rename(running: Harness, root: Path) -> None:
    h = running
    own = (await h.status())["session"]["checkpoint"]["name"]
    (root / "home" / "user" / "data.csv").write_text("a,b\n1,2\n")

    code, res = await h.request("POST", "/v1/checkpoints", json={"name": "before upgrade"})
    assert code == 201, res
    assert res["checkpoint"]["name"] == "before_upgrade"  # spaces become underscores
    assert res["checkpoint"]["state"] == "finalized"
    assert res["changed"] >= 1 and res["layer_size"] > 0

    code, listing = await h.get("/v1/checkpoints")
    assert code == 200
    assert {c["name"] for c in listing["checkpoints"]} == {own, "before_upgrade"}

    code, info = await h.request(
        "PATCH", "/v1/checkpoints/before_upgrade", json={"name": "pre-upgrade"}
    )
    assert (code, info["name"]) == (200, "pre-upgrade")
    code, err = await h.request("PATCH", "/v1/checkpoints/before_upgrade", json={"name": "z"})
    assert code == 404 and "before_upgrade" in err["error"]
    code, err = await h.request("PATCH", "/v1/checkpoints/pre-upgrade", json={"name": own})
    assert code == 409 and "already exists" in err["error"]

    # the session's own checkpoint can be renamed, and later checkpoints follow the new name
    code, info = await h.request("PATCH", f"/v1/checkpoints/{own}", json={"name": "my work"})
    assert (code, info["name"]) == (200, "my_work")
    (root / "home" / "user" / "more.txt").write_text("more\n")
    code, res = await h.request("POST", "/v1/checkpoints")
    assert code == 201
    assert (res["checkpoint"]["name"], res["checkpoint"]["state"]) == ("my_work", "interim")
    assert (await h.status())["session"]["checkpoint"]["name"] == "my_work"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("POST", "/v1/checkpoints", {"data": b"{not json"}, 400),
        ("POST", "/v1/checkpoints", {"json": ["name"]}, 400),
        ("POST", "/v1/checkpoints", {"json": {"name": 7}}, 400),
        ("POST", "/v1/checkpoints", {"json": {"name": "../etc"}}, 400),
        ("POST", "/v1/checkpoints", {"json": {"name": ".hidden"}}, 400),
        ("POST", "/v1/checkpoints", {"json": {"name": "x" * 129}}, 400),
        ("POST", "/v1/checkpoints", {"json": {"name": "a", "state": "finalized"}}, 400),
        ("POST", "/v1/checkpoints", {"data": b"\xff\xfe"}, 400),
        ("POST", "/v1/checkpoints", {"data": b"x" * (128 << 10)}, 413),
        ("POST", "/v1/checkpoints", {"data": b"[" * 5000 + b"]" * 5000}, 400),
        ("PATCH", "/v1/checkpoints/x", {"data": b'{"a":' * 5000 + b"1" + b"}" * 5000}, 400),
        ("PATCH", "/v1/checkpoints/anything", {}, 400),
        ("PATCH", "/v1/checkpoints/anything", {"json": {}}, 400),
        ("PATCH", "/v1/checkpoints/..", {"json": {"name": "ok"}}, 404),
        ("PATCH", "/v1/checkpoints/nope", {"json": {"name": "ok"}}, 404),
        ("GET", "/v1/logs?lines=0", {}, 400),
        ("GET", "/v1/logs?lines=abc", {}, 400),
        ("GET", "/v1/logs?lines=10001", {}, 400),
        ("GET", "/v1/logs?follow=maybe", {}, 400),
        ("GET", "/v1/logs?line=5", {}, 400),
        ("GET", "/v1/status?verbose=1", {}, 400),
        ("POST", "/v1/checkpoints", {"data": b"\x0c"}, 400),
        ("POST", "/v1/checkpoints", {"data": b"  "}, 400),
        ("GET", "/v1/nothing-here", {}, 404),
        ("DELETE", "/v1/status", {}, 405),
    ],
)
async def test_bad_input_gets_a_4xx_with_a_json_error(
    running: Harness, method: str, path: str, kwargs: dict[str, object], status: int
) -> None:
    code, body = await running.request(method, path, **kwargs)
    assert code == status, body
    assert isinstance(body, dict) and body["status"] == status and body["error"]


async def test_405_names_the_allowed_methods(running: Harness) -> None:
    assert running.http is not None
    async with running.http.delete(running.base + "/v1/checkpoints") as r:
        assert r.status == 405
        assert set(r.headers["Allow"].split(",")) == {"GET", "POST"}


async def test_a_checkpoint_asked_for_while_starting_waits_for_running(
    make_settings: Callable[..., Settings], harness: HarnessFactory, tmp_path: Path
) -> None:
    # /healthz answers while the IDE is not ready yet: a script that checkpoints
    # as soon as the API is up must get its checkpoint, not a 409
    gate = tmp_path / "bad-gateway"
    gate.touch()
    h = await harness(
        make_settings(), fake_ide("--bad-gateway-file", str(gate)), clock=ManualClock()
    )
    assert (await h.get("/healthz"))[1]["status"] == "starting"
    asked = asyncio.create_task(h.request("POST", "/v1/checkpoints"))
    await eventually(lambda: h.said("listening on"), what="the IDE listening")
    # the request waits (in daemon time) while the IDE still answers 502
    await h.clock.advance(5.0)
    assert not asked.done()
    gate.unlink()
    await h.wait_running()
    code, body = await asked
    assert code == 201, body
    assert body["checkpoint"]["name"] == h.daemon.session.auto_name  # type: ignore[union-attr]


async def test_a_checkpoint_asked_for_while_starting_gives_up_with_503_and_the_status(
    make_settings: Callable[..., Settings], harness: HarnessFactory
) -> None:
    h = await harness(
        make_settings(ready_timeout=600.0),
        fake_ide("--mode", "never-ready"),
        clock=ManualClock(),
    )
    asked = asyncio.create_task(h.request("POST", "/v1/checkpoints"))
    await h.step_until(asked.done, within=START_WAIT, what="the wait given up")
    code, body = asked.result()
    assert code == 503
    assert "still starting after 60s" in body["error"], body
    assert h.daemon.lifecycle.status.value == "starting"


async def test_logs_tail_and_follow(
    running: Harness, make_settings: Callable[..., Settings]
) -> None:
    h = running
    code, text = await h.get("/v1/logs?lines=1")
    assert code == 200 and len(text.splitlines()) == 1
    code, text = await h.get("/v1/logs")
    assert text.startswith("fake-ide serve pid=")

    settings = h.daemon.settings
    assert h.http is not None
    async with h.http.get(h.base + "/v1/logs?follow=1&lines=1") as stream:
        assert stream.status == 200
        first = await stream.content.readline()
        assert first
        # make the IDE log a line: a request to it
        async with (
            aiohttp.ClientSession() as c,
            c.get(f"http://127.0.0.1:{settings.tool_port}/follow-marker") as r,
        ):
            assert r.status == 200

        async def marker() -> bool:
            line = await asyncio.wait_for(stream.content.readline(), 10)
            return b"follow-marker" in line

        await eventually(marker, what="the new line streamed")
        h.daemon.request_stop("test")  # the stream ends with the session
        rest = await asyncio.wait_for(stream.content.read(), 30)
        assert isinstance(rest, bytes)
    assert await h.wait_exit() == 0


async def test_metrics(running: Harness, root: Path) -> None:
    h = running
    (root / "etc" / "motd").write_text("hi\n")
    code, _ = await h.request("POST", "/v1/checkpoints")
    assert code == 201
    code, text = await h.get("/metrics")
    assert code == 200
    for line in (
        'studio_checkpoint_duration_seconds_count{kind="manual"} 1.0',
        'studio_checkpoint_layer_bytes_count{kind="manual"} 1.0',
        'studio_session_status{studio_session_status="running"} 1.0',
        "studio_ide_restarts_total 0.0",
        "studio_heartbeat_failures_total 0.0",
    ):
        assert line in text, line
    assert re.search(r"^studio_restore_duration_seconds \d", text, re.M)
    assert re.search(r"^studio_checkpoint_size_bytes [1-9]", text, re.M)


async def test_without_a_configured_token_one_is_generated_for_local_tools(
    make_settings: Callable[..., Settings], harness: HarnessFactory
) -> None:
    settings = make_settings(api_token="")
    h = await harness(settings, fake_ide())
    path = settings.state_path / "api-token"
    token = await eventually(lambda: path.exists() and path.read_text().strip())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with aiohttp.ClientSession() as c:
        async with c.get(h.base + "/v1/status", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
        async with c.get(h.base + "/v1/status") as r:
            assert r.status == 401
