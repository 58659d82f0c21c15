"""The parent state: the root as the last checkpoint (or baseline) saw it.

Stored as zstd-compressed ``marshal`` of the scan's path -> record dict: loads
a million entries in well under a second and is only ever read by the agent
that wrote it (it lives in the state dir, never in a checkpoint).  The format
is versioned so a compact columnar format can replace it later.
"""

from __future__ import annotations

import marshal
import os
from pathlib import Path

import zstandard

from agent.checkpoint.scan import Stat
from agent.errors import AgentError

_MAGIC = b"STUDIO-STATE-1\n"


def save_state(path: Path, entries: dict[str, Stat]) -> None:
    """Write atomically: a crash leaves the old state or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _MAGIC + zstandard.ZstdCompressor(level=1).compress(marshal.dumps(entries))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Stat]:
    data = path.read_bytes()
    if not data.startswith(_MAGIC):
        raise AgentError(f"parent state {path} has an unknown format; run baseline again")
    try:
        entries = marshal.loads(zstandard.ZstdDecompressor().decompress(data[len(_MAGIC) :]))
    except (zstandard.ZstdError, ValueError, EOFError, TypeError) as e:
        raise AgentError(f"parent state {path} is corrupt ({e}); run baseline again") from e
    if not isinstance(entries, dict):
        raise AgentError(f"parent state {path} is corrupt; run baseline again")
    return entries
