"""Root-relative path rules shared by the layer writer and the restore."""

from __future__ import annotations

import posixpath

from agent.errors import UnsafeLayer

# Files a restore writes before renaming them into place; one left behind by a
# killed restore is garbage, never a user's file, so scans pass it over.
RESTORE_TEMP_PREFIX = ".studio-restore-"


def clean_member_name(name: str) -> str:
    """The root-relative form of a tar member name, refusing anything that could escape."""
    if (
        name
        and name[0] not in "./"
        and ".." not in name
        and "//" not in name
        and "/./" not in name
        and "\0" not in name
    ):
        name = name.rstrip("/")
        if name and not name.endswith("/."):
            return name
    if not name or "\0" in name:
        raise UnsafeLayer(f"refused entry with an empty or NUL-bearing name: {name!r}")
    if name.startswith("/"):
        raise UnsafeLayer(f"refused entry with an absolute name: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"refused entry whose name climbs out with '..': {name!r}")
    if not parts:
        raise UnsafeLayer(f"refused entry naming the root itself: {name!r}")
    return "/".join(parts)


def symlink_escapes(rel_path: str, target: str) -> bool:
    """Whether a relative symlink target climbs above the root from where the link is.

    Absolute targets resolve inside the container's root, so they never escape;
    the restore never follows a link while writing, whatever its target.
    """
    if not target or target.startswith("/"):
        return False
    depth = rel_path.count("/")  # directories between the root and the link
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def parents(rel_path: str) -> list[str]:
    """Ancestors of a root-relative path, outermost first (the root itself excluded)."""
    out = []
    head = posixpath.dirname(rel_path)
    while head:
        out.append(head)
        head = posixpath.dirname(head)
    out.reverse()
    return out
