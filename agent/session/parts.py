"""What the session's operations share: one store, one state dir, one root."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.session.lease import SessionLease
from agent.session.local import LocalState
from agent.session.manifests import Manifests
from agent.session.scope import Scope
from agent.settings import Settings
from agent.store.base import Store


@dataclass(frozen=True, slots=True)
class Parts:
    """Built once by the facade and handed to each operation, so they all work on
    the same session files, lease and store (and a new part is one line here)."""

    settings: Settings
    store: Store
    root: Path
    spool: Path
    clock: Callable[[], float]
    local: LocalState
    scope: Scope
    manifests: Manifests
    lease: SessionLease
