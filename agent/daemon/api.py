"""The local HTTP API: status, checkpoints, stop, IDE logs, metrics, its own OpenAPI.

Every route but /healthz wants ``Authorization: Bearer <token>``.  Errors are
JSON ``{"error", "status"}`` with a 4xx for anything the caller can fix (or
503 when the store is down); a 500 only ever means a bug in the agent.
Answers are the models of ``models.py``; request checks use the constants
the OpenAPI document is built from.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel

from agent import __version__
from agent.checkpoint.names import normalize_name
from agent.daemon import models, openapi
from agent.daemon.lifecycle import Status
from agent.daemon.metrics import CONTENT_TYPE, Metrics
from agent.daemon.supervisor import RingBuffer
from agent.errors import (
    AgentError,
    ConfigError,
    InvalidName,
    NoParentState,
    NotFound,
    RefConflict,
)
from agent.log import get_logger

log = get_logger("daemon.api")

_MAX_BODY = 64 << 10  # a request body is {"name": ...}: anything larger is refused (413)
_PUBLIC = frozenset({"/healthz"})


class Busy(AgentError):
    """The request is not possible in the session's current status."""


class Backend(Protocol):
    """What the API needs from the daemon."""

    metrics: Metrics
    output: RingBuffer

    @property
    def status_value(self) -> str: ...

    async def status(self) -> models.Status: ...

    async def checkpoint_now(self, name: str | None) -> models.CheckpointResult: ...

    async def list_checkpoints(self) -> list[models.CheckpointInfo]: ...

    async def rename_checkpoint(self, old: str, new: str) -> models.CheckpointInfo: ...

    async def delete_checkpoint(self, name: str) -> None: ...

    def request_stop(self, reason: str) -> None: ...


class BadRequest(AgentError):
    """The request is malformed."""


def _json(doc: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(doc.model_dump(mode="json"), status=status, headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json(models.Error(error=message, status=status), status, headers)


def _status_for(e: AgentError) -> int:
    if isinstance(e, BadRequest | InvalidName | ConfigError):
        return 400
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, RefConflict | Busy | NoParentState):
        return 409
    return 503


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return _error(e.status, e.reason, headers)
    except AgentError as e:
        status = _status_for(e)
        log.info(
            "api.refused", method=request.method, path=request.path, status=status, error=str(e)
        )
        return _error(status, str(e))
    except Exception:
        log.exception("api.bug", method=request.method, path=request.path)
        return _error(500, "internal error in the agent (see its log)")


def _strict_query(doc: dict[str, Any]) -> Middleware:
    """Refuse query parameters the document does not name: a typo should not pass silently."""
    allowed: dict[tuple[str, str], frozenset[str]] = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
            allowed[(method.upper(), path)] = frozenset(names)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        key = (request.method, route.resource.canonical if route.resource else "")
        unknown = set(request.query) - allowed.get(key, frozenset())
        if unknown:
            names = ", ".join(sorted(repr(n) for n in unknown))
            raise BadRequest(f"unknown query parameter(s): {names}")
        return await handler(request)

    return middleware


def _auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:  # 404/405 before auth
            raise request.match_info.http_exception
        if request.path not in _PUBLIC:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not token or not hmac.compare_digest(given, expected):
                return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return middleware


async def _json_body(request: web.Request, required: bool) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        if required:
            raise BadRequest("a JSON body is required")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    except RecursionError:  # bounded by _MAX_BODY, yet deep enough to exhaust the parser
        raise BadRequest("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _name_field(body: dict[str, Any], required: bool) -> str | None:
    extra = set(body) - {"name"}
    if extra:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(extra))}")
    if "name" not in body:
        if required:
            raise BadRequest("field 'name' is required")
        return None
    name = body["name"]
    if not isinstance(name, str):
        raise BadRequest("field 'name' must be a string")
    return normalize_name(name)  # the rule the schema's pattern states; InvalidName is a 400


