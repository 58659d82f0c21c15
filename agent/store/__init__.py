"""Checkpoint stores behind one interface: a local directory, or S3."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError
from agent.store.base import CHECKPOINTS_DIR, RefValue, Store

if TYPE_CHECKING:
    from agent.settings import Settings

__all__ = ["CHECKPOINTS_DIR", "RefValue", "Store", "open_store"]


def open_store(settings: Settings) -> Store:
    """The store for ``settings.workdir``: ``s3://bucket/prefix`` or a local path."""
    workdir = settings.workdir
    if not workdir:
        raise ConfigError("no workdir set: use --workdir or STUDIO_WORKDIR (a path or s3://...)")
    if workdir.startswith("s3://"):
        from agent.store.s3 import S3Store

        return S3Store.from_url(workdir, settings)
    if "://" in workdir:
        raise ConfigError(
            f"unsupported workdir {workdir!r}: use a local path or s3://bucket/prefix"
        )
    from agent.store.local import LocalStore

    return LocalStore(Path(workdir))
