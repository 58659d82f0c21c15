"""What a session's operations report and return."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.checkpoint.diff import DiffLine
from agent.checkpoint.manifest import CheckpointState, Manifest
from agent.store.base import RefValue

if TYPE_CHECKING:  # the restore engine loads with the first restore
    from agent.checkpoint.restore import RestoreStats


@dataclass(frozen=True, slots=True)
class Progress:
    phase: str  # "download" | "apply" | "scan" | "write" | "upload"
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    studio: str
    name: str
    digest: str
    state: CheckpointState
    session: str
    created: datetime
    updated: datetime
    size: int  # of its layers
    layers: int
    # Bytes deleting it would free: what no other ref of any studio reaches.
    # None when not computed (it reads every studio's refs).
    frees: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "studio": self.studio,
            "name": self.name,
            "digest": self.digest,
            "state": self.state.value,
            "session": self.session,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "size": self.size,
            "layers": self.layers,
        }
        if self.frees is not None:
            doc["frees"] = self.frees
        return doc


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    info: CheckpointInfo
    changed: int
    layer_size: int
    duration: float
    skipped: list[Skipped]
    note: str = ""  # something the user should hear (a new chain was started)
    watched: bool = False  # only what a change watch named was read, not the whole root


@dataclass(frozen=True, slots=True)
class StartOutcome:
    restored: CheckpointInfo | None
    invalidated: list[CheckpointInfo]
    stats: RestoreStats | None = None
    resumed: str = ""  # the earlier session on this root carried on from, restoring nothing


@dataclass(frozen=True, slots=True)
class StudioDeletion:
    """What deleting a studio removed, and the refs it could not (unreadable ones)."""

    studio: str
    deleted: list[str]
    failed: list[str]


@dataclass(frozen=True, slots=True)
class DiffReport:
    lines: list[DiffLine]
    skipped: list[Skipped]


def info_of(studio: str, name: str, ref: RefValue, manifest: Manifest) -> CheckpointInfo:
    """A checkpoint as listed: its ref and what its manifest says."""
    return CheckpointInfo(
        studio=studio,
        name=name,
        digest=ref.digest,
        state=manifest.state,
        session=manifest.session,
        created=manifest.created,
        updated=ref.updated,
        size=manifest.size,
        layers=len(manifest.layers),
    )


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")
