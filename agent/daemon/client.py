"""The local API as a one-shot command uses it, when a daemon owns the state dir.

A ``checkpoint`` or ``rename`` beside a running daemon must not touch the
session's files itself (owner.py); the daemon does it on request.  Where the
API listens comes from the daemon's lock file, the token from the settings or
the file the daemon writes when none is configured.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from agent.daemon.api_token import FILE_NAME
from agent.errors import AgentError
from agent.session.owner import Holder
from agent.settings import Settings

TIMEOUT = 3600.0  # a checkpoint of a big root takes a while; the daemon bounds its own work


class DaemonApi:
    """Requests to the daemon that holds the state dir."""

    def __init__(self, holder: Holder, settings: Settings) -> None:
        self.holder = holder
        self._settings = settings

    def _token(self) -> str:
        token = self._settings.token()
        if token:
            return token
        try:
            return (self._settings.state_path / FILE_NAME).read_text().strip()
        except OSError:
            return ""

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The JSON answer of a 2xx; else ``AgentError`` with the daemon's own message."""
        who = self.holder.describe()
        if not self.holder.api:
            raise AgentError(f"{who} owns the state dir but its API is not up yet; try again")
        url = self.holder.api + path
        headers = {"Authorization": f"Bearer {self._token()}"}
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.request(method, url, json=body, headers=headers) as resp,
            ):
                doc: Any = None
                if resp.content_type == "application/json":
                    doc = await resp.json()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise AgentError(f"cannot reach the API of {who} at {url}: {e}") from e
        if status == 401:
            raise AgentError(
                f"the API of {who} refused the token: set the daemon's api_token "
                "(STUDIO_API_TOKEN) for this command too"
            )
        if not 200 <= status < 300:
            message = doc.get("error") if isinstance(doc, dict) else None
            raise AgentError(f"{who}: {message or f'HTTP {status}'}")
        return doc


def api_url(host: str, port: int) -> str:
    """How a local client reaches an API bound to ``host`` (any address: loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
