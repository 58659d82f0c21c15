"""The embedded default store: a directory on a local (or mounted) filesystem.

Blobs are written under a temporary name and renamed into place, so a reader
never sees a partial blob; refs are replaced atomically under an exclusive
``flock`` so compare-and-swap holds between processes on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import BlobMissing, DigestMismatch, PermissionDenied, StoreError
from agent.store.base import CHECKPOINTS_DIR, RefValue, Store
from agent.store.checks import check_expect, check_size, hex_of, verify_file
from agent.store.refs import decode_ref, encode_ref, ref_path_parts

T = TypeVar("T")


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

    async def put_blob(self, src: Path, digest: str, size: int) -> None:
        await self._run(f"write blob {digest}", self._put_blob, src, digest, size)

    def _put_blob(self, src: Path, digest: str, size: int) -> None:
        final = self._blob_path(digest)
        if final.is_file():
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

    async def clear_leftovers(self) -> int:
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
        try:
            return decode_ref(self._ref_file(studio, name).read_bytes())
        except FileNotFoundError:
            return None

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
                out[fname] = decode_ref((d / fname).read_bytes())
            except (FileNotFoundError, ValueError, json.JSONDecodeError):
                continue
        return out

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
