"""Apply a chain of layers to a root in one merged pass.

Layers are read newest first and each path is written once, by the newest
layer that has it; older entries at that path, or below a newer non-directory,
whiteout or opaque directory, are skipped without touching the disk.  Directory
metadata is applied last, deepest first, so creating children can't disturb it.

Nothing is ever written, linked, removed or listed through a symlink: every
system call names its entry by a directory fd and one name, and the fds come
from ``RootDirs``, which opens each component without following a symlink, at
the moment the entry is applied (a parent that an earlier entry or layer made a
symlink is refused, however it got there).  Names with ``..`` or a leading
``/`` are refused, and so are device nodes and relative symlinks that climb
above the root.  What a layer declares is charged against the root's free space
before it is written (``FreeSpace``).

An entry that replaces something already there is written under a temporary
name and renamed into place, so the old file stays whole until the new one is;
a new file is created under its own name (``O_EXCL``, which never follows a
symlink) and removed again if writing it fails, so a failed restore never leaves
a partly written file under its final name.  System calls that would not change
anything (``fchown`` to the restoring user, ``fchmod`` to the mode the file was
created with) are left out: per-file cost is what a restore pays over ``tar -x``.

Runs of plain new files of one directory in the newest layer, most of a
software install, are written by the compiled ``_untar`` in one call each
(``_write_run`` says when), which decides nothing and stops at anything else.

Where the disk blocks on every write, the work on a file that is decided and
opened (its content, metadata and close) goes to writer threads
(``writers.py``), several files at once; every decision stays here, in order,
and any later entry that touches a path with work in flight waits for it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat as st
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from agent.checkpoint import tarformat as tf
from agent.checkpoint.diskspace import FreeSpace
from agent.checkpoint.layer_reader import LayerReader
from agent.checkpoint.merge import (
    DIR,
    REG_TYPES,
    Entry,
    Link,
    MergeRules,
    SkippedFiles,
    Whiteout,
    merge_order,
    targets_read_again,
)
from agent.checkpoint.merge import whiteout_target as _whiteout_target
from agent.checkpoint.metadata import chown, finish_file, set_xattrs
from agent.checkpoint.paths import RESTORE_TEMP_PREFIX as _TMP_PREFIX
from agent.checkpoint.paths import clean_member_name, parents, symlink_escapes
from agent.checkpoint.rootdirs import RootDirs, fd_path, open_dir_at
from agent.checkpoint.writers import FileJob, WritePolicy, Writers
from agent.errors import CorruptLayer, UnsafeLayer

_Writer = Callable[..., tuple[int, list[str], int]]
_write_files: _Writer | None
try:
    from agent.checkpoint._untar import write_files as _write_files
except ImportError:  # not built (a source tree without a compiler): every entry is the pass's
    _write_files = None

_REG_TYPES = REG_TYPES
DEFAULT_WRITING = WritePolicy()
# Our writer's mtime-only PAX header blocks, by record length, for _untar to compare.
_BY_LENGTH = {n: block for block, n in tf.MTIME_PAX_BLOCKS.items()}
_PAX_BLOCKS = b"".join(_BY_LENGTH[n] for n in range(min(_BY_LENGTH), max(_BY_LENGTH) + 1))
# Files one call of _untar writes at most: progress is reported between calls.
RUN_FILES = 256

# (entries done, entries total, uncompressed bytes done, uncompressed bytes total)
ApplyProgress = Callable[[int, int, int, int], None]


@dataclass(slots=True)
class RestoreStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    handed_over: int = 0  # files finished by writer threads (the disk blocked)


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


class _JobFailed(Exception):
    """A writer's job failed: ``error`` is what the restore raises, naming that
    job's entry (not the entry being applied when it was found)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class _Merge:
    root: str
    dirs: RootDirs
    space: FreeSpace
    writers: Writers
    # Which entry wins and what is hidden (shared with the squash); that the
    # directories it notes are real directories is RootDirs' to check.
    rules: MergeRules = field(default_factory=MergeRules)
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
    layer_name: str = ""  # the layer being applied, for the errors of its files


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
    reserve: int | None = None,
    protected: Sequence[str] = (),
    writing: WritePolicy = DEFAULT_WRITING,
    continues: Sequence[bool] = (),
) -> RestoreStats:
    """Apply a chain of layers (local verified files, oldest first) to ``root``.

    ``layers`` is the list of files, or their count with ``fetch(index)``
    returning each file when it is ready (it may block while it downloads);
    a ``LayerFile`` with a digest is verified as it is read;
    they are asked for in ``merge_order(count, continues)``: newest layer
    first, the segments of a cut one (``continues``) in their order.
    ``totals`` is (entries, uncompressed bytes) of the whole chain when known,
    for progress reports.  ``reserve`` is how many bytes of the root's
    filesystem are kept free (by default 2% of it, at most 256 MiB):
    ``NoSpace`` before an entry would eat into them.
    Entries at or below a ``protected`` root-relative path are skipped, and
    one that would replace or remove such a path from above is refused.
    ``writing`` says how many writer threads may finish files, and when.
    """
    if isinstance(layers, int):
        if fetch is None:
            raise ValueError("fetch is required with a layer count")
        count, get = layers, fetch
    else:
        files = list(layers)
        count, get = len(files), files.__getitem__
    with RootDirs(str(root)) as dirs:
        writers = Writers(writing, lambda job: _land(merge, job))
        merge = _Merge(
            root=str(root),
            dirs=dirs,
            space=FreeSpace(dirs.root_fd, reserve, lambda: writers.bytes),
            writers=writers,
            protected=tuple(protected),
        )
        try:
            if _inherits(os.fstat(dirs.root_fd).st_mode, dirs.root_fd):
                merge.inherit.add("")
            return _apply_all(merge, merge_order(count, continues), count, get, totals, progress)
        except _JobFailed as e:
            raise e.error from e.error.__cause__
        finally:
            writers.close(lambda job: _abandon(merge, job))


