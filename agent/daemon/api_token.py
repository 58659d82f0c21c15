"""The local API's bearer token: the configured one, or one made for local tools.

The API never runs open: without a configured token one is made and saved in
the state directory, readable by root only, where local tools find it.
"""

from __future__ import annotations

import os
import secrets

from agent.log import get_logger
from agent.settings import Settings

log = get_logger("daemon")

FILE_NAME = "api-token"


def api_token(settings: Settings) -> str:
    token = settings.token()
    if token:
        return token
    token = secrets.token_urlsafe(32)
    path = settings.state_path / FILE_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log.info("api.token_generated", path=str(path))
    except OSError as e:
        log.warning("api.token_not_saved", path=str(path), error=str(e))
    return token
