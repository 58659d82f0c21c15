"""A real S3 endpoint for the tests: moto in server mode on 127.0.0.1.

moto checks ``If-Match`` / ``If-None-Match`` on PutObject, CompleteMultipartUpload
and DeleteObject, but its check and its write are two steps in a threaded
server, so two simultaneous conditional writes can both pass the check.  S3
makes them atomic, and the concurrent-writer tests rely on that, so conditional
writes are serialized here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server


@dataclass(frozen=True)
class S3Endpoint:
    """The endpoint a test session uses, and one bucket on it for all tests."""

    url: str
    bucket: str
    external: bool
    admin: Any  # a boto3 S3 client straight to the endpoint, for setup and inspection


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class AtomicConditionalWrites:
    """WSGI middleware: one conditional write at a time, as S3 guarantees."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        conditional = "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ
        if environ.get("REQUEST_METHOD") in ("PUT", "POST", "DELETE") and conditional:
            with self.lock:
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)


class LocalS3Server(ThreadedMotoServer):
    """moto's threaded server on 127.0.0.1, on a free port, with atomic conditional writes."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

    def _server_entry(self) -> None:
        app = AtomicConditionalWrites(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            self._ip_address, self._port, app, threaded=True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint_url(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def stop(self) -> None:
        super().stop()
        if self._server is not None:
            self._server.server_close()
