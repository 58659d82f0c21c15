"""The local API's bearer token: the configured one, or one made for local tools.

The API never runs open: without a configured token one is made and saved in
the state directory, readable by root only, where local tools find it.  The
file is replaced atomically by a new one of mode 0600 (written under a fresh
name with ``O_EXCL | O_NOFOLLOW``, then renamed over), so neither a symlink
nor a pre-existing file planted at its name (a restored layer, the IDE's
user) decides where the token goes or who can read it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from agent.log import get_logger
from agent.settings import Settings
from agent.statedir import ensure_private_dir

log = get_logger("daemon")

FILE_NAME = "api-token"

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def api_token(settings: Settings) -> str:
    token = settings.token()
    if token:
        return token
    token = secrets.token_urlsafe(32)
    path = settings.state_path / FILE_NAME
    try:
        ensure_private_dir(settings.state_path, settings.root)
        write_private(path, token + "\n")
        log.info("api.token_generated", path=str(path))
    except OSError as e:
        log.warning("api.token_not_saved", path=str(path), error=str(e))
    return token


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file of mode 0600 holding ``text``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, _NEW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