def _apply_all(
    merge: _Merge,
    order: list[range],
    count: int,
    get: Callable[[int], Path | LayerFile],
    totals: tuple[int, int],
    progress: ApplyProgress | None,
) -> RestoreStats:
    base_bytes = 0
    trim = merge.dirs.trim
    for blobs in order:
        # One layer to the rules, however many segments it was stored as: its
        # hardlinks may name a file of an earlier segment.
        index = blobs.start
        pending: dict[str, list[_DeferredLink]] = {}
        skipped_files = SkippedFiles()
        older = blobs.stop < count
        sources: list[LayerFile] = []
        entries = merge.stats.entries
        for part, blob in enumerate(blobs):
            src = get(blob)
            layer = src if isinstance(src, LayerFile) else LayerFile(src)
            sources.append(layer)
            skipped_files.part = part
            name = merge.layer_name = f"layer {blob + 1} of {count}"
            with layer.open() as f, LayerReader(f, name, layer.digest, layer.size) as reader:
                for m in reader.members():
                    try:
                        more = _apply_member(merge, reader, m, index, older, pending, skipped_files)
                    except OSError as e:
                        raise _entry_error(merge, e, m.name, name) from e
                    trim()
                    before, entries = entries, entries + 1 + more
                    if progress is not None and (before >> 8) != (entries >> 8):
                        progress(entries, totals[0], base_bytes + reader.consumed, totals[1])
                merge.writers.drain()
                base_bytes += reader.consumed
        merge.stats.entries = entries
        if pending:
            again = skipped_files.parts(pending.keys(), len(sources))
            _relink_overridden(merge, [(index + i, sources[i]) for i in again], index, pending)
    for link in merge.deferred:
        try:
            _finish_deferred_link(merge, link)
        except OSError as e:
            raise _entry_error(merge, e, link.path, f"layer {link.layer + 1}") from e
        trim()
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


