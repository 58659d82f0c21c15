"""What a killed process of this agent leaves behind, and clearing it at the next start.

A SIGKILL mid-checkpoint leaves its layer in the spool (as big as the layer)
and, in an S3 store, what it had uploaded of it under a temporary key, which
the spool file's name names (``layer-<owner>-<id>.tmp``: the upload
``<owner>/<id>``, see ``Store.open_blob``); mid-restore it leaves the download
directory and, inside the root, files under the restore's temporary names.
Nothing else would ever remove them, and the root's ones would take up space
in every later checkpoint's root.  Only this agent's own names are touched,
only in its own directories (the state dir, its spool) and, in the root, only
the temporaries of a restore the state dir recorded as begun and never
finished.  The caller holds the state dir's ``Owner`` lock, so
no live process of this agent can be writing any of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat as st
from collections.abc import Iterator
from pathlib import Path

from agent.checkpoint.paths import RESTORE_TEMP_PREFIX
from agent.checkpoint.scan import Excluder
from agent.log import get_logger

log = get_logger("session")

RESTORE_MARKER = "restore.pending"

# What the agent writes in its spool: a layer being written, a small blob being
# staged, a restore's downloads, a blob downloaded by name (and its partial).
_SPOOL_FILES = re.compile(
    r"(layer-[0-9a-f]+(-[0-9a-f]+)?\.tmp|put-[0-9a-f]+(-[0-9a-f]+)?\.tmp|[0-9a-f]{64}|"
    r"\.[0-9a-f]{64}\.[0-9a-f]+\.part)"
)
# A layer's spool file, named for the store's upload of it.
_LAYER_SPOOL = re.compile(r"layer-([0-9a-f]{32})-([0-9a-f]{32})\.tmp")
_SPOOL_DIRS = re.compile(r"restore-[A-Za-z0-9_]+")
# In the state dir: a parent state or session file written but never renamed into place.
_STATE_TEMPS = re.compile(r"(parent-[0-9a-f]+\.state|session\.json|restore\.pending)\.tmp")
_PARENT_STATE = re.compile(r"parent-[0-9a-f]+\.state")


def layer_spool_name(upload: str) -> str:
    """The spool file of a layer uploaded as ``upload`` (``<owner>/<id>``)."""
    owner, _, ident = upload.partition("/")
    return f"layer-{owner}-{ident}.tmp"


def spooled_uploads(spool: Path) -> list[str]:
    """The uploads of the layers a dead process left in ``spool``, for the store to
    clear what it kept of them (``Store.clear_leftovers``)."""
    out = []
    for entry in _entries(spool):
        m = _LAYER_SPOOL.fullmatch(entry.name)
        if m is not None and entry.is_file(follow_symlinks=False):
            out.append(f"{m[1]}/{m[2]}")
    return out


def clear_state_dir(state_dir: Path, spool: Path, state_file: str | None) -> int:
    """Remove a dead process's spool files and half-written state files; how many.

    ``state_file`` is the parent state session.json names (None when there is no
    session): any other parent state was written by a save that never switched.
    """
    removed = 0
    for entry in _entries(spool):
        if entry.is_dir(follow_symlinks=False) and _SPOOL_DIRS.fullmatch(entry.name):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
        elif entry.is_file(follow_symlinks=False) and _SPOOL_FILES.fullmatch(entry.name):
            removed += _unlink(entry.path)
    for entry in _entries(state_dir):
        if not entry.is_file(follow_symlinks=False):
            continue
        orphan = (
            state_file is not None
            and _PARENT_STATE.fullmatch(entry.name) is not None
            and entry.name != state_file
        )
        if orphan or _STATE_TEMPS.fullmatch(entry.name):
            removed += _unlink(entry.path)
    if removed:
        log.info("leftovers.cleared", where=str(state_dir), entries=removed)
    return removed


# -- a restore's temporaries inside the root ----------------------------------------------


def begin_restore(state_dir: Path) -> None:
    """Record that this process starts writing into the root (removed by ``end_restore``)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / RESTORE_MARKER
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid()}))
    os.replace(tmp, path)


def end_restore(state_dir: Path) -> None:
    """The restore ended (its own error handling removed what it wrote under temporary names)."""
    with contextlib.suppress(FileNotFoundError):
        (state_dir / RESTORE_MARKER).unlink()


def clear_restore_temps(root: Path, state_dir: Path, excluder: Excluder) -> int:
    """Remove the temporaries of a restore that was killed; how many.

    Only when the state dir shows a restore begun and never ended, and only the
    names that restore's process used (``<prefix><pid>-<n>``), never crossing
    into another filesystem or into what checkpoints leave out.
    """
    marker = state_dir / RESTORE_MARKER
    try:
        pid = int(json.loads(marker.read_text())["pid"])
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, TypeError, KeyError):
        pid = -1  # unreadable: a kill while it was written, before anything was restored
    removed = 0
    if pid > 0:
        name = re.compile(re.escape(f"{RESTORE_TEMP_PREFIX}{pid}-") + r"[0-9]+")
        for path in _walk_for(root, name, excluder):
            removed += _unlink(path)
        log.info("leftovers.restore_temporaries", root=str(root), pid=pid, removed=removed)
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    return removed


def _walk_for(root: Path, name: re.Pattern[str], excluder: Excluder) -> Iterator[str]:
    root_s = str(root)
    try:
        dev = os.lstat(root_s).st_dev
    except OSError:
        return
    stack = [""]
    while stack:
        rel = stack.pop()
        full = f"{root_s}/{rel}" if rel else root_s
        for entry in _entries(Path(full)):
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                s = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.S_ISDIR(s.st_mode):
                if s.st_dev == dev and not excluder.excluded(child):
                    stack.append(child)
            elif name.fullmatch(entry.name):
                yield entry.path


def _entries(d: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(d) as it:
            return list(it)
    except OSError:
        return []


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
    except OSError:
        return 0
    return 1
