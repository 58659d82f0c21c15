"""What of the root a session checkpoints: everything but its own state, the
agent itself, a local store inside the root and the configured exclusions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agent.checkpoint.diff import DiffLine, report
from agent.checkpoint.scan import Excluder, Scan, Stat, walk
from agent.checkpoint.state import StateReader, StateWriter
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

    def write_state(self, path: Path) -> Scan:
        """Walk the root and write it as the parent state ``path``, as the walk goes."""
        result = Scan()
        with StateWriter(path) as w:
            for d, names, records, _ in walk(self._root, self.excluder(), result):
                w.write((d, names, records))
        log_skipped(result)
        return result

    def report(
        self, parent: Path, found: dict[str, Stat] | None = None
    ) -> tuple[list[DiffLine], Scan]:
        """What changed since the parent state ``parent``, largest first (into
        ``found``, the records read of what was added or modified); what the
        parent recorded below unlistable directories stands."""
        result = Scan()
        with StateReader(parent) as r:
            lines = report(r.blocks(), walk(self._root, self.excluder(), result), found)
        log_skipped(result)
        return lines, result


def log_skipped(result: Scan) -> None:
    for path, reason in result.skipped:
        log.warning("scan.skipped", path=path, reason=reason)