def _entry_error(merge: _Merge, e: OSError, entry: str, layer: str) -> OSError:
    """The machine's error (a full disk, a read-only mount...) naming the entry's
    path: the calls name an fd and a bare name, which say nothing."""
    where = f"{merge.root.rstrip('/')}/{entry}"
    return OSError(e.errno, f"{e.strerror or e} (restoring {layer})", where)


# -- the merge rules ----------------------------------------------------------------


def _apply_member(
    merge: _Merge,
    reader: LayerReader,
    m: tf.Member,
    layer: int,
    older: bool,
    pending: dict[str, list[_DeferredLink]],
    skipped_files: SkippedFiles,
) -> int:
    """Apply ``m``: how many entries after it were applied with it (``_write_run``)."""
    path = clean_member_name(m.name)
    head, _, base = path.rpartition("/")
    if merge.protected and _protected(merge.protected, path, head, base, m):
        merge.stats.skipped += 1
        return 0
    if merge.writers.pending:  # what this entry is at or below is finished first
        merge.writers.settle_path(path)
    rules = merge.rules
    if base.startswith(tf.WHITEOUT_PREFIX):
        _apply_whiteout(merge, head, base, layer, older, m.name)
        return 0
    kind = m.type
    verdict = rules.entry(path, kind, layer, older)
    if verdict:
        merge.stats.skipped += 1
        if kind in _REG_TYPES:
            skipped_files.add(path)  # a hardlink of this layer may still need it
        if verdict is Entry.SKIP_RESET:
            _hide_below(merge, path, layer)
        return 0
    merge.space.charge(m.size, path)
    pfd = _parent_fd(merge, path, head, layer) if head else merge.dirs.root_fd
    if kind in _REG_TYPES:
        _write_file(merge, reader, m, pfd, base, path, head)
        merge.stats.files += 1
    elif kind == tf.DIRTYPE:
        _make_dir(merge, pfd, base, path)
        merge.dir_meta[path] = m
    elif kind == tf.LNKTYPE:
        target = clean_member_name(m.linkname)
        how = rules.link(target, layer, skipped_files)
        if how is Link.HERE:
            tfd, tname = _link_target(merge, target, path)
            _hardlink(merge, tfd, tname, pfd, base, path)
        elif how is Link.AGAIN:
            # The target's content in this layer was overridden or hidden by a
            # newer one: read it again from this layer after the pass.
            pending.setdefault(target, []).append(_DeferredLink(path, target, layer, m))
        else:
            merge.deferred.append(_DeferredLink(path, target, layer, m))
    elif kind == tf.SYMTYPE:
        if symlink_escapes(path, m.linkname):
            raise UnsafeLayer(
                f"refused symlink {path!r} -> {m.linkname!r}: it climbs above the root"
            )
        _replace_with(merge, pfd, base, path, lambda n: os.symlink(m.linkname, n, dir_fd=pfd))
        _set_symlink_meta(merge, pfd, base, path, m)
    elif kind == tf.FIFOTYPE:
        _replace_with(
            merge, pfd, base, path, lambda n: os.mkfifo(n, 0o600, dir_fd=pfd), fifo_meta=m
        )
    rules.written(path, kind, layer)
    if kind in _REG_TYPES and not older and _write_files is not None:
        return _write_run(merge, reader, pfd, head, layer)
    return 0