def build_app(backend: Backend, token: str) -> web.Application:
    doc = openapi.document(__version__)
    app = web.Application(
        middlewares=[_errors, _auth(token), _strict_query(doc)], client_max_size=_MAX_BODY
    )

    async def healthz(request: web.Request) -> web.Response:
        return _json(models.Health(ok=True, status=Status(backend.status_value)))

    async def status(request: web.Request) -> web.Response:
        return _json(await backend.status())

    async def list_checkpoints(request: web.Request) -> web.Response:
        return _json(models.CheckpointList(checkpoints=await backend.list_checkpoints()))

    async def create_checkpoint(request: web.Request) -> web.Response:
        name = _name_field(await _json_body(request, required=False), required=False)
        return _json(await backend.checkpoint_now(name), 201)

    async def rename_checkpoint(request: web.Request) -> web.Response:
        old = request.match_info["name"]
        new = _name_field(await _json_body(request, required=True), required=True)
        assert new is not None
        try:
            info = await backend.rename_checkpoint(old, new)
        except InvalidName as e:  # the new name passed, so the old one cannot exist
            raise NotFound(f"no checkpoint named {old!r}: {e}") from None
        return _json(info)

    async def delete_checkpoint(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            await backend.delete_checkpoint(name)
        except InvalidName as e:  # no checkpoint can have that name
            raise NotFound(f"no checkpoint named {name!r}: {e}") from None
        return web.Response(status=204)

    async def stop(request: web.Request) -> web.Response:
        backend.request_stop("stop requested through the API")
        return _json(models.Stopping(status=Status(backend.status_value)), 202)

    async def logs(request: web.Request) -> web.StreamResponse:
        n = _int_param(request, "lines", openapi.DEFAULT_LOG_LINES, 1, openapi.MAX_LOG_LINES)
        follow = request.query.get("follow", "0")
        if follow not in openapi.FOLLOW_VALUES:
            raise BadRequest(f"follow must be one of {', '.join(openapi.FOLLOW_VALUES)}")
        lines = backend.output.tail(n)
        if follow in ("0", "false"):
            text = "".join(line.text + "\n" for line in lines)
            return web.Response(text=text, content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        seq = lines[-1].seq if lines else backend.output.last_seq
        await resp.write("".join(line.text + "\n" for line in lines).encode())
        while await backend.output.wait_after(seq):
            new = backend.output.after(seq)
            if new:
                seq = new[-1].seq
                await resp.write("".join(line.text + "\n" for line in new).encode())
        await resp.write_eof()
        return resp

    async def metrics(request: web.Request) -> web.Response:
        resp = web.Response(body=backend.metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp

    async def openapi_json(request: web.Request) -> web.Response:
        return web.json_response(doc)

    r = app.router
    r.add_get("/healthz", healthz, allow_head=False)
    r.add_get("/v1/status", status, allow_head=False)
    r.add_get("/v1/checkpoints", list_checkpoints, allow_head=False)
    r.add_post("/v1/checkpoints", create_checkpoint)
    r.add_patch("/v1/checkpoints/{name}", rename_checkpoint)
    r.add_delete("/v1/checkpoints/{name}", delete_checkpoint)
    r.add_post("/v1/stop", stop)
    r.add_get("/v1/logs", logs, allow_head=False)
    r.add_get("/metrics", metrics, allow_head=False)
    r.add_get("/v1/openapi.json", openapi_json, allow_head=False)
    return app


def _int_param(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text) or not lo <= int(text) <= hi:
        raise BadRequest(f"{key} must be an integer from {lo} to {hi}")
    return int(text)


class ApiServer:
    """The app on a TCP port; ``port`` is the bound one (useful with port 0)."""

    def __init__(self, backend: Backend, token: str, host: str, port: int) -> None:
        self.app = build_app(backend, token)
        self._host = host
        self._port = port
        self._runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        self.port = port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise ConfigError(
                f"cannot serve the local API on {self._host}:{self._port}: {e.strerror or e}"
            ) from e
        for addr in self._runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                self.port = int(addr[1])
                break
        log.info("api.listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()
