"""The local API's contract, kept apart from its implementation.

Tests hold the two together: every route the app serves is documented here,
every documented route is served, and a schema-driven fuzzer checks that
responses match it.  Request validation in ``api.py`` uses the same
constants, so what the document promises is what the server enforces.
"""

from __future__ import annotations

from typing import Any

NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.@+ -]{0,127}"
MAX_LOG_LINES = 10_000
FOLLOW_VALUES = ("0", "1", "true", "false")

_NULLABLE_STR: dict[str, Any] = {"type": ["string", "null"]}
_NULLABLE_INT: dict[str, Any] = {"type": ["integer", "null"]}
_NULLABLE_NUM: dict[str, Any] = {"type": ["number", "null"]}
_TIME: dict[str, Any] = {"type": "string", "format": "date-time"}
_NULLABLE_TIME: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}

_STATUSES = ["starting", "running", "stopping", "stopped", "errored"]
_STATES = ["empty", "interim", "finalized", "invalid"]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    req = list(props) if required is None else required
    if req:
        doc["required"] = req
    return doc


SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": {"type": "string"}, "status": {"type": "integer"}}),
    "Health": _obj({"ok": {"type": "boolean"}, "status": {"type": "string", "enum": _STATUSES}}),
    "CheckpointName": {
        "type": "string",
        "pattern": f"^{NAME_PATTERN}$",
        "minLength": 1,
        "maxLength": 128,
        "description": "Unique per studio; spaces become underscores.",
    },
    "NameBody": _obj({"name": _ref("CheckpointName")}),
    "OptionalNameBody": _obj({"name": _ref("CheckpointName")}, required=[]),
    "CheckpointInfo": _obj(
        {
            "studio": {"type": "string"},
            "name": {"type": "string"},
            "digest": {"type": "string"},
            "state": {"type": "string", "enum": _STATES},
            "session": {"type": "string"},
            "created": _TIME,
            "updated": _TIME,
            "size": {"type": "integer", "minimum": 0},
            "layers": {"type": "integer", "minimum": 0},
        }
    ),
    "CheckpointList": _obj({"checkpoints": {"type": "array", "items": _ref("CheckpointInfo")}}),
    "Skipped": _obj({"path": {"type": "string"}, "reason": {"type": "string"}}),
    "CheckpointResult": _obj(
        {
            "checkpoint": _ref("CheckpointInfo"),
            "changed": {"type": "integer", "minimum": 0},
            "layer_size": {"type": "integer", "minimum": 0},
            "duration": {"type": "number", "minimum": 0},
            "skipped": {"type": "array", "items": _ref("Skipped")},
            "skipped_total": {"type": "integer", "minimum": 0},
        }
    ),
    "Progress": _obj(
        {
            "phase": {"type": "string"},
            "bytes_done": {"type": "integer"},
            "bytes_total": {"type": "integer"},
            "files_done": {"type": "integer"},
            "files_total": {"type": "integer"},
        }
    ),
    "Ide": _obj(
        {
            "state": {
                "type": "string",
                "enum": [
                    "pending",
                    "starting",
                    "ready",
                    "backoff",
                    "stopping",
                    "stopped",
                    "failed",
                ],
            },
            "pid": _NULLABLE_INT,
            "restarts": {"type": "integer", "minimum": 0},
            "last_exit": _NULLABLE_STR,
            "command": {"type": "array", "items": {"type": "string"}},
            "probe_url": {"type": "string"},
            "last_output": {"type": "array", "items": {"type": "string"}},
        }
    ),
    "SessionCheckpoint": _obj(
        {
            "name": _NULLABLE_STR,
            "state": {"type": ["string", "null"], "enum": [*_STATES, None]},
            "updated": _NULLABLE_TIME,
            "duration": _NULLABLE_NUM,
            "size": _NULLABLE_INT,
            "layers": _NULLABLE_INT,
            "changed": _NULLABLE_INT,
            "last_attempt": _NULLABLE_TIME,
            "last_error": _NULLABLE_STR,
        }
    ),
    "Session": _obj(
        {
            "id": _NULLABLE_STR,
            "started": _NULLABLE_TIME,
            "restored": _or_null(_ref("CheckpointInfo")),
            "invalidated": {"type": "array", "items": _ref("CheckpointInfo")},
            "checkpoint": _ref("SessionCheckpoint"),
        }
    ),
    "Resources": _obj(
        {
            "cpu_percent": {"type": "number"},
            "cpu_count": {"type": "integer"},
            "cpu_limit": _NULLABLE_NUM,
            "memory_used": {"type": "integer"},
            "memory_limit": _NULLABLE_INT,
            "memory_total": {"type": "integer"},
            "root_used": {"type": "integer"},
            "root_free": {"type": "integer"},
            "ide_rss": {"type": "integer"},
        }
    ),
    "ControlPlane": _obj(
        {
            "url": {"type": "string"},
            "reachable": {"type": ["boolean", "null"]},
            "last_error": {"type": "string"},
            "heartbeat_interval": {"type": "number"},
        }
    ),
    "Status": _obj(
        {
            "studio": {"type": "string"},
            "status": {"type": "string", "enum": _STATUSES},
            "reason": {"type": "string"},
            "since": _TIME,
            "ide": _ref("Ide"),
            "session": _ref("Session"),
            "restore": _or_null(_ref("Progress")),
            "resources": _or_null(_ref("Resources")),
            "control_plane": _or_null(_ref("ControlPlane")),
        }
    ),
    "Stopping": _obj({"status": {"type": "string", "enum": _STATUSES}}),
}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