def _write_run(merge: _Merge, reader: LayerReader, pfd: int, head: str, layer: int) -> int:
    """After a file of the newest layer written in ``head`` (the directory fd
    ``pfd``): the plain new files that follow it there, written by ``_untar``
    in one call, and how many.

    In the newest layer every regular file is written (``MergeRules.entry``),
    so a run needs no decision of its own, as long as each file is new in the
    directory (which ``_untar`` checks with ``O_EXCL``) and written as this
    pass would write it: not while writer threads hold files, not where the
    directory hands down its group or an ACL, not where a protected path is
    at or below the directory, and within the free-space budget."""
    writers = merge.writers
    if (
        writers.active
        or writers.pending
        or (merge.inherit and head in merge.inherit)
        or not head.isascii()
        or _protected_dir(merge.protected, head)
    ):
        return 0
    assert _write_files is not None
    budget_bytes, budget_inodes = merge.space.budget()
    t0 = time.perf_counter() if writers.sampling else 0.0
    names, content = reader.write_run(
        _write_files, pfd, f"{head}/".encode() if head else b"", _PAX_BLOCKS,
        budget_bytes, budget_inodes, *merge.ids, merge.umask, merge.is_root, RUN_FILES,
    )  # fmt: skip
    n = len(names)
    if n:
        merge.space.charged(content, n)
        merge.rules.written_files(names, layer)
        merge.stats.files += n
        if t0:
            writers.observe_run(time.perf_counter() - t0, n, content)
    return n


def _apply_whiteout(merge: _Merge, head: str, base: str, layer: int, older: bool, raw: str) -> None:
    rules = merge.rules
    target = _whiteout_target(head, base, raw)
    if target is None:
        if rules.opaque_whiteout(head, layer, older):
            _hide_below(merge, head, layer, raw)
        return
    verdict = rules.whiteout(target, layer, older)
    if verdict is Whiteout.RESET:
        _hide_below(merge, target, layer)
    elif verdict is Whiteout.REMOVE:
        pfd = merge.dirs.get(head, raw) if head else merge.dirs.root_fd
        if pfd is not None:  # else nothing is there to delete
            _remove(merge, pfd, target.rpartition("/")[2], target)


def _hide_below(merge: _Merge, rel_dir: str, layer: int, what: str = "") -> None:
    """Everything below ``rel_dir`` from the image or layers older than ``layer`` is gone."""
    _prune_undecided(merge, rel_dir, layer, what or rel_dir)
    merge.rules.reset(rel_dir, layer)


def _prune_undecided(merge: _Merge, rel_dir: str, layer: int, what: str) -> None:
    """Delete what lies below ``rel_dir`` unless this or a newer layer wrote it.

    ``rel_dir`` itself and its parents must be real directories (a symlink among
    them is refused); the subdirectories a newer layer made are opened the same
    way, outside the cache (a prune may visit many)."""
    merge.writers.settle_below(rel_dir)  # no temporary of a job in flight is listed
    fd = merge.dirs.get(rel_dir, what)
    if fd is not None:
        _prune_in(merge, fd, rel_dir, layer, what)


def _prune_in(merge: _Merge, fd: int, rel_dir: str, layer: int, what: str) -> None:
    for name in os.listdir(fd):
        rel = f"{rel_dir}/{name}"
        d = merge.rules.decision(rel)
        if d is None or d[0] < layer:
            _remove(merge, fd, name, rel)
        elif d[1] == DIR:
            sub = open_dir_at(fd, name, rel, what)
            if sub is not None:
                try:
                    _prune_in(merge, sub, rel, layer, what)
                finally:
                    os.close(sub)


# -- filesystem operations: a directory fd and one name, never a path ---------------------


def _parent_fd(merge: _Merge, path: str, head: str, layer: int) -> int:
    """The fd of ``head``, the directory ``path`` is in, made (with its parents) a
    real directory where it is missing or image content; note that ``layer``
    writes below them."""
    used = merge.rules.used_dirs
    dirs = merge.dirs
    prev = used.get(head)
    fd = dirs.cached(head)
    if prev is not None and fd is not None:  # the common case: the last entry's directory
        if layer > prev:
            for a in parents(path):
                if used.get(a, -1) < layer:
                    used[a] = layer
        return fd
    pfd = dirs.root_fd
    for a in parents(path):
        fd = dirs.cached(a)
        if fd is None:
            fd = dirs.child(pfd, a, path)
            if fd is None:
                fd = _make_parent(merge, pfd, a, path)
            elif a not in used:
                s = os.fstat(fd)
                merge.dir_times[a] = (s.st_atime_ns, s.st_mtime_ns)
                if _inherits(s.st_mode, fd):
                    merge.inherit.add(a)
        if used.get(a, -1) < layer:
            used[a] = layer
        pfd = fd
    return pfd


