"""A restored entry's owner, xattrs and times, set through an fd (or the ``/proc``
path of one): the calls that the restore's ordered pass and its file writers
(``writers.py``) share, so a file gets the same system calls and the same
errors whichever thread finishes it."""

from __future__ import annotations

import errno
import os

from agent.checkpoint import tarformat as tf
from agent.errors import CorruptLayer

# setxattr's answers to a name or value no filesystem takes: the layer's fault.
BAD_XATTR = (errno.E2BIG, errno.ERANGE, errno.EINVAL, errno.ENAMETOOLONG)


def chown(target: int | str, uid: int, gid: int, strict: bool) -> None:
    """``target``: an fd, or the ``/proc`` path of one (never a path that could
    lead through a symlink of the root).  A refusal is an error only when
    ``strict`` (a restore as root); a user's restore keeps its own ids."""
    try:
        os.chown(target, uid, gid)
    except PermissionError:
        if strict:
            raise


def set_xattrs(target: int | str, m: tf.Member, rel: str, follow: bool = True) -> None:
    for k, v in m.xattrs.items():
        try:
            os.setxattr(target, k, v, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in BAD_XATTR:  # the filesystem's limits: say which xattr
                raise OSError(e.errno, f"{e.strerror} (xattr {k!r}, {len(v)} bytes)") from e
            raise CorruptLayer(
                f"refused xattr {k!r} ({len(v)} bytes) of {rel!r}: {e.strerror}"
            ) from None


def finish_file(
    fd: int, m: tf.Member, rel: str, owner: bool, mode: int | None, strict: bool
) -> None:
    """A regular file's metadata once its content is written: the owner (when
    ``owner``), the mode (unless None), xattrs, then the mtime, last, as the
    calls before it would change it."""
    if owner:
        chown(fd, m.uid, m.gid, strict)
    if mode is not None:
        os.fchmod(fd, mode)
    if m.xattrs:
        set_xattrs(fd, m, rel)
    os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
