"""The embedded default store: a directory on a local (or mounted) filesystem.

Blobs are written under a temporary name and renamed into place, so a reader
never sees a partial blob; refs and leases are replaced atomically under an
exclusive ``flock`` so compare-and-swap holds between processes on one machine.
A lease is created by ``link(2)``, which like ``O_EXCL`` fails when the name
exists, and publishes the lease whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import BlobMissing, DigestMismatch, PermissionDenied, RefConflict, StoreError
from agent.store.base import CHECKPOINTS_DIR, BlobInfo, Lease, Leftover, RefValue, Store
from agent.store.checks import (
    check_expect,
    check_size,
    hex_of,
    is_blob_name,
    lease_parts,
    lease_tag,
    verify_file,
)
from agent.store.refs import (
    MAX_REF_BYTES,
    InvalidRef,
    decode_ref,
    encode_ref,
    ref_path_parts,
    skip_invalid,
)

T = TypeVar("T")

# Blobs listed per page: what a listing holds at a time.
PAGE = 1000


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None


class LocalStore(Store):
    def __init__(self, workdir: Path) -> None:
        self.root = Path(workdir) / CHECKPOINTS_DIR
        self.url = str(self.root)
        self._blobs = self.root / "blobs" / "sha256"
        self._refs = self.root / "refs"
        self._tmp = self.root / "tmp"
        self._leases = self.root / "leases"
        # A local fetch waits on the disk and on hashing, not on round trips, so
        # a few at a time keep both busy and more would not help.  4 is what a
        # restore from a local store has always run (the S3 default).
        self.fetch_concurrency = 4

    async def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking file work off the event loop; an OS error becomes a store error
        that says what failed and where (a full disk, a read-only mount...)."""
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as e:
            reason = e.strerror or str(e)
            if isinstance(e, PermissionError):
                raise PermissionDenied(f"cannot {what} in {self.root}: {reason}") from e
            raise StoreError(f"cannot {what} in {self.root}: {reason}") from e

    def _blob_path(self, digest: str) -> Path:
        return self._blobs / hex_of(digest)

    def _ensure_layout(self) -> None:
        for d in (self._blobs, self._refs, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            layout.write_text('{"imageLayoutVersion": "1.0.0"}')

    # -- blobs ----------------------------------------------------------------

    async def has_blob(self, digest: str) -> bool:
        return await self._run("look up a blob", self._blob_path(digest).is_file)

    async def blob_size(self, digest: str) -> int | None:
        st = await self._run("look up a blob", _stat_or_none, self._blob_path(digest))
        return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None

    async def put_blob(self, src: Path, digest: str, size: int) -> None:
        await self._run(f"write blob {digest}", self._put_blob, src, digest, size)

    def keeps_staged(self, directory: Path) -> bool:
        # renamed when on the store's filesystem (the store's directory, or its
        # nearest parent that exists yet)
        there = self.root
        while not there.exists() and there != there.parent:
            there = there.parent
        try:
            return os.stat(directory).st_dev == os.stat(there).st_dev
        except OSError:
            return False

    def _put_blob(self, src: Path, digest: str, size: int) -> None:
        final = self._blob_path(digest)
        if final.is_file():
            try:
                os.utime(final)  # refreshed: gc's grace period starts again
            except FileNotFoundError:  # collected between the two calls: write it
                pass
            else:
                src.unlink(missing_ok=True)
                return
        self._ensure_layout()
        tmp = self._tmp / f"{final.name}.{uuid.uuid4().hex}"
        # The partial blob is flock'ed while it exists under tmp/, so the sweep
        # of another process can tell it from one a killed writer left.
        fd = _locked_open(src, os.O_RDONLY)
        try:
            try:
                os.rename(src, tmp)  # the lock is the inode's: it comes along
            except OSError:  # another filesystem: copy, then fsync
                os.close(fd)
                fd = _locked_open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
                with open(src, "rb") as f_in, open(fd, "wb", closefd=False) as f_out:
                    shutil.copyfileobj(f_in, f_out, 1 << 20)
                src.unlink(missing_ok=True)
            os.fsync(fd)
            found = os.fstat(fd).st_size
            if found != size:
                raise DigestMismatch(f"blob {digest}: {found} bytes, expected {size}")
            os.rename(tmp, final)
            _fsync_dir(self._blobs)
        finally:
            tmp.unlink(missing_ok=True)
            os.close(fd)

    async def clear_leftovers(self, uploads: Sequence[str] = ()) -> int:
        # A spooled blob left nothing here by name: partial blobs are found by their locks.
        return await self._run("clear partial blobs", self._clear_leftovers)

    def _clear_leftovers(self) -> int:
        """Partial blobs no live writer holds, and ref files a killed writer never renamed."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._tmp):
                try:
                    fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass  # a live writer's (locked), or gone already
                finally:
                    os.close(fd)
        if not self._refs.is_dir():
            return removed
        fd = self._lock()  # ref files are written under the lock: none is half-way now
        try:
            for studio in os.scandir(self._refs):
                if not studio.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(studio.path):
                    if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                            removed += 1
        finally:
            os.close(fd)
        return removed

    async def get_blob(
        self,
        digest: str,
        size: int | None,
        dest_dir: Path,
        *,
        verify: bool = True,
        on_data: Callable[[Path, int], None] | None = None,
    ) -> Path:
        path = self._blob_path(digest)
        st = await self._run(f"look up blob {digest}", _stat_or_none, path)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise BlobMissing(f"blob {digest} is missing from {self.root}")
        found = st.st_size
        check_size(digest, found, size)
        if verify:
            await self._run(f"read blob {digest}", verify_file, path, digest, size)
        if on_data is not None:
            on_data(path, found)
        return path

    def iter_blobs(self) -> AsyncIterator[list[BlobInfo]]:
        return self._pages(self._blob_pages())

    def _blob_pages(self) -> Iterator[list[BlobInfo]]:
        try:
            it = os.scandir(self._blobs)
        except FileNotFoundError:
            return
        page: list[BlobInfo] = []
        with it:
            for entry in it:
                if not is_blob_name(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                modified = datetime.fromtimestamp(st.st_mtime, UTC)
                page.append(BlobInfo("sha256:" + entry.name, st.st_size, modified))
                if len(page) >= PAGE:
                    yield page
                    page = []
        if page:
            yield page

    async def _pages(self, pages: Iterator[T]) -> AsyncIterator[T]:
        """A blocking iterator's items, each fetched off the event loop."""
        done = object()
        while True:
            item = await self._run("list the store", next, pages, done)
            if item is done:
                return
            yield item

    async def delete_blob(self, digest: str) -> None:
        path = self._blob_path(digest)
        await self._run(f"delete blob {digest}", path.unlink, True)

    # -- refs -----------------------------------------------------------------

    def _ref_file(self, studio: str, name: str) -> Path:
        s, n = ref_path_parts(studio, name)
        return self._refs / s / n

    def _lock(self) -> int:
        self._ensure_layout()
        fd = os.open(self._refs / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    async def get_ref(self, studio: str, name: str) -> RefValue | None:
        return await self._run(f"read ref {studio}/{name}", self._get_ref, studio, name)

    def _get_ref(self, studio: str, name: str) -> RefValue | None:
        path = self._ref_file(studio, name)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_REF_BYTES + 1)
        except FileNotFoundError:
            return None
        return decode_ref(data, f"checkpoint {studio}/{name} at {path}")

    async def set_ref(self, studio: str, name: str, digest: str, expect: str | None) -> None:
        await self._run(f"write ref {studio}/{name}", self._set_ref, studio, name, digest, expect)

    def _set_ref(self, studio: str, name: str, digest: str, expect: str | None) -> None:
        path = self._ref_file(studio, name)
        fd = self._lock()
        try:
            current = self._get_ref(studio, name)
            check_expect(studio, name, current, expect)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
            tmp.write_bytes(encode_ref(RefValue(digest, datetime.now(UTC))))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.rename(tmp, path)
            _fsync_dir(path.parent)
        finally:
            os.close(fd)

    async def delete_ref(self, studio: str, name: str, expect: str) -> None:
        await self._run(f"delete ref {studio}/{name}", self._delete_ref, studio, name, expect)

    def _delete_ref(self, studio: str, name: str, expect: str) -> None:
        fd = self._lock()
        try:
            check_expect(studio, name, self._get_ref(studio, name), expect)
            self._ref_file(studio, name).unlink()
        finally:
            os.close(fd)

    async def list_refs(self, studio: str) -> dict[str, RefValue]:
        return await self._run(f"list the refs of {studio}", self._list_refs, studio)

    def _list_refs(self, studio: str) -> dict[str, RefValue]:
        d = self._ref_file(studio, "x").parent
        out: dict[str, RefValue] = {}
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return out
        for fname in names:
            if fname.startswith("."):
                continue
            try:
                ref = self._get_ref(studio, fname)
            except (InvalidRef, OSError) as e:  # one bad ref must not hide the others
                skip_invalid(e, f"{studio}/{fname}")
                continue
            if ref is not None:
                out[fname] = ref
        return out

    async def exists(self) -> bool:
        return await self._run("look for the store", (self.root / "oci-layout").exists)

    async def list_studios(self) -> list[str]:
        return await self._run("list the studios", self._list_studios)

    def _list_studios(self) -> list[str]:
        try:
            entries = list(os.scandir(self._refs))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            if e.is_dir(follow_symlinks=False) and not e.name.startswith("."):
                with contextlib.suppress(OSError):
                    if any(not n.startswith(".") for n in os.listdir(e.path)):
                        out.append(e.name)
        return sorted(out)

    async def list_ref_names(self, studio: str) -> list[str]:
        d = self._ref_file(studio, "x").parent
        return await self._run(f"list the refs of {studio}", self._names, d, True)

    @staticmethod
    def _names(d: Path, files: bool) -> list[str]:
        """The entries of ``d`` that are files (or directories), dot-names left out."""
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            return []
        with it:
            return [
                e.name
                for e in it
                if not e.name.startswith(".")
                and (e.is_file(follow_symlinks=False) if files else e.is_dir(follow_symlinks=False))
            ]

    # -- leases ---------------------------------------------------------------

    def _lease_file(self, name: str) -> Path:
        return self._leases.joinpath(*lease_parts(name))

    def _lease_lock(self) -> int:
        self._leases.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._leases / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _stage(self, path: Path, body: bytes) -> Path:
        """``body`` in a durable temporary file beside ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    async def create_lease(self, name: str, body: bytes) -> str | None:
        return await self._run(f"create lease {name}", self._create_lease, name, body)

    def _create_lease(self, name: str, body: bytes) -> str | None:
        path = self._lease_file(name)
        fd = self._lease_lock()
        try:
            tmp = self._stage(path, body)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return None
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
            return lease_tag(body)
        finally:
            os.close(fd)

    async def get_lease(self, name: str) -> Lease | None:
        return await self._run(f"read lease {name}", self._get_lease, name)

    def _get_lease(self, name: str) -> Lease | None:
        try:
            body = self._lease_file(name).read_bytes()
        except FileNotFoundError:
            return None
        return Lease(body, lease_tag(body))

    async def replace_lease(self, name: str, body: bytes, expect: str) -> str:
        return await self._run(f"replace lease {name}", self._replace_lease, name, body, expect)

    def _replace_lease(self, name: str, body: bytes, expect: str) -> str:
        path = self._lease_file(name)
        fd = self._lease_lock()
        try:
            current = self._get_lease(name)
            if current is None or current.tag != expect:
                raise RefConflict(f"lease {name} is no longer the one expected")
            tmp = self._stage(path, body)
            os.rename(tmp, path)
            _fsync_dir(path.parent)
            return lease_tag(body)
        finally:
            os.close(fd)

    async def delete_lease(self, name: str, expect: str) -> None:
        await self._run(f"delete lease {name}", self._delete_lease, name, expect)

    def _delete_lease(self, name: str, expect: str) -> None:
        fd = self._lease_lock()
        try:
            current = self._get_lease(name)
            if current is None:
                return
            if current.tag != expect:
                raise RefConflict(f"lease {name} is held by another holder now")
            self._lease_file(name).unlink(missing_ok=True)
        finally:
            os.close(fd)

    async def list_leases(self, prefix: str) -> list[str]:
        return await self._run("list the leases", self._list_leases, prefix)

    def _list_leases(self, prefix: str) -> list[str]:
        top = self._lease_file(prefix)
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self._leases)
            out.extend(str(rel / f) for f in filenames if not f.startswith("."))
        return out

    # -- leftovers ------------------------------------------------------------

    def iter_leftovers(self, before: datetime) -> AsyncIterator[Leftover]:
        return self._leftovers(before)

    async def _leftovers(self, before: datetime) -> AsyncIterator[Leftover]:
        for page in await self._run("list temporary files", self._list_leftovers, before):
            yield page

    def _list_leftovers(self, before: datetime) -> list[Leftover]:
        """Blob uploads never renamed into place, and staged refs and leases a kill
        left (``.<name>.<hex>.tmp``); a lock file is not a leftover."""
        out: list[Leftover] = []
        cutoff = before.timestamp()

        def consider(path: Path) -> None:
            try:
                st = path.lstat()
            except FileNotFoundError:
                return
            if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                started = datetime.fromtimestamp(st.st_mtime, UTC)
                out.append(Leftover(str(path), st.st_size, started, str(path)))

        for d in (self._tmp,):
            for name in self._names(d, True):
                consider(d / name)
        for top in (self._refs, self._leases):
            for dirpath, _dirs, files in os.walk(top):
                for f in files:
                    if f.startswith(".") and f.endswith(".tmp"):
                        consider(Path(dirpath) / f)
        return out

    async def remove_leftover(self, leftover: Leftover) -> None:
        path = Path(leftover.handle)
        if self.root not in path.parents:
            raise StoreError(f"{path} is not a leftover of {self.root}")
        await self._run(f"remove {path}", path.unlink, True)


def _locked_open(path: Path, flags: int) -> int:
    """Open ``path`` with an exclusive flock on it (retried if a sweep removed it first)."""
    while True:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0 or not flags & os.O_CREAT:
            return fd
        os.close(fd)  # unlinked between our create and our lock: make it again


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