def _make_parent(merge: _Merge, pfd: int, rel: str, path: str) -> int:
    """Make ``rel`` (missing, or not a directory) a directory for ``path`` to go in."""
    name = rel.rpartition("/")[2]
    s = _lstat_or_none(pfd, name)
    if s is not None:
        if merge.rules.decision(rel) is not None:
            raise CorruptLayer(f"refused {path!r}: its parent {rel!r} is not a directory")
        # Content of the image that an older layer replaces by a directory.
        os.unlink(name, dir_fd=pfd)
    _mkdir(merge, pfd, name, rel, 0o755)
    fd = merge.dirs.child(pfd, rel, path)
    if fd is None:
        raise CorruptLayer(f"refused {path!r}: its parent {rel!r} vanished as it was made")
    return fd


def _forget_dirs_below(merge: _Merge, rel: str) -> None:
    prefix = rel + "/"
    merge.dirs.forget(rel)
    used = merge.rules.used_dirs
    if rel in used:
        for k in [k for k in used if k == rel or k.startswith(prefix)]:
            del used[k]
    if merge.inherit:
        merge.inherit -= {k for k in merge.inherit if k == rel or k.startswith(prefix)}


def _remove(merge: _Merge, pfd: int, name: str, rel: str) -> None:
    merge.writers.settle_below(rel)
    s = _lstat_or_none(pfd, name)
    if s is None:
        return
    if st.S_ISDIR(s.st_mode):
        shutil.rmtree(name, dir_fd=pfd)  # fd-based, never follows a symlink
        _forget_dirs_below(merge, rel)
    else:
        os.unlink(name, dir_fd=pfd)


def _inherits(mode: int, fd: int) -> bool:
    """Whether new entries in this directory get its group or an ACL's mode bits."""
    if mode & st.S_ISGID:
        return True
    try:
        os.getxattr(fd, "system.posix_acl_default")
    except OSError:  # none, or a filesystem without ACLs
        return False
    return True


def _mkdir(merge: _Merge, pfd: int, name: str, rel: str, mode: int) -> None:
    os.mkdir(name, mode, dir_fd=pfd)
    merge.made_dirs.add(rel)
    if merge.inherit and rel.rpartition("/")[0] in merge.inherit:
        merge.inherit.add(rel)  # the setgid bit and a default ACL are handed down


def _make_dir(merge: _Merge, pfd: int, name: str, rel: str) -> None:
    try:
        _mkdir(merge, pfd, name, rel, 0o700)
        return
    except FileExistsError:
        s = os.lstat(name, dir_fd=pfd)
    if st.S_ISDIR(s.st_mode):
        fd = merge.dirs.cached(rel) or merge.dirs.child(pfd, rel, rel)  # its entries need it
        if fd is not None and _inherits(s.st_mode, fd):
            merge.inherit.add(rel)
        return
    os.unlink(name, dir_fd=pfd)
    _mkdir(merge, pfd, name, rel, 0o700)


def _tmp_name(merge: _Merge) -> str:
    merge.seq += 1
    return f"{_TMP_PREFIX}{merge.pid}-{merge.seq}"


def _replace_with(
    merge: _Merge,
    pfd: int,
    name: str,
    rel: str,
    create: Callable[[str], None],
    fifo_meta: tf.Member | None = None,
    made: Callable[[], bool] | None = None,
) -> None:
    """Create a new entry ``name`` in ``pfd``, or, when something is there
    already, under a temporary name renamed over it; unless ``made`` says what
    is there is already what ``create`` would make."""
    try:
        create(name)
        tmp = None
    except FileExistsError:
        if made is not None and made():
            return
        while True:
            tmp = _tmp_name(merge)
            try:
                create(tmp)
                break
            except FileExistsError:
                continue
    try:
        if fifo_meta is not None:
            _set_fifo_meta(merge, pfd, tmp or name, rel, fifo_meta)
        if tmp is not None:
            _rename_over(merge, pfd, tmp, name, rel)
    except BaseException:
        _unlink_quiet(pfd, tmp or name)
        raise


