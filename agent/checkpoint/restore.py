"""Apply a chain of layers to a root in one merged pass.

Layers are read newest first and each path is written once, by the newest
layer that has it; older entries at that path, or below a newer non-directory,
whiteout or opaque directory, are skipped without touching the disk.  Directory
metadata is applied last, deepest first, so creating children can't disturb it.

Nothing is ever written through a symlink: every parent of an entry must be a
real directory inside the root (entries below a symlink planted by the same or
an older layer are refused), names with ``..`` or a leading ``/`` are refused,
and so are device nodes and relative symlinks that climb above the root.

An entry that replaces something already there is written under a temporary
name and renamed into place, so the old file stays whole until the new one is;
a new file is created under its own name (``O_EXCL``, which never follows a
symlink) and removed again if writing it fails, so a failed restore never leaves
a partly written file under its final name.  System calls that would not change
anything (``fchown`` to the restoring user, ``fchmod`` to the mode the file was
created with) are left out: per-file cost is what a restore pays over ``tar -x``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat as st
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from agent.checkpoint import tarformat as tf
from agent.checkpoint.layer_reader import LayerReader
from agent.checkpoint.paths import RESTORE_TEMP_PREFIX as _TMP_PREFIX
from agent.checkpoint.paths import clean_member_name, parents, symlink_escapes
from agent.errors import CorruptLayer, UnsafeLayer

_DIR, _NONDIR, _WHITEOUT = 1, 2, 3
_REG_TYPES = (tf.REGTYPE, tf.AREGTYPE, tf.CONTTYPE)

# (entries done, entries total, uncompressed bytes done, uncompressed bytes total)
ApplyProgress = Callable[[int, int, int, int], None]


@dataclass(slots=True)
class RestoreStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class LayerFile:
    """A layer to apply: a local file, or ``opener`` giving a fresh reader of its
    bytes (for a layer still downloading).  With ``digest`` (and ``size``) it is
    verified while it is applied, not in a pass of its own; a mismatch fails the
    restore."""

    path: Path | None = None
    digest: str | None = None
    size: int | None = None
    opener: Callable[[], BinaryIO] | None = None

    def open(self) -> BinaryIO:
        if self.opener is not None:
            return self.opener()
        if self.path is None:
            raise ValueError("a LayerFile needs a path or an opener")
        return open(self.path, "rb")


@dataclass(slots=True)
class _DeferredLink:
    path: str
    target: str
    layer: int
    member: tf.Member


@dataclass(slots=True)
class _Merge:
    root: str
    decided: dict[str, tuple[int, int]] = field(default_factory=dict)
    opaque: dict[str, int] = field(default_factory=dict)
    used_dirs: dict[str, int] = field(default_factory=dict)
    dir_meta: dict[str, tf.Member] = field(default_factory=dict)
    # Times of existing directories we write into, put back at the end when no
    # layer has an entry for them (a temporary name and a rename move them).
    dir_times: dict[str, tuple[int, int]] = field(default_factory=dict)
    deferred: list[_DeferredLink] = field(default_factory=list)
    stats: RestoreStats = field(default_factory=RestoreStats)
    # Directories whose new entries take something from them: the group (setgid)
    # or the mode bits (a default ACL); below them no fchown or fchmod is left out.
    inherit: set[str] = field(default_factory=set)
    # Directories this restore made: our owner, no xattrs to clear (unless inherited).
    made_dirs: set[str] = field(default_factory=set)
    seq: int = 0
    is_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    ids: tuple[int, int] = field(default_factory=lambda: (os.geteuid(), os.getegid()))
    umask: int = field(default_factory=lambda: _current_umask())
    pid: int = field(default_factory=os.getpid)
    protected: tuple[str, ...] = ()


def _current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for a
    moment, for every thread)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def apply_layers(
    root: Path,
    layers: Sequence[Path | LayerFile] | int,
    fetch: Callable[[int], Path | LayerFile] | None = None,
    *,
    totals: tuple[int, int] = (0, 0),
    progress: ApplyProgress | None = None,
    protected: Sequence[str] = (),
) -> RestoreStats:
    """Apply a chain of layers (local verified files, oldest first) to ``root``.

    ``layers`` is the list of files, or their count with ``fetch(index)``
    returning each file when it is ready (it may block while it downloads);
    a ``LayerFile`` with a digest is verified as it is read;
    they are asked for newest first.  ``totals`` is (entries, uncompressed
    bytes) of the whole chain when known, for progress reports.  Entries at or
    below a ``protected`` root-relative path are skipped, and one that would
    replace or remove such a path from above is refused.
    """
    if isinstance(layers, int):
        if fetch is None:
            raise ValueError("fetch is required with a layer count")
        count, get = layers, fetch
    else:
        files = list(layers)
        count, get = len(files), files.__getitem__
    merge = _Merge(root=str(root), protected=tuple(protected))
    if _inherits(os.stat(root).st_mode, str(root)):
        merge.inherit.add("")
    return _apply_all(merge, count, get, totals, progress)


def _apply_all(
    merge: _Merge,
    count: int,
    get: Callable[[int], Path | LayerFile],
    totals: tuple[int, int],
    progress: ApplyProgress | None,
) -> RestoreStats:
    newest = count - 1
    base_bytes = 0
    for index in range(newest, -1, -1):
        src = get(index)
        layer = src if isinstance(src, LayerFile) else LayerFile(src)
        pending: dict[str, list[_DeferredLink]] = {}
        skipped_files: set[str] = set()
        name = f"layer {index + 1} of {count}"
        older = index < newest
        entries = merge.stats.entries
        with layer.open() as f, LayerReader(f, name, layer.digest, layer.size) as reader:
            for m in reader.members():
                _apply_member(merge, reader, m, index, older, pending, skipped_files)
                entries += 1
                if progress is not None and not entries & 255:
                    progress(entries, totals[0], base_bytes + reader.consumed, totals[1])
            base_bytes += reader.consumed
        merge.stats.entries = entries
        if pending:
            _relink_overridden(merge, layer, index, pending)
    for link in merge.deferred:
        _finish_deferred_link(merge, link)
    _apply_dir_metadata(merge)
    merge.stats.bytes = base_bytes
    if progress is not None:
        progress(
            merge.stats.entries,
            totals[0] or merge.stats.entries,
            base_bytes,
            totals[1] or base_bytes,
        )
    return merge.stats


# -- the merge rules ----------------------------------------------------------------


def _hidden(merge: _Merge, path: str, layer: int, check_parents: bool) -> bool:
    """Whether a newer layer already decided this path or hides it."""
    d = merge.decided.get(path)
    if d is not None and d[0] > layer:
        return True
    return check_parents and _hidden_by_parent(merge, path, layer)


def _hidden_by_parent(merge: _Merge, path: str, layer: int) -> bool:
    for a in parents(path):
        d = merge.decided.get(a)
        if d is not None and d[0] > layer and d[1] != _DIR:
            return True
        o = merge.opaque.get(a)
        if o is not None and o > layer:
            return True
    return False


def _apply_member(
    merge: _Merge,
    reader: LayerReader,
    m: tf.Member,
    layer: int,
    older: bool,
    pending: dict[str, list[_DeferredLink]],
    skipped_files: set[str],
) -> None:
    path = clean_member_name(m.name)
    head, _, base = path.rpartition("/")
    if merge.protected and _protected(merge.protected, path, head, base, m):
        merge.stats.skipped += 1
        return
    if base.startswith(tf.WHITEOUT_PREFIX):
        _apply_whiteout(merge, head, base, layer, older, m.name)
        return
    kind = m.type
    if kind in (tf.CHRTYPE, tf.BLKTYPE):
        raise UnsafeLayer(f"refused device node {path!r}: device nodes are never restored")
    d = merge.decided.get(path)
    if (d is not None and d[0] > layer) or (older and _hidden_by_parent(merge, path, layer)):
        merge.stats.skipped += 1
        if kind in _REG_TYPES:
            skipped_files.add(path)  # a hardlink of this layer may still need it
        if kind != tf.DIRTYPE and d is not None and d[1] == _DIR:
            # This layer made the path a non-directory, removing what was below it;
            # a newer one made it a directory again, so only newer content stays.
            _hide_below(merge, path, layer)
        return
    if kind != tf.DIRTYPE:
        used = merge.used_dirs.get(path)
        if used is not None and used > layer:
            if kind == tf.SYMTYPE:
                raise UnsafeLayer(
                    f"refused symlink {path!r}: a newer layer writes below it, which would "
                    "write through the link"
                )
            raise CorruptLayer(f"{path!r} is not a directory but a newer layer writes below it")
    if head:
        _ensure_parents(merge, path, head, layer)
    full = f"{merge.root}/{path}"
    if kind in _REG_TYPES:
        _write_file(merge, reader, m, full, path, head)
        merge.decided[path] = (layer, _NONDIR)
        merge.stats.files += 1
    elif kind == tf.DIRTYPE:
        _make_dir(merge, full, path)
        merge.dir_meta[path] = m
        merge.decided[path] = (layer, _DIR)
        if merge.used_dirs.get(path, -1) < layer:  # a real directory now: no lstat again
            merge.used_dirs[path] = layer
    elif kind == tf.LNKTYPE:
        target = clean_member_name(m.linkname)
        d = merge.decided.get(target)
        if d == (layer, _NONDIR):
            _check_link_target(merge, target, path)
            _hardlink(merge, os.path.join(merge.root, target), full, path)
        elif target in skipped_files or (d is not None and d[0] > layer):
            # The target's content in this layer was overridden or hidden by a
            # newer one: read it again from this layer after the pass.
            pending.setdefault(target, []).append(_DeferredLink(path, target, layer, m))
        else:
            merge.deferred.append(_DeferredLink(path, target, layer, m))
        merge.decided[path] = (layer, _NONDIR)
    elif kind == tf.SYMTYPE:
        if symlink_escapes(path, m.linkname):
            raise UnsafeLayer(
                f"refused symlink {path!r} -> {m.linkname!r}: it climbs above the root"
            )
        _replace_with(merge, full, path, lambda tmp: os.symlink(m.linkname, tmp))
        _set_meta_path(merge, full, m)
        merge.decided[path] = (layer, _NONDIR)
    elif kind == tf.FIFOTYPE:
        _replace_with(merge, full, path, lambda tmp: os.mkfifo(tmp, 0o600), meta=m)
        merge.decided[path] = (layer, _NONDIR)


def _apply_whiteout(merge: _Merge, head: str, base: str, layer: int, older: bool, raw: str) -> None:
    if base == tf.OPAQUE_WHITEOUT:
        if not head:
            raise UnsafeLayer("refused opaque whiteout of the root directory")
        if _hidden(merge, head, layer, older):
            return
        if _check_existing_parents(merge, head, raw):
            _prune_undecided(merge, head, layer)
        merge.opaque[head] = layer
        return
    name = base[len(tf.WHITEOUT_PREFIX) :]
    if name in ("", ".", "..") or name.startswith(tf.WHITEOUT_PREFIX):
        raise UnsafeLayer(f"refused whiteout {raw!r}: it does not name an entry of its directory")
    target = f"{head}/{name}" if head else name
    d = merge.decided.get(target)
    if d is not None:
        if d[1] == _DIR:  # recreated by a newer layer: what was below must go
            _hide_below(merge, target, layer)
        return
    if _hidden(merge, target, layer, older):
        return
    if _check_existing_parents(merge, target, raw):
        _remove(merge, os.path.join(merge.root, target), target)
    merge.decided[target] = (layer, _WHITEOUT)


def _hide_below(merge: _Merge, rel_dir: str, layer: int) -> None:
    """Everything below ``rel_dir`` from the image or layers older than ``layer`` is gone."""
    if _check_existing_parents(merge, rel_dir, rel_dir):
        _prune_undecided(merge, rel_dir, layer)
    if merge.opaque.get(rel_dir, -1) < layer:
        merge.opaque[rel_dir] = layer


def _prune_undecided(merge: _Merge, rel_dir: str, layer: int) -> None:
    """Delete what lies below ``rel_dir`` unless this or a newer layer wrote it."""
    full = os.path.join(merge.root, rel_dir)
    try:
        names = os.listdir(full)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        rel = f"{rel_dir}/{name}"
        d = merge.decided.get(rel)
        if d is None or d[0] < layer:
            _remove(merge, os.path.join(full, name), rel)
        elif d[1] == _DIR:
            _prune_undecided(merge, rel, layer)


# -- filesystem operations, never following a symlink ------------------------------------


def _ensure_parents(merge: _Merge, path: str, head: str, layer: int) -> None:
    """Make ``head``, the directory ``path`` is in, and its parents exist as real
    directories (never symlinks) and note that ``layer`` writes below them."""
    used = merge.used_dirs
    prev = used.get(head)
    if prev is not None:  # its own parents were checked when it was
        if layer > prev:
            for a in parents(path):
                if used.get(a, -1) < layer:
                    used[a] = layer
        return
    for a in parents(path):
        prev = used.get(a)
        if prev is not None:
            if layer > prev:
                used[a] = layer
            continue
        full = os.path.join(merge.root, a)
        try:
            s = os.lstat(full)
        except FileNotFoundError:
            _mkdir(merge, full, a, 0o755)
        else:
            if st.S_ISLNK(s.st_mode):
                raise UnsafeLayer(
                    f"refused {path!r}: its parent {a!r} is a symlink, and restore never "
                    "writes through a symlink"
                )
            if not st.S_ISDIR(s.st_mode):
                if a in merge.decided:
                    raise CorruptLayer(f"refused {path!r}: its parent {a!r} is not a directory")
                # Content of the image that an older layer replaces by a directory.
                os.unlink(full)
                _mkdir(merge, full, a, 0o755)
            else:
                merge.dir_times[a] = (s.st_atime_ns, s.st_mtime_ns)
                if _inherits(s.st_mode, full):
                    merge.inherit.add(a)
        used[a] = layer


def _check_existing_parents(merge: _Merge, path: str, what: str) -> bool:
    """For deletions: whether the parents are real directories (nothing to delete if
    one is missing or not a directory); a symlink among them is refused."""
    for a in parents(path):
        if a in merge.used_dirs:
            continue
        try:
            s = os.lstat(os.path.join(merge.root, a))
        except FileNotFoundError:
            return False
        if st.S_ISLNK(s.st_mode):
            raise UnsafeLayer(f"refused {what!r}: its parent {a!r} is a symlink")
        if not st.S_ISDIR(s.st_mode):
            return False
    return True


def _forget_dirs_below(merge: _Merge, rel: str) -> None:
    prefix = rel + "/"
    if rel in merge.used_dirs:
        for k in [k for k in merge.used_dirs if k == rel or k.startswith(prefix)]:
            del merge.used_dirs[k]
    if merge.inherit:
        merge.inherit -= {k for k in merge.inherit if k == rel or k.startswith(prefix)}


def _remove(merge: _Merge, full: str, rel: str) -> None:
    try:
        s = os.lstat(full)
    except FileNotFoundError:
        return
    if st.S_ISDIR(s.st_mode):
        shutil.rmtree(full)
        _forget_dirs_below(merge, rel)
    else:
        os.unlink(full)


def _inherits(mode: int, full: str) -> bool:
    """Whether new entries in this directory get its group or an ACL's mode bits."""
    if mode & st.S_ISGID:
        return True
    try:
        os.getxattr(full, "system.posix_acl_default", follow_symlinks=False)
    except OSError:  # none, or a filesystem without ACLs
        return False
    return True


