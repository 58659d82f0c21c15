"""What of the root a session checkpoints: everything but its own state, the
agent itself, a local store inside the root and the configured exclusions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agent.checkpoint.diff import keep_unlisted
from agent.checkpoint.scan import Excluder, Scan, Stat, scan
from agent.log import get_logger
from agent.settings import Settings

log = get_logger("session")

_AGENT_PACKAGE = Path(__file__).resolve().parents[1]


class Scope:
    def __init__(self, settings: Settings, root: Path, state_dir: Path) -> None:
        self._settings = settings
        self._root = root
        self._state_dir = state_dir

    def own_paths(self) -> list[Path]:
        """What is the agent's, never checkpointed, and so never restored either."""
        paths = [self._state_dir]
        if sys.prefix != sys.base_prefix:  # the agent's own virtual environment
            paths.append(Path(sys.prefix))
        paths.append(_AGENT_PACKAGE)
        workdir = self._settings.workdir
        if workdir and "://" not in workdir:
            paths.append(Path(os.path.abspath(workdir)))
        return paths

    def excluder(self) -> Excluder:
        return Excluder(self._root, self.own_paths(), self._settings.exclude)

    def scan(self, parent: dict[str, Stat] | None = None) -> Scan:
        """The root now; with ``parent``, what it recorded below unlistable directories stands."""
        result = scan(self._root, self.excluder())
        if parent:
            keep_unlisted(result, parent)
        log_skipped(result)
        return result


def log_skipped(result: Scan) -> None:
    for path, reason in result.skipped:
        log.warning("scan.skipped", path=path, reason=reason)