def _rename_over(merge: _Merge, pfd: int, tmp: str, name: str, rel: str) -> None:
    try:
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except OSError as e:
        if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        _remove(merge, pfd, name, rel)
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)


def _unlink_quiet(pfd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=pfd)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_OPEN_FIFO = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_file(
    merge: _Merge,
    reader: LayerReader,
    m: tf.Member,
    pfd: int,
    name: str,
    rel: str,
    head: str,
) -> None:
    mode = m.mode & 0o7777
    # Special bits are set only after the owner (chown clears them); until then,
    # and for a file that replaces another, the new file is private.
    create_mode = mode if mode <= 0o777 else 0o600
    writers = merge.writers
    hand_over = writers.takes(m.size)
    if hand_over:
        writers.room(m.size)  # before the fd: files in flight are bounded
    tmp = None
    try:
        fd = os.open(name, _CREATE, create_mode, dir_fd=pfd)
    except FileExistsError:
        create_mode = 0o600
        while True:
            tmp = _tmp_name(merge)
            try:
                fd = os.open(tmp, _CREATE, create_mode, dir_fd=pfd)
                break
            except FileExistsError:
                continue
    inherited = merge.inherit and head in merge.inherit
    uid, gid = merge.ids
    owner = bool(inherited or m.uid != uid or m.gid != gid)
    new_mode = mode if inherited or mode != create_mode & ~merge.umask else None
    try:
        if hand_over:
            data = reader.take(m.size) if m.size else []
            writers.start()  # here, where a thread that cannot start leaves nothing behind
        else:
            _write_here(merge, reader, m, fd, rel, owner, new_mode)
    except BaseException:
        if hand_over:
            os.close(fd)
        _unlink_quiet(pfd, tmp or name)
        raise
    if hand_over:
        merge.dirs.hold(pfd)  # the job lands in it, by name
        where = merge.layer_name
        writers.submit(
            FileJob(fd, pfd, name, tmp, rel, where, m, data, owner, new_mode, merge.is_root)
        )
        merge.stats.handed_over += 1
    elif tmp is not None:
        try:
            _rename_over(merge, pfd, tmp, name, rel)
        except BaseException:
            _unlink_quiet(pfd, tmp)
            raise


def _write_here(
    merge: _Merge,
    reader: LayerReader,
    m: tf.Member,
    fd: int,
    rel: str,
    owner: bool,
    mode: int | None,
) -> None:
    """Content, metadata and close of a file, on this thread; timed while the
    writers wait to see whether the disk blocks (a wait for decompressed bytes
    now and then is in it too, which a window's median leaves out)."""
    writers = merge.writers
    t0 = time.perf_counter() if writers.sampling else 0.0
    try:
        if m.size:
            reader.copy_to(fd, m.size)
        finish_file(fd, m, rel, owner, mode, merge.is_root)
    finally:
        os.close(fd)
    if t0:
        writers.observe(time.perf_counter() - t0, m.size)


def _land(merge: _Merge, job: FileJob) -> None:
    """A writer's job is done: rename its temporary into place, or remove what it
    made and raise its error, naming its entry."""
    try:
        if job.error is not None:
            _unlink_quiet(job.pfd, job.tmp or job.name)
            raise job.error
        if job.tmp is not None:
            try:
                _rename_over(merge, job.pfd, job.tmp, job.name, job.rel)
            except BaseException:
                _unlink_quiet(job.pfd, job.tmp)
                raise
    except _JobFailed:  # another job's, landed on the way (a removal settles what it removes)
        raise
    except OSError as e:
        error = _entry_error(merge, e, job.rel, job.layer)
        error.__cause__ = e
        raise _JobFailed(error) from e
    except BaseException as e:
        raise _JobFailed(e) from e
    finally:
        merge.dirs.release(job.pfd)