def _mkdir(merge: _Merge, full: str, rel: str, mode: int) -> None:
    os.mkdir(full, mode)
    merge.made_dirs.add(rel)
    if merge.inherit and rel.rpartition("/")[0] in merge.inherit:
        merge.inherit.add(rel)  # the setgid bit and a default ACL are handed down


def _make_dir(merge: _Merge, full: str, rel: str) -> None:
    try:
        _mkdir(merge, full, rel, 0o700)
        return
    except FileExistsError:
        s = os.lstat(full)
    if st.S_ISDIR(s.st_mode):
        if _inherits(s.st_mode, full):
            merge.inherit.add(rel)
        return
    os.unlink(full)
    _mkdir(merge, full, rel, 0o700)


def _tmp_name(merge: _Merge, full: str) -> str:
    merge.seq += 1
    return f"{full.rpartition('/')[0]}/{_TMP_PREFIX}{merge.pid}-{merge.seq}"


def _replace_with(
    merge: _Merge,
    full: str,
    rel: str,
    create: Callable[[str], None],
    meta: tf.Member | None = None,
) -> None:
    """Create a new entry at ``full``, or, when something is there already, under
    a temporary name renamed over it."""
    try:
        create(full)
        tmp = None
    except FileExistsError:
        while True:
            tmp = _tmp_name(merge, full)
            try:
                create(tmp)
                break
            except FileExistsError:
                continue
    try:
        if meta is not None:
            _set_meta_path(merge, tmp or full, meta)
        if tmp is not None:
            _rename_over(merge, tmp, full, rel)
    except BaseException:
        _unlink_quiet(tmp or full)
        raise


