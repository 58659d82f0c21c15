"""Checkpoint names: unique per studio, spaces become underscores.

One rule for every way a name comes in (the CLI, the local API, rename,
``restore_from``): the local API's schema publishes ``NAME_PATTERN`` and
``normalize_name`` enforces it, so a name one accepts the other accepts too.
"""

from __future__ import annotations

import re

from agent.errors import InvalidName

MAX_NAME = 128
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.@+ -]{0,127}"
NAME_RULE = (
    "a checkpoint name is 1-128 characters of letters, digits, '_', '.', '@', '+', '-' "
    "and spaces, and starts with a letter, digit or '_'"
)

_NAME = re.compile(NAME_PATTERN)
_FIRST = re.compile(r"[A-Za-z0-9_]")
_REST = re.compile(r"[A-Za-z0-9_.@+ -]")


def normalize_name(name: str) -> str:
    """The stored form of a user-given name, or ``InvalidName`` saying why not."""
    if not name:
        raise InvalidName("checkpoint name is empty: " + NAME_RULE)
    if len(name) > MAX_NAME:
        raise InvalidName(f"checkpoint name is longer than {MAX_NAME} characters: {name[:40]}...")
    if not _NAME.fullmatch(name):
        if not _FIRST.fullmatch(name[0]):
            why = f"starts with {name[0]!r}"
        else:
            bad = next(c for c in name if not _REST.fullmatch(c))
            why = f"contains {bad!r}"
        raise InvalidName(f"checkpoint name {name!r} {why}: {NAME_RULE}")
    return name.replace(" ", "_")


def auto_name(studio: str, session_start_epoch: int) -> str:
    return f"{studio}_{session_start_epoch}"
