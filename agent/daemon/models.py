"""The documents the daemon serves and reports, as pydantic models: one definition each.

The local API answers with them, the control plane receives them, and the
OpenAPI document is generated from them (``openapi.py``), so the contract
cannot drift from what is sent.  Field names and values are the wire format:
renaming a field here changes the API.  Enumerations come from the Python
enums; times are ISO 8601 in UTC with a ``Z``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema
from typing_extensions import TypeAliasType, TypedDict

from agent.checkpoint.manifest import CheckpointState
from agent.checkpoint.names import MAX_NAME
from agent.checkpoint.names import NAME_PATTERN as NAME_PATTERN  # the schema states the rule
from agent.daemon.lifecycle import Status as SessionStatus
from agent.daemon.supervisor import IdeState
from agent.session import CheckpointInfo as InfoRecord
from agent.session import CheckpointResult as ResultRecord
from agent.session import Progress as ProgressRecord

if TYPE_CHECKING:
    from agent.daemon.checkpointer import OwnCheckpoint

MAX_SKIPPED_REPORTED = 100


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


Time = Annotated[
    datetime,
    PlainSerializer(iso, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]

CheckpointName = TypeAliasType(
    "CheckpointName",
    Annotated[
        str,
        Field(
            pattern=f"^{NAME_PATTERN}$",
            min_length=1,
            max_length=MAX_NAME,
            description="Unique per studio; spaces become underscores.",
        ),
    ],
)


class Doc(BaseModel):
    """A document on the wire: no field beyond the declared ones, every one always present."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


# -- requests ---------------------------------------------------------------------------


class NameBody(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    name: CheckpointName


class OptionalNameBody(TypedDict, total=False):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    name: CheckpointName


# -- answers of the local API --------------------------------------------------------------


class Error(Doc):
    error: str
    status: int


class Health(Doc):
    ok: bool
    status: SessionStatus


class Stopping(Doc):
    status: SessionStatus


class CheckpointInfo(Doc):
    studio: str
    name: str
    digest: str
    state: CheckpointState
    session: str
    created: Time
    updated: Time
    size: Count
    layers: Count
    # bytes deleting it would free (what no other ref reaches); in listings only
    frees: Count | None = None

    @classmethod
    def of(cls, i: InfoRecord) -> CheckpointInfo:
        return cls.model_validate(i, from_attributes=True)


class CheckpointList(Doc):
    checkpoints: list[CheckpointInfo]


class Skipped(Doc):
    path: str
    reason: str


class CheckpointResult(Doc):
    checkpoint: CheckpointInfo
    changed: Count
    layer_size: Count
    duration: Seconds
    scan: Literal["full", "watch"] = Field(
        description="full: the whole root was walked; watch: only what the change watch "
        "saw change was read."
    )
    skipped: list[Skipped]
    skipped_total: Count

    @classmethod
    def of(cls, r: ResultRecord) -> CheckpointResult:
        """The first ``MAX_SKIPPED_REPORTED`` skipped paths, and how many there were."""
        return cls(
            checkpoint=CheckpointInfo.of(r.info),
            changed=r.changed,
            layer_size=r.layer_size,
            duration=round(r.duration, 6),
            scan="watch" if r.watched else "full",
            skipped=[
                Skipped(path=s.path, reason=s.reason) for s in r.skipped[:MAX_SKIPPED_REPORTED]
            ],
            skipped_total=len(r.skipped),
        )


class Progress(Doc):
    phase: str
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int

    @classmethod
    def of(cls, p: ProgressRecord) -> Progress:
        return cls.model_validate(p, from_attributes=True)


class Ide(Doc):
    state: IdeState
    pid: int | None
    restarts: Count
    last_exit: str | None
    command: list[str]
    probe_url: str
    last_output: list[str]


class SessionCheckpoint(Doc):
    """The session's own checkpoint: what was last written, and how the last attempt went."""

    name: str | None
    state: CheckpointState | None
    updated: Time | None
    duration: float | None
    size: int | None
    layers: int | None
    changed: int | None
    scan: Literal["full", "watch"] | None
    last_attempt: Time | None
    last_error: str | None

    @classmethod
    def of(cls, own: OwnCheckpoint) -> SessionCheckpoint:
        i = own.info
        return cls(
            name=i.name if i else None,
            state=CheckpointState(i.state) if i else None,
            updated=i.updated if i else None,
            duration=round(own.duration, 6) if own.duration is not None else None,
            size=i.size if i else None,
            layers=i.layers if i else None,
            changed=own.changed,
            scan="watch" if own.scan == "watch" else "full" if own.scan else None,
            last_attempt=own.last_attempt,
            last_error=own.last_error,
        )


class Session(Doc):
    id: str | None
    started: Time | None
    restored: CheckpointInfo | None
    invalidated: list[CheckpointInfo]
    checkpoint: SessionCheckpoint


class Resources(Doc):
    cpu_percent: float  # of the whole machine's CPUs, since the previous reading
    cpu_count: int
    cpu_limit: float | None  # cores the cgroup allows, None when unlimited
    memory_used: int
    memory_limit: int | None  # bytes the cgroup allows, None when unlimited
    memory_total: int  # the machine's memory
    root_used: int
    root_free: int
    ide_rss: int  # resident memory of the IDE's process tree


class ControlPlane(Doc):
    url: str
    reachable: bool | None
    last_error: str
    heartbeat_interval: float


class Heartbeat(Doc):
    """What the control plane hears on every beat: the status less its own part."""

    studio: str
    status: SessionStatus
    reason: str
    since: Time
    ide: Ide
    session: Session
    restore: Progress | None
    resources: Resources | None


class Status(Heartbeat):
    control_plane: ControlPlane | None


# -- events for the control plane ---------------------------------------------------------


class StatusEvent(Doc):
    """Sent at every status change."""

    type: Literal["status"] = "status"
    studio: str
    status: SessionStatus
    previous: SessionStatus | None
    reason: str
    time: Time
    session: Session
    ide: Ide


NoticeKind = Literal["checkpoint_failed", "checkpoints_invalidated", "final_checkpoint_incomplete"]


class Notice(Doc):
    """Something the control plane should know besides a status change."""

    type: NoticeKind
    studio: str
    status: SessionStatus
    reason: str
    time: Time
    session: Session


class InvalidatedNotice(Notice):
    invalidated: list[CheckpointInfo]


class FinalIncompleteNotice(Notice):
    checkpoint: CheckpointInfo | None  # the one that stays valid


Event = StatusEvent | Notice


#: the answers and requests of the local API, in the order of its document
API_MODELS: tuple[type[BaseModel], ...] = (
    Error,
    Health,
    CheckpointInfo,
    CheckpointList,
    Skipped,
    CheckpointResult,
    Progress,
    Ide,
    SessionCheckpoint,
    Session,
    Resources,
    ControlPlane,
    Status,
    Stopping,
)
API_REQUESTS: tuple[type, ...] = (NameBody, OptionalNameBody)