def _rename_over(merge: _Merge, tmp: str, full: str, rel: str) -> None:
    try:
        os.rename(tmp, full)
    except OSError as e:
        if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        _remove(merge, full, rel)
        os.rename(tmp, full)


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _write_file(
    merge: _Merge, reader: LayerReader, m: tf.Member, full: str, rel: str, head: str
) -> None:
    mode = m.mode & 0o7777
    # Special bits are set only after the owner (chown clears them); until then,
    # and for a file that replaces another, the new file is private.
    create_mode = mode if mode <= 0o777 else 0o600
    tmp = None
    try:
        fd = os.open(full, _CREATE, create_mode)
    except FileExistsError:
        create_mode = 0o600
        while True:
            tmp = _tmp_name(merge, full)
            try:
                fd = os.open(tmp, _CREATE, create_mode)
                break
            except FileExistsError:
                continue
    try:
        try:
            if m.size:
                reader.copy_to(fd, m.size)
            inherited = merge.inherit and head in merge.inherit
            uid, gid = merge.ids
            if inherited or m.uid != uid or m.gid != gid:
                _chown_fd(merge, fd, m)
            if inherited or mode != create_mode & ~merge.umask:
                os.fchmod(fd, mode)
            if m.xattrs:
                for k, v in m.xattrs.items():
                    os.setxattr(fd, k, v)
            os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
        finally:
            os.close(fd)
        if tmp is not None:
            _rename_over(merge, tmp, full, rel)
    except BaseException:
        _unlink_quiet(tmp or full)
        raise