def _abandon(merge: _Merge, job: FileJob) -> None:
    """A job still in flight when the restore failed: a file it wrote whole under
    its own name stays (as every file before the failure does), anything else it
    made goes, so no partly written file and no temporary is left."""
    try:
        if job.error is not None or job.tmp is not None:
            _unlink_quiet(job.pfd, job.tmp or job.name)
    finally:
        merge.dirs.release(job.pfd)


def _chown(merge: _Merge, target: int | str, m: tf.Member) -> None:
    chown(target, m.uid, m.gid, merge.is_root)


def _set_fifo_meta(merge: _Merge, pfd: int, name: str, rel: str, m: tf.Member) -> None:
    fd = os.open(name, _OPEN_FIFO, dir_fd=pfd)  # the FIFO just made: no writer to wait for
    try:
        _chown(merge, fd, m)
        os.fchmod(fd, m.mode & 0o7777)
        set_xattrs(fd, m, rel)
        os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
    finally:
        os.close(fd)


def _set_symlink_meta(merge: _Merge, pfd: int, name: str, rel: str, m: tf.Member) -> None:
    try:
        os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
    except PermissionError:
        if merge.is_root:
            raise
    if m.xattrs:  # no dir_fd form: /proc names the directory by its fd
        set_xattrs(fd_path(pfd, name), m, rel, follow=False)
    os.utime(name, ns=(m.mtime_ns, m.mtime_ns), dir_fd=pfd, follow_symlinks=False)


def _link_target(merge: _Merge, target: str, path: str) -> tuple[int, str]:
    """The directory fd and name of a hardlink's target: an existing non-directory
    inside the root, reached without a symlink, and whole: work in flight on it
    (or above it) is finished first."""
    merge.writers.settle_path(target)
    head, _, name = target.rpartition("/")
    try:
        tfd = merge.dirs.get(head, path) if head else merge.dirs.root_fd
    except UnsafeLayer:
        tfd = None
    if tfd is None:
        raise UnsafeLayer(
            f"refused hardlink {path!r} -> {target!r}: the target is not inside the root"
        )
    s = _lstat_or_none(tfd, name)
    if s is None:
        raise CorruptLayer(f"hardlink {path!r} -> {target!r}: the target does not exist")
    if st.S_ISDIR(s.st_mode):
        raise UnsafeLayer(f"refused hardlink {path!r} -> {target!r}: the target is a directory")
    return tfd, name


def _lstat_or_none(pfd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=pfd)
    except FileNotFoundError:
        return None


def _hardlink(merge: _Merge, tfd: int, tname: str, pfd: int, name: str, rel: str) -> None:
    """Link ``name`` to the target.  A name that is a link of the target already
    (a link to itself, or the same link twice) is left as it is: rename(2) of
    one link of a file over another of the same file does nothing, which would
    leave the temporary beside it."""

    def linked() -> bool:
        there, target = _lstat_or_none(pfd, name), _lstat_or_none(tfd, tname)
        return (
            there is not None
            and target is not None
            and (there.st_dev, there.st_ino) == (target.st_dev, target.st_ino)
        )

    _replace_with(
        merge,
        pfd,
        name,
        rel,
        lambda n: os.link(tname, n, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False),
        made=linked,
    )


def _link_parent(merge: _Merge, link: _DeferredLink) -> int:
    """The directory of a hardlink made after its layer's pass, checked again now:
    since the link was read, a later entry may have made it a symlink."""
    head = link.path.rpartition("/")[0]
    return _parent_fd(merge, link.path, head, link.layer) if head else merge.dirs.root_fd


def _finish_deferred_link(merge: _Merge, link: _DeferredLink) -> None:
    """A hardlink to a file of an older layer or of the image: link if it is still that file."""
    merge.rules.check_late_link(link.path, link.target, link.layer)
    tfd, tname = _link_target(merge, link.target, link.path)
    pfd = _link_parent(merge, link)
    _hardlink(merge, tfd, tname, pfd, link.path.rpartition("/")[2], link.path)


