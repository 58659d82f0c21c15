"""A fault-injecting HTTP/1.1 proxy between an S3 client and a real S3 endpoint.

The client talks to the proxy as if it were the endpoint (``endpoint_url``);
bytes are forwarded untouched, so signatures still verify upstream.  Faults
are what real networks and real S3 do: a connection dropped in the middle of
an upload, a response lost after the server acted on the request, 500 and 503
SlowDown answers, a 403, a server that stops answering, a download cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, urlsplit

Action = Literal[
    "reset",  # drop the connection after half the request body, before the server sees it
    "lose_response",  # forward the request, then drop the connection instead of answering
    "status",  # answer with an S3 error (status and code) instead of forwarding
    "stall",  # read the request and never answer
    "truncate",  # forward, then send only half the response body and drop the connection
]

_REASONS = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Slow Down"}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    @property
    def operation(self) -> str:
        """The S3 operation, as far as the faults here need to tell them apart."""
        q = self.query
        if self.method == "POST" and "uploads" in q:
            return "CreateMultipartUpload"
        if self.method == "POST" and "uploadId" in q:
            return "CompleteMultipartUpload"
        if self.method == "PUT" and "partNumber" in q:
            return "UploadPart"
        if self.method == "PUT" and "x-amz-copy-source" in self.headers:
            return "CopyObject"
        if self.method == "DELETE" and "uploadId" in q:
            return "AbortMultipartUpload"
        if self.method == "GET" and "list-type" in q:
            return "ListObjectsV2"
        return {
            "PUT": "PutObject",
            "GET": "GetObject",
            "HEAD": "HeadObject",
            "DELETE": "DeleteObject",
        }.get(self.method, self.method)


@dataclass
class Fault:
    """Inject ``action`` into requests for ``operation`` whose path contains ``path``.

    The first ``skip`` matching requests pass; the next ``times`` fail (every
    later one when ``times`` is None).
    """

    action: Action
    operation: str | None = None
    path: str = ""
    times: int | None = 1
    skip: int = 0
    status: int = 503
    code: str = "SlowDown"
    fired: int = 0

    def take(self, req: Request) -> bool:
        if self.operation is not None and req.operation != self.operation:
            return False
        if self.path not in req.path:
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


@dataclass(frozen=True, slots=True)
class Seen:
    operation: str
    path: str
    fault: Action | None
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names


@dataclass
class FaultProxy:
    upstream_host: str
    upstream_port: int
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    # Random faults: each request fails with this probability (chosen by ``rng``).
    chaos_rate: float = 0.0
    chaos_actions: tuple[Action, ...] = ("reset", "lose_response", "status", "truncate")
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _server: asyncio.Server | None = None
    _port: int = 0
    _conns: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def to(cls, endpoint_url: str) -> FaultProxy:
        u = urlsplit(endpoint_url)
        if u.scheme != "http" or u.hostname is None:
            raise ValueError(f"the fault proxy forwards plain HTTP only, not {endpoint_url}")
        return cls(u.hostname, u.port or 80)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()
        self.chaos_rate = 0.0

    def count(self, operation: str, fault: Action | Literal["any"] | None = "any") -> int:
        return sum(
            1
            for s in self.seen
            if s.operation == operation and (fault == "any" or s.fault == fault)
        )

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- connections ------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                req = _parse_request(head)
                fault = self._pick(req)
                action = fault.action if fault else None
                self.seen.append(Seen(req.operation, req.path, action, req.headers))
                if req.headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if fault is not None and fault.action == "reset":
                    await _read_body(reader, req.headers, limit=_body_length(req.headers) // 2)
                    _reset(writer)
                    return
                body = await _read_body(reader, req.headers)
                if fault is not None and fault.action == "status":
                    writer.write(_error_response(fault.status, fault.code, req.method))
                    await writer.drain()
                    continue
                if fault is not None and fault.action == "stall":
                    # Hold the connection until the client gives up on it.
                    with contextlib.suppress(ConnectionError):
                        while await reader.read(1 << 16):
                            pass
                    return
                if upstream is None:
                    upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
                ureader, uwriter = upstream
                uwriter.write(head + body)
                await uwriter.drain()
                resp_head = await _read_head(ureader)
                while resp_head is not None and _status_of(resp_head) // 100 == 1:
                    resp_head = await _read_head(ureader)  # interim 100 Continue: ours was sent
                if resp_head is None:
                    _reset(writer)
                    return
                resp_headers = _headers_of(resp_head)
                status = _status_of(resp_head)
                resp_body = (
                    b""
                    if req.method == "HEAD" or status in (204, 304)
                    else await _read_body(ureader, resp_headers, until_eof=True)
                )
                if fault is not None and fault.action == "lose_response":
                    _reset(writer)
                    return
                if fault is not None and fault.action == "truncate" and len(resp_body) > 1:
                    writer.write(resp_head + resp_body[: len(resp_body) // 2])
                    await writer.drain()
                    _reset(writer)
                    return
                writer.write(resp_head + resp_body)
                await writer.drain()
                if "close" in (
                    resp_headers.get("connection", "").lower(),
                    req.headers.get("connection", "").lower(),
                ):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if upstream is not None:
                upstream[1].close()
            writer.close()
            self._conns.discard(task)

    def _pick(self, req: Request) -> Fault | None:
        for fault in self.faults:
            if fault.take(req):
                return fault
        if self.chaos_rate and self.rng.random() < self.chaos_rate:
            action = self.rng.choice(self.chaos_actions)
            if action == "status":
                status, code = self.rng.choice(((500, "InternalError"), (503, "SlowDown")))
                return Fault("status", status=status, code=code)
            return Fault(action)
        return None


# -- HTTP/1.1 framing -------------------------------------------------------------


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None


def _headers_of(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    out: dict[str, str] = {}
    for line in lines:
        if ":" in line:
            k, _, v = line.partition(":")
            out[k.strip().lower()] = v.strip()
    return out


def _status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def _parse_request(head: bytes) -> Request:
    method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    u = urlsplit(target)
    return Request(method, u.path, parse_qs(u.query, keep_blank_values=True), _headers_of(head))


def _body_length(headers: dict[str, str]) -> int:
    return int(headers.get("content-length", "0") or 0)


async def _read_body(
    reader: asyncio.StreamReader,
    headers: dict[str, str],
    *,
    limit: int | None = None,
    until_eof: bool = False,
) -> bytes:
    """The raw body, framing included; ``limit`` stops early (for a reset mid-upload)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    out += line  # trailers
                out += b"\r\n"
                return bytes(out)
            out += await reader.readexactly(size + 2)
            if limit is not None and len(out) >= limit:
                return bytes(out)
    if "content-length" in headers:
        n = _body_length(headers)
        return await reader.readexactly(n if limit is None else min(n, limit))
    return await reader.read() if until_eof else b""


def _error_response(status: int, code: str, method: str) -> bytes:
    body = (
        b""
        if method == "HEAD"
        else (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>injected by the fault proxy</Message>"
            "<RequestId>fault</RequestId></Error>"
        ).encode()
    )
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a TCP RST, as a dying load balancer does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