def _chown_fd(merge: _Merge, fd: int, m: tf.Member) -> None:
    try:
        os.fchown(fd, m.uid, m.gid)
    except PermissionError:
        if merge.is_root:
            raise


def _set_meta_path(merge: _Merge, full: str, m: tf.Member, chown: bool = True) -> None:
    try:
        if chown:
            os.chown(full, m.uid, m.gid, follow_symlinks=False)
    except PermissionError:
        if merge.is_root:
            raise
    is_link = m.type == tf.SYMTYPE
    if not is_link:
        os.chmod(full, m.mode & 0o7777)
    for k, v in m.xattrs.items():
        os.setxattr(full, k, v, follow_symlinks=False)
    os.utime(full, ns=(m.mtime_ns, m.mtime_ns), follow_symlinks=False)


def _check_link_target(merge: _Merge, target: str, path: str) -> None:
    for a in parents(target):
        if a in merge.used_dirs:
            continue
        s = _lstat_or_none(os.path.join(merge.root, a))
        if s is None or not st.S_ISDIR(s.st_mode):
            raise UnsafeLayer(
                f"refused hardlink {path!r} -> {target!r}: the target is not inside the root"
            )
    s = _lstat_or_none(os.path.join(merge.root, target))
    if s is None:
        raise CorruptLayer(f"hardlink {path!r} -> {target!r}: the target does not exist")
    if st.S_ISDIR(s.st_mode):
        raise UnsafeLayer(f"refused hardlink {path!r} -> {target!r}: the target is a directory")