def _relink_overridden(
    merge: _Merge,
    sources: list[tuple[int, LayerFile]],
    layer: int,
    pending: dict[str, list[_DeferredLink]],
) -> None:
    """Second read of one layer (those of its segments, by blob index, that hold
    the targets) for hardlinks whose target a newer layer replaced."""
    for blob, source in sources:
        name = merge.layer_name = f"layer {blob + 1}"
        with source.open() as f, LayerReader(f, name=name) as reader:
            for m, links in targets_read_again(reader, pending):
                try:
                    _relink(merge, reader, m, links)
                except OSError as e:
                    raise _entry_error(merge, e, links[0].path, name) from e
                merge.dirs.trim()
            merge.writers.drain()
        if not pending:
            return
    missing = ", ".join(sorted(pending))
    raise CorruptLayer(f"layer {layer + 1}: hardlink targets not found: {missing}")


def _relink(merge: _Merge, reader: LayerReader, m: tf.Member, links: list[_DeferredLink]) -> None:
    """Write the content once, under the first link's name; link the others to it."""
    first = None
    for link in links:
        merge.writers.settle_path(link.path)
        pfd = _link_parent(merge, link)
        name = link.path.rpartition("/")[2]
        if first is None:
            merge.space.charge(m.size, link.path)
            _write_file(merge, reader, m, pfd, name, link.path, link.path.rpartition("/")[0])
            first = link.path
        else:
            tfd, tname = _link_target(merge, first, link.path)
            _hardlink(merge, tfd, tname, pfd, name, link.path)


def _dir_fd_or_none(merge: _Merge, rel: str) -> int | None:
    """A directory that a later entry may have removed or replaced (by a symlink
    too): its metadata is then no longer ours to set."""
    try:
        return merge.dirs.get(rel, rel)
    except UnsafeLayer:
        return None


def _apply_dir_metadata(merge: _Merge) -> None:
    trim = merge.dirs.trim
    for rel, times in merge.dir_times.items():
        if rel not in merge.dir_meta:
            fd = _dir_fd_or_none(merge, rel)
            if fd is not None:
                try:
                    os.utime(merge.dirs.meta_target(fd), ns=times)
                except OSError as e:
                    raise _entry_error(merge, e, rel, "directory times") from e
                trim()
    for rel in sorted(merge.dir_meta, key=lambda p: p.count("/"), reverse=True):
        m = merge.dir_meta[rel]
        fd = _dir_fd_or_none(merge, rel)
        if fd is None:
            continue  # removed again by a whiteout of the same layer
        try:
            _set_dir_meta(merge, merge.dirs.meta_target(fd), rel, m)
        except OSError as e:
            raise _entry_error(merge, e, rel, "directory metadata") from e
        trim()


def _set_dir_meta(merge: _Merge, target: int | str, rel: str, m: tf.Member) -> None:
    # A directory this restore made has nothing of its own, unless inherited.
    made = rel in merge.made_dirs and rel not in merge.inherit
    if not made:
        try:
            existing = os.listxattr(target)
        except OSError:
            existing = []
        for k in existing:
            if k not in m.xattrs:
                with contextlib.suppress(OSError):
                    os.removexattr(target, k)
    if not (made and (m.uid, m.gid) == merge.ids):
        _chown(merge, target, m)
    os.chmod(target, m.mode & 0o7777)
    set_xattrs(target, m, rel)
    os.utime(target, ns=(m.mtime_ns, m.mtime_ns))


def _protected_dir(protected: tuple[str, ...], rel_dir: str) -> bool:
    """Whether a protected path is ``rel_dir``, above it or below it: whether
    ``_protected`` may have something to say about an entry in it."""
    inside = f"{rel_dir}/" if rel_dir else ""
    return any(
        rel_dir == p or rel_dir.startswith(p + "/") or p.startswith(inside) for p in protected
    )


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
