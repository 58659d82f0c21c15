"""Checkpoint names: unique per studio, spaces become underscores."""

from __future__ import annotations

from agent.errors import InvalidName

MAX_NAME = 128


def normalize_name(name: str) -> str:
    """The stored form of a user-given name, or ``InvalidName`` saying why not."""
    name = name.strip().replace(" ", "_")
    if not name:
        raise InvalidName("checkpoint name is empty")
    if len(name) > MAX_NAME:
        raise InvalidName(f"checkpoint name is longer than {MAX_NAME} characters: {name[:40]}...")
    if "/" in name:
        raise InvalidName(f"checkpoint name may not contain '/': {name!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidName(f"checkpoint name may not contain control characters: {name!r}")
    if name in (".", "..") or name.startswith("."):
        raise InvalidName(f"checkpoint name may not start with '.': {name!r}")
    return name


def auto_name(studio: str, session_start_epoch: int) -> str:
    return f"{studio}_{session_start_epoch}"