def _lstat_or_none(full: str) -> os.stat_result | None:
    try:
        return os.lstat(full)
    except FileNotFoundError:
        return None


def _hardlink(merge: _Merge, src: str, full: str, rel: str) -> None:
    _replace_with(merge, full, rel, lambda tmp: os.link(src, tmp, follow_symlinks=False))


def _finish_deferred_link(merge: _Merge, link: _DeferredLink) -> None:
    """A hardlink to a file of an older layer or of the image: link if it is still that file."""
    d = merge.decided.get(link.target)
    if d is not None and d[0] > link.layer:
        raise CorruptLayer(
            f"hardlink {link.path!r} -> {link.target!r} refers to content a newer layer replaced"
        )
    _check_link_target(merge, link.target, link.path)
    head = link.path.rpartition("/")[0]
    if head:
        _ensure_parents(merge, link.path, head, link.layer)
    _hardlink(
        merge, os.path.join(merge.root, link.target), os.path.join(merge.root, link.path), link.path
    )


def _relink_overridden(
    merge: _Merge, source: LayerFile, layer: int, pending: dict[str, list[_DeferredLink]]
) -> None:
    """Second read of one layer for hardlinks whose target a newer layer replaced."""
    with source.open() as f, LayerReader(f, name=f"layer {layer + 1}") as reader:
        for m in reader.members():
            if m.type not in _REG_TYPES:
                continue
            try:
                name = clean_member_name(m.name)
            except UnsafeLayer:
                continue
            links = pending.pop(name, None)
            if not links:
                continue
            first = links[0]
            full_first = os.path.join(merge.root, first.path)
            _write_file(merge, reader, m, full_first, first.path, first.path.rpartition("/")[0])
            for other in links[1:]:
                _hardlink(merge, full_first, os.path.join(merge.root, other.path), other.path)
    if pending:
        missing = ", ".join(sorted(pending))
        raise CorruptLayer(f"layer {layer + 1}: hardlink targets not found: {missing}")


