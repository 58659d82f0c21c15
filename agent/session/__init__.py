"""A session's checkpoints: the engine and a store composed, for the CLI and the daemon.

``Session`` (facade.py) composes the parts: the session's local state
(local.py), what of the root it checkpoints (scope.py), starting from a
checkpoint (start.py), writing one (publish.py, which states the write order
that makes each checkpoint atomic), and the studio's catalog (catalog.py).
"""

from __future__ import annotations

from agent.session.facade import Session
from agent.session.records import (
    CheckpointInfo,
    CheckpointResult,
    DiffReport,
    Progress,
    ProgressFn,
    Skipped,
    StartOutcome,
    StudioDeletion,
)

__all__ = [
    "CheckpointInfo",
    "CheckpointResult",
    "DiffReport",
    "Progress",
    "ProgressFn",
    "Session",
    "Skipped",
    "StartOutcome",
    "StudioDeletion",
]
