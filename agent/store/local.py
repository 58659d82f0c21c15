"""The embedded default store: a directory on a local (or mounted) filesystem.

Blobs are written under a temporary name and renamed into place, so a reader
never sees a partial blob; refs are replaced atomically under an exclusive
``flock`` so compare-and-swap holds between processes on one machine.
"""

from __future__ import annotations

import asyncio
import fcntl
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
from agent.store.refs import (
    MAX_REF_BYTES,
    InvalidRef,
    decode_ref,
    encode_ref,
    ref_path_parts,
    skip_invalid,
)

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
        try:
            try:
                os.rename(src, tmp)
            except OSError:  # another filesystem: copy, then fsync
                shutil.copyfile(src, tmp)
                src.unlink(missing_ok=True)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if tmp.stat().st_size != size:
                raise DigestMismatch(f"blob {digest}: {tmp.stat().st_size} bytes, expected {size}")
            os.rename(tmp, final)
            _fsync_dir(self._blobs)
        finally:
            tmp.unlink(missing_ok=True)

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


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