_E400 = _json("Error", "Malformed request.")
_E401 = _json("Error", "Missing or wrong bearer token.")
_E404 = _json("Error", "No such checkpoint.")
_E409 = _json("Error", "Not possible in the session's current status, or the name is taken.")
_E413 = _json("Error", "Request body too large.")
_E503 = _json("Error", "The checkpoint store is unavailable.")


def document(version: str = "0") -> dict[str, Any]:
    """The OpenAPI 3 document of the local API."""
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
            "schemas": SCHEMAS,
        },
        "paths": {
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness of the agent (no token needed).",
                    "security": [],
                    "responses": {"200": _json("Health", "The agent is up.")},
                }
            },
            "/v1/status": {
                "get": {
                    "operationId": "getStatus",
                    "summary": "Session status, IDE, checkpoint, restore progress and resources.",
                    "responses": {"200": _json("Status", "Current status."), "401": _E401},
                }
            },
            "/v1/checkpoints": {
                "get": {
                    "operationId": "listCheckpoints",
                    "summary": "This studio's checkpoints, most recently updated first.",
                    "responses": {
                        "200": _json("CheckpointList", "Checkpoints."),
                        "401": _E401,
                        "503": _E503,
                    },
                },
                "post": {
                    "operationId": "createCheckpoint",
                    "summary": "Checkpoint now; answers once the checkpoint is written.",
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": _ref("OptionalNameBody")}},
                    },
                    "responses": {
                        "201": _json("CheckpointResult", "Written."),
                        "400": _E400,
                        "401": _E401,
                        "409": _E409,
                        "413": _E413,
                        "503": _E503,
                    },
                },
            },
            "/v1/checkpoints/{name}": {
                "patch": {
                    "operationId": "renameCheckpoint",
                    "summary": "Rename a checkpoint of this studio.",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("NameBody")}},
                    },
                    "responses": {
                        "200": _json("CheckpointInfo", "Renamed."),
                        "400": _E400,
                        "401": _E401,
                        "404": _E404,
                        "409": _E409,
                        "413": _E413,
                        "503": _E503,
                    },
                }
            },
            "/v1/stop": {
                "post": {
                    "operationId": "stop",
                    "summary": "Stop the session: IDE, final checkpoint, exit.",
                    "responses": {"202": _json("Stopping", "Stopping."), "401": _E401},
                }
            },
            "/v1/logs": {
                "get": {
                    "operationId": "getLogs",
                    "summary": "The IDE's recent output; with follow, new lines as they come.",
                    "parameters": [
                        {
                            "name": "lines",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_LOG_LINES,
                                "default": 200,
                            },
                        },
                        {
                            "name": "follow",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": list(FOLLOW_VALUES)},
                        },
                    ],
                    "responses": {"200": _text("Output lines."), "400": _E400, "401": _E401},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics.",
                    "responses": {"200": _text("Prometheus text format."), "401": _E401},
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3 document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "401": _E401,
                    },
                }
            },
        },
    }
