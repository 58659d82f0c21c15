"""The local API's contract: generated from the models and a table of routes.

Tests hold it and the app together: every route the app serves is documented
here, every documented route is served, and a schema-driven fuzzer checks
that responses match it.  Request validation in ``api.py`` uses the same
constants, so what the document promises is what the server enforces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, Field, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue

from agent.daemon import models

NAME_PATTERN = models.NAME_PATTERN
MAX_LOG_LINES = 10_000
DEFAULT_LOG_LINES = 200
Follow = Literal["0", "1", "true", "false"]
FOLLOW_VALUES: tuple[str, ...] = get_args(Follow)
LogLines = Annotated[int, Field(ge=1, le=MAX_LOG_LINES)]

_REF = "#/components/schemas/{model}"


class _Schema(GenerateJsonSchema):
    """Pydantic's JSON schema, less the noise: no per-field titles, enums inline, plain nulls."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def generate_inner(self, schema: Any) -> JsonSchemaValue:
        if schema.get("type") == "enum":  # inline, so an enum never competes for a model's name
            inline = {k: v for k, v in schema.items() if k != "ref"}
            out = super().generate_inner(inline)
            out.pop("title", None)
            out.pop("description", None)
            return out
        return super().generate_inner(schema)

    def nullable_schema(self, schema: Any) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        if isinstance(inner.get("type"), str) and set(inner) <= {"type", "format"}:
            return {**inner, "type": [inner["type"], "null"]}  # as OpenAPI 3.1 writes it
        return {"anyOf": [inner, {"type": "null"}]}


def _inline(t: Any) -> dict[str, Any]:
    """The schema of a simple type, for a parameter."""
    return TypeAdapter(t).json_schema(schema_generator=_Schema)


# -- routes ------------------------------------------------------------------------------


Answer = type[BaseModel] | Literal["text", "object", "empty"]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    operation: str
    summary: str
    answers: dict[int, tuple[Answer, str]]
    body: type | None = None
    body_required: bool = False
    parameters: list[dict[str, Any]] = field(default_factory=list)
    public: bool = False


_E400 = (models.Error, "Malformed request.")
_E401 = (models.Error, "Missing or wrong bearer token.")
_E404 = (models.Error, "No such checkpoint.")
_E409 = (models.Error, "Not possible in the session's current status, or the name is taken.")
_E413 = (models.Error, "Request body too large.")
_E503 = (models.Error, "The checkpoint store is unavailable.")

ROUTES: tuple[Route, ...] = (
    Route(
        "get",
        "/healthz",
        "health",
        "Liveness of the agent (no token needed).",
        {200: (models.Health, "The agent is up.")},
        public=True,
    ),
    Route(
        "get",
        "/v1/status",
        "getStatus",
        "Session status, IDE, checkpoint, restore progress and resources.",
        {200: (models.Status, "Current status."), 401: _E401},
    ),
    Route(
        "get",
        "/v1/checkpoints",
        "listCheckpoints",
        "This studio's checkpoints, most recently updated first.",
        {200: (models.CheckpointList, "Checkpoints."), 401: _E401, 503: _E503},
    ),
    Route(
        "post",
        "/v1/checkpoints",
        "createCheckpoint",
        "Checkpoint now; answers once the checkpoint is written.  Asked for while the "
        "session is still starting, it waits (bounded) until the session runs.",
        {
            201: (models.CheckpointResult, "Written."),
            400: _E400,
            401: _E401,
            409: _E409,
            413: _E413,
            503: (
                models.Error,
                "The checkpoint store is unavailable, or the session is "
                "still starting after the wait.",
            ),
        },
        body=models.OptionalNameBody,
    ),
    Route(
        "patch",
        "/v1/checkpoints/{name}",
        "renameCheckpoint",
        "Rename a checkpoint of this studio.",
        {
            200: (models.CheckpointInfo, "Renamed."),
            400: _E400,
            401: _E401,
            404: _E404,
            409: _E409,
            413: _E413,
            503: _E503,
        },
        body=models.NameBody,
        body_required=True,
        parameters=[
            {
                "name": "name",
                "in": "path",
                "required": True,
                "schema": _inline(Annotated[str, Field(min_length=1)]),
            }
        ],
    ),
    Route(
        "delete",
        "/v1/checkpoints/{name}",
        "deleteCheckpoint",
        "Delete a checkpoint: this studio's NAME, or STUDIO/NAME (URL-encoded).  Only its ref "
        "goes; gc removes the blobs nothing else needs.  The session's own checkpoint is "
        "written again by its next checkpoint.",
        {
            204: ("empty", "Deleted."),
            400: _E400,
            401: _E401,
            404: _E404,
            409: _E409,
            503: _E503,
        },
        parameters=[
            {
                "name": "name",
                "in": "path",
                "required": True,
                "schema": _inline(Annotated[str, Field(min_length=1)]),
            }
        ],
    ),
    Route(
        "post",
        "/v1/stop",
        "stop",
        "Stop the session: IDE, final checkpoint, exit.",
        {202: (models.Stopping, "Stopping."), 401: _E401},
    ),
    Route(
        "get",
        "/v1/logs",
        "getLogs",
        "The IDE's recent output; with follow, new lines as they come.",
        {200: ("text", "Output lines."), 400: _E400, 401: _E401},
        parameters=[
            {
                "name": "lines",
                "in": "query",
                "required": False,
                "schema": {**_inline(LogLines), "default": DEFAULT_LOG_LINES},
            },
            {"name": "follow", "in": "query", "required": False, "schema": _inline(Follow)},
        ],
    ),
    Route(
        "get",
        "/metrics",
        "metrics",
        "Prometheus metrics.",
        {200: ("text", "Prometheus text format."), 401: _E401},
    ),
    Route(
        "get",
        "/v1/openapi.json",
        "openapi",
        "This document.",
        {200: ("object", "OpenAPI 3 document."), 401: _E401},
    ),
)


# -- the document ------------------------------------------------------------------------------


def schemas() -> dict[str, Any]:
    """Component schemas of every model the routes name (answers and request bodies)."""
    inputs: list[tuple[str, Literal["validation", "serialization"], TypeAdapter[Any]]] = [
        *((m.__name__, "serialization", TypeAdapter(m)) for m in models.API_MODELS),
        *((t.__name__, "validation", TypeAdapter(t)) for t in models.API_REQUESTS),
    ]
    _, top = TypeAdapter.json_schemas(inputs, ref_template=_REF, schema_generator=_Schema)
    defs: dict[str, Any] = top.get("$defs", {})
    return defs


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(model=name)}


def _answer(answer: Answer, description: str) -> dict[str, Any]:
    if answer == "empty":
        return {"description": description}
    media, schema = "application/json", {"type": "object"}
    if answer == "text":
        media, schema = "text/plain", {"type": "string"}
    elif not isinstance(answer, str):
        schema = _ref(answer.__name__)
    return {"description": description, "content": {media: {"schema": schema}}}


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation, "summary": route.summary}
    if route.public:
        op["security"] = []
    if route.parameters:
        op["parameters"] = route.parameters
    if route.body is not None:
        op["requestBody"] = {
            "required": route.body_required,
            "content": {"application/json": {"schema": _ref(route.body.__name__)}},
        }
    op["responses"] = {str(code): _answer(a, d) for code, (a, d) in route.answers.items()}
    return op


def document(version: str = "0") -> dict[str, Any]:
    """The OpenAPI 3 document of the local API."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "studio-agent local API",
            "version": version,
            "description": "Session status, checkpoints, IDE logs and metrics of one data studio.",
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
        "paths": paths,
    }
