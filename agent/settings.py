"""Settings: every field is read from ``STUDIO_<NAME>`` and from ``--<name>``.

A flag wins over the environment, which wins over the default.  Intervals and
timeouts are in seconds.  The CLI builds its flags from this model, so a new
field is a new flag and a new variable with nothing else to wire.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from agent.errors import ConfigError

DEFAULT_STATE_DIR = "var/lib/studio-agent"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STUDIO_",
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    # -- what is checkpointed, and where to ----------------------------------
    root: Path = Field(Path("/"), description="Root filesystem to checkpoint and restore.")
    workdir: str = Field(
        "",
        description="Work directory: a local path or s3://bucket/prefix; checkpoints live "
        "in <workdir>/.studios/checkpoints.",
    )
    studio: str = Field("studio", description="Studio id; names the studio's checkpoints.")
    state_dir: Path | None = Field(
        None,
        description=f"The agent's local state (default <root>/{DEFAULT_STATE_DIR}); "
        "never checkpointed.",
    )
    exclude: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra paths or globs (relative to the root, comma-separated in the "
        "environment) left out of checkpoints.",
    )
    compression_level: int = Field(3, ge=1, le=19, description="zstd level of new layers.")
    compression_threads: int = Field(
        0,
        ge=0,
        description="zstd worker threads for new layers (0: one per CPU, at most 4); "
        "each holds about 5 MB.",
    )

    # -- S3 ---------------------------------------------------------------------
    s3_part_size: int = Field(
        16 << 20,
        ge=5 << 20,
        description="Multipart upload part size, and ranged download size, in bytes.",
    )
    s3_concurrency: int = Field(
        4, ge=1, le=64, description="Parallel part uploads and blob downloads."
    )
    s3_max_attempts: int = Field(
        6, ge=1, le=20, description="Tries per S3 request before giving up."
    )

    # -- the session daemon -----------------------------------------------------
    restore_from: str = Field(
        "",
        description="Checkpoint to start from: NAME of this studio's, or STUDIO/NAME of "
        "another's (default: the most recently written valid one).",
    )
    checkpoint_interval: float = Field(
        300.0, gt=0, description="Seconds between periodic checkpoints."
    )
    squash_layers: int = Field(
        16,
        ge=0,
        description="Squash the session's checkpoint in the background once its chain holds "
        "more than this many layers, or its superseded bytes pass half of it (0: never).",
    )
    stop_grace: float = Field(
        30.0, gt=0, description="Seconds from SIGTERM to exit, final checkpoint included."
    )
    ide_command: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="The IDE's command line (a JSON list, or a shell-quoted string).",
    )
    tool_port: int = Field(
        8080,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("tool_port", "STUDIO_TOOL_PORT", "CONNECT_TOOL_PORT"),
        description="Port the IDE listens on (also read from CONNECT_TOOL_PORT).",
    )
    tool_path_prefix: str = Field(
        "/",
        validation_alias=AliasChoices(
            "tool_path_prefix", "STUDIO_TOOL_PATH_PREFIX", "CONNECT_TOOL_PATH_PREFIX"
        ),
        description="URL path the IDE serves under (also read from CONNECT_TOOL_PATH_PREFIX).",
    )
    ready_path: str = Field(
        "/", description="Path (below the prefix) probed over HTTP for IDE readiness."
    )
    ready_timeout: float = Field(
        300.0, gt=0, description="Seconds the IDE has to become ready before the session errs."
    )
    ide_stop_timeout: float = Field(
        10.0, gt=0, description="Seconds between SIGTERM and SIGKILL for the IDE."
    )
    ide_max_restarts: int = Field(
        5, ge=0, description="Failed IDE starts within ide_restart_window that error the session."
    )
    ide_restart_window: float = Field(
        300.0, gt=0, description="Window in seconds for counting failed IDE starts."
    )
    api_host: str = Field("127.0.0.1", description="Address of the local HTTP API.")
    api_port: int = Field(7070, ge=0, le=65535, description="Port of the local HTTP API.")
    api_token: str = Field("", description="Bearer token for the local API.")
    api_token_file: Path | None = Field(None, description="File holding the API token.")
    control_plane_url: str = Field("", description="Control plane base URL; empty runs standalone.")
    control_plane_token: str = Field("", description="Bearer token for the control plane.")
    heartbeat_interval: float = Field(
        30.0, gt=0, description="Seconds between heartbeats (the control plane may change it)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level of log lines written."
    )

    @field_validator("exclude", "ide_command", mode="before")
    @classmethod
    def _split_list(cls, v: Any, info: Any) -> Any:
        if not isinstance(v, str):
            return v
        text = v.strip()
        if text.startswith("["):
            return json.loads(text)
        if info.field_name == "ide_command":
            return shlex.split(text)
        return [p.strip() for p in text.split(",") if p.strip()]

    @field_validator("studio")
    @classmethod
    def _studio_id(cls, v: str) -> str:
        if not v or "/" in v or v in (".", "..") or any(ord(c) < 32 for c in v):
            raise ValueError(f"invalid studio id {v!r}")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.state_dir is None:
            self.state_dir = self.root / DEFAULT_STATE_DIR
        return self

    @property
    def state_path(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir

    def token(self) -> str:
        """The API token, read from api_token_file when one is named."""
        if self.api_token_file is not None:
            try:
                return self.api_token_file.read_text().strip()
            except OSError as e:
                raise ConfigError(f"cannot read api_token_file {self.api_token_file}: {e}") from e
        return self.api_token


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with ``overrides`` (CLI flags) winning."""
    from pydantic import ValidationError

    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid setting {where}: {first['msg']}") from None


def env_name(field: str) -> str:
    return "STUDIO_" + field.upper()


def agent_install_dir() -> Path:
    """The directory the agent runs from (its venv under /opt in the images)."""
    return Path(os.path.realpath(__file__)).parent.parent


def markdown_table() -> str:
    """The settings table of the README (a test keeps the two equal)."""
    rows = [
        "| setting | environment | flag | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if name == "state_dir":
            shown = f"`<root>/{DEFAULT_STATE_DIR}`"
        elif default in ("", [], None):
            shown = ""
        else:
            shown = f"`{default}`"
        flag = "--" + name.replace("_", "-")
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| {name} | `{env_name(name)}` | `{flag}` | {shown} | {desc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m agent.settings: the README's settings table
    print(markdown_table(), end="")