def _apply_dir_metadata(merge: _Merge) -> None:
    for rel, times in merge.dir_times.items():
        if rel not in merge.dir_meta:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.utime(os.path.join(merge.root, rel), ns=times, follow_symlinks=False)
    for rel in sorted(merge.dir_meta, key=lambda p: p.count("/"), reverse=True):
        m = merge.dir_meta[rel]
        full = os.path.join(merge.root, rel)
        s = _lstat_or_none(full)
        if s is None or not st.S_ISDIR(s.st_mode):
            continue  # removed again by a whiteout of the same layer
        # A directory this restore made has nothing of its own, unless inherited.
        made = rel in merge.made_dirs and rel not in merge.inherit
        if not made:
            try:
                existing = os.listxattr(full, follow_symlinks=False)
            except OSError:
                existing = []
            for k in existing:
                if k not in m.xattrs:
                    with contextlib.suppress(OSError):
                        os.removexattr(full, k, follow_symlinks=False)
        owned = made and (m.uid, m.gid) == merge.ids
        _set_meta_path(merge, full, m, chown=not owned)


def _protected(protected: tuple[str, ...], path: str, head: str, base: str, m: tf.Member) -> bool:
    """Whether the entry is at or below a protected path (skip it); one that would
    replace, remove or hardlink into such a path from elsewhere is refused."""
    if base == tf.OPAQUE_WHITEOUT:
        target = head
    elif base.startswith(tf.WHITEOUT_PREFIX):
        target = f"{head}/{base[len(tf.WHITEOUT_PREFIX) :]}".lstrip("/")
    else:
        target = path
    removes = base.startswith(tf.WHITEOUT_PREFIX) or m.type != tf.DIRTYPE
    link = clean_member_name(m.linkname) if m.type == tf.LNKTYPE else ""
    for p in protected:
        if target == p or target.startswith(p + "/"):
            return True
        if (removes and p.startswith(target + "/")) or link == p or link.startswith(p + "/"):
            raise UnsafeLayer(f"refused {m.name!r}: it would change the agent's own {p!r}")
    return False
