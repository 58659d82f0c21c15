"""The daemon's own tokens, gone from its environment once read.

The platform hands the tokens over as environment variables, and a process's
environment stays readable in ``/proc/<pid>/environ`` (the block the kernel
copied at exec, which ``unsetenv`` never touches) for as long as it runs.  Once
the settings are read, the tokens are removed from ``os.environ`` (so no child
inherits them; the IDE's environment is built without them as well) and their
values are overwritten in that block.  What the IDE sees is described in
docs/architecture.md ("What the IDE can see").
"""

from __future__ import annotations

import ctypes
import os

from agent.log import get_logger

log = get_logger("daemon")

TOKEN_VARS = ("STUDIO_API_TOKEN", "STUDIO_CONTROL_PLANE_TOKEN")


def forget_tokens() -> None:
    """Remove the tokens from this process's environment, and wipe their values
    from the environment block ``/proc/self/environ`` shows."""
    present = [name for name in TOKEN_VARS if name in os.environ]
    for name in present:
        del os.environ[name]
    if present:
        try:
            _wipe_initial(present)
        except (OSError, ValueError, IndexError) as e:  # no /proc: nothing shows it either
            log.warning("daemon.environ_not_wiped", error=str(e))


def _wipe_initial(names: list[str]) -> None:
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields from the 3rd on
    start, end = int(fields[47]), int(fields[48])  # env_start, env_end (proc(5))
    if not 0 < start < end:
        return
    block = ctypes.string_at(start, end - start)
    prefixes = tuple(name.encode() + b"=" for name in names)
    offset = 0
    for entry in block.split(b"\0"):
        if entry.startswith(prefixes):
            keep = entry.index(b"=") + 1
            ctypes.memset(start + offset + keep, 0, len(entry) - keep)
        offset += len(entry) + 1
