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
from typing import Annotated, Any, Literal, get_args, get_origin

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
        description="The agent's local state (never checkpointed).",
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

    restore_writers: int = Field(
        2,
        ge=1,
        le=64,
        description="Threads that finish restored files (content, owner, mode, times) "
        "once the disk shows that writes block; 1 writes every file in the one ordered pass.",
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
    s3_stream_uploads: bool = Field(
        True,
        description="With s3_segment_size 0: upload a checkpoint's layer in parts while it is "
        "compressed (to a temporary key, copied to its address at the end) rather than once "
        "it is written.",
    )
    s3_segment_size: int = Field(
        12 << 20,
        ge=0,
        description="Cut a checkpoint's layer into segments of about this many compressed "
        "bytes, each stored under its own digest as soon as it is complete, so that no copy "
        "is left once the layer's end is known (0: one blob a layer, as s3_stream_uploads says).",
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
    checkpoint_min_interval: float = Field(
        60.0,
        ge=0,
        description="With the change watch on: checkpoint once changes have settled for a "
        "few seconds, at most this often, so a kill loses at most this much work (0: only "
        "every checkpoint_interval).",
    )
    change_watch: bool = Field(
        True,
        description="Watch the root for changes (inotify) so that a periodic checkpoint reads "
        "only what changed; off: every checkpoint walks the whole root.",
    )
    full_scan_every: int = Field(
        12,
        ge=1,
        description="Walk the whole root at every this many periodic checkpoints even when "
        "the change watch is sound (it cannot see writes through a shared mmap).",
    )
    squash_layers: int = Field(
        16,
        ge=0,
        description="Squash the session's checkpoint in the background once its chain holds "
        "more than this many layers (one cut into segments counting once), or its superseded "
        "bytes pass half of it (0: never).",
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
            try:
                return json.loads(text)
            except ValueError as e:
                raise ValueError(f"{text!r} is not a JSON list ({e})") from None
        if info.field_name == "ide_command":
            try:
                return shlex.split(text)
            except ValueError as e:
                raise ValueError(f"{text!r} is not a shell command line ({e})") from None
        return [p.strip() for p in text.split(",") if p.strip()]

    @field_validator("studio")
    @classmethod
    def _studio_id(cls, v: str) -> str:
        if not v or "/" in v or v in (".", "..") or any(ord(c) < 32 for c in v):
            raise ValueError(
                f"a studio id may not be empty, '.' or '..', nor contain '/' or control "
                f"characters, not {v!r}"
            )
        return v

    @field_validator("api_token", "control_plane_token")
    @classmethod
    def _token(cls, v: str) -> str:
        if v and not v.strip():  # no client could ever present it
            raise ValueError("a token must not be only whitespace")
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
                token = self.api_token_file.read_text().strip()
            except OSError as e:
                raise ConfigError(f"cannot read api_token_file {self.api_token_file}: {e}") from e
            if not token:
                raise ConfigError(f"api_token_file {self.api_token_file} holds no token")
            return token
        return self.api_token


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with ``overrides`` (CLI flags) winning."""
    from pydantic import ValidationError

    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise ConfigError(_explain(e.errors()[0])) from None


def _explain(err: Any) -> str:
    """One pydantic error in our words: the setting, where it is set, what is wrong."""
    loc = [str(p) for p in err["loc"]]
    name = next((n for n in Settings.model_fields if n in loc or env_name(n) in loc), "")
    if not name:
        return f"invalid settings: {err['msg']}"
    value = err.get("input")
    shown = repr(value) if isinstance(value, str) else str(value)
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind in ("float_parsing", "float_type"):
        what = f"{shown} is not a number"
    elif kind in ("int_parsing", "int_type", "int_from_float"):
        what = f"{shown} is not a whole number"
    elif kind == "greater_than":
        what = f"must be greater than {_num(ctx['gt'])}, not {value}"
    elif kind == "greater_than_equal":
        what = f"must be at least {_num(ctx['ge'])}, not {value}"
    elif kind == "less_than_equal":
        what = f"must be at most {_num(ctx['le'])}, not {value}"
    elif kind == "literal_error":
        what = f"must be one of {', '.join(choices(name))}, not {shown}"
    elif kind == "value_error":
        what = str(ctx.get("error", err["msg"]))
    elif kind in ("list_type", "string_type") and len(loc) > 1:
        what = f"must be a list of strings, not {err['input']!r} in it"
    else:
        what = err["msg"][0].lower() + err["msg"][1:]
    return f"invalid setting {name} ({where_set(name)}): {what}"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def env_name(field: str) -> str:
    return "STUDIO_" + field.upper()


def env_names(field: str) -> list[str]:
    """Every environment variable a setting is read from (``STUDIO_<NAME>`` first)."""
    alias = Settings.model_fields[field].validation_alias
    extra = [c for c in getattr(alias, "choices", []) if isinstance(c, str) and c.isupper()]
    return [env_name(field), *(c for c in extra if c != env_name(field))]


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def where_set(field: str) -> str:
    """``--flag or STUDIO_<NAME>``: where a user sets ``field``, for error messages."""
    return " or ".join([flag_name(field), *env_names(field)])


def choices(field: str) -> list[str]:
    """The values a ``Literal`` setting takes; empty for any other."""
    annotation = Settings.model_fields[field].annotation
    return [str(a) for a in get_args(annotation)] if get_origin(annotation) is Literal else []


def check_paths(settings: Settings, *, create_state: bool) -> None:
    """Refuse a root that is not a directory (rather than creating one) and a state
    dir that cannot be one, naming the setting at fault; with ``create_state`` the
    state dir is made, and must be writable."""
    root = settings.root
    if not root.is_dir():
        why = "is not a directory" if root.exists() else "does not exist"
        raise ConfigError(f"the root {root} {why} (set by {where_set('root')})")
    path = settings.state_path
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"the state dir {path} is not a directory (set by {where_set('state_dir')})"
        )
    if not create_state:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create the state dir {path}: {e.strerror or e} "
            f"(set by {where_set('state_dir')})"
        ) from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"the state dir {path} is not writable (set by {where_set('state_dir')})")


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
