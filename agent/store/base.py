"""The one small interface every checkpoint store implements.

A store keeps two kinds of object under ``<workdir>/.studios/checkpoints``:

* blobs, write-once and content-addressed: ``blobs/sha256/<hex>``;
* refs, small mutable JSON documents naming a studio's checkpoints:
  ``refs/<studio>/<name>``, updated only by compare-and-swap;
* leases, small objects created exclusively and replaced or removed only by
  their holder (``leases/<name>``): how a running session tells the garbage
  collector what it still needs, and how one collector keeps others out.

Blobs are deleted only by the garbage collector (``agent/session/gc.py``),
which is why a store can list them with their ages, list every studio, and
find the leftovers of uploads that never finished.

The checkpoint engine works on local files and byte streams; a store only moves
verified bytes in and out, so the engine never knows which store it talks to
(the model is restic's ``internal/backend``).  A layer is written through a
``BlobSink`` (``open_blob``): the store may store its bytes while the layer is
still being compressed, as ``tar | zstd | aws s3 cp -`` does, yet nothing is
readable under the digest before the whole blob is stored and verified.
"""

from __future__ import annotations

import abc
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.errors import DigestMismatch, StoreError
from agent.store.writeback import WriteBack

CHECKPOINTS_DIR = ".studios/checkpoints"


@dataclass(frozen=True, slots=True)
class RefValue:
    """What a ref points at, and when it was last written."""

    digest: str
    updated: datetime


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A stored blob as a listing shows it: what gc needs to judge it, no more."""

    digest: str
    size: int
    modified: datetime  # last written or refreshed (``put_blob`` of a present blob)


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease object's bytes and the tag a conditional replace or delete must name."""

    body: bytes
    tag: str


@dataclass(frozen=True, slots=True)
class Leftover:
    """Something an interrupted write left behind that nothing will finish: an
    incomplete multipart upload, a temporary file.  ``handle`` is the store's own
    name for it, for ``remove_leftover``."""

    what: str
    size: int
    started: datetime
    handle: str
    # The writer that made it (its session lease's holder), when the store can
    # tell: gc leaves a live writer's alone, however old.
    owner: str = ""


class BlobSink(abc.ABC):
    """A new blob written front to back, whose digest is known only at its end
    (a layer as it is compressed), staged in a local spool file.

    ``write`` is called from one thread at a time (the compressor's); the rest
    on the event loop.  The store may store bytes while they are written (S3:
    the parts of a multipart upload to a temporary key), but nothing is
    readable under the digest before ``commit`` has stored the whole blob and
    verified it.  ``discard`` drops what was written and whatever was stored of
    it; after ``commit`` it does nothing, so a caller always calls it.
    """

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; raises the store's error once storing it has failed,
        so a layer that cannot be stored stops being written."""

    def flush(self) -> None:  # noqa: B027 (nothing to flush, by design)
        """Nothing is buffered: ``write`` hands every byte on."""

    async def finish(self) -> None:
        """Everything written is stored as far as it can be without the digest
        (at a temporary name), so a caller may do other work meanwhile."""
        return None

    @abc.abstractmethod
    async def commit(self, digest: str, size: int) -> None:
        """Store the blob under ``digest``, the SHA-256 of the ``size`` bytes
        written, which the writer computed from the very bytes it wrote.  As
        ``put_blob``: a blob already there is refreshed, not written again."""

    @abc.abstractmethod
    async def discard(self) -> None:
        """Drop the blob: stop storing it and remove what was stored of it."""


class SpooledBlob(BlobSink):
    """The plain sink: bytes go to the spool file only, and ``commit`` puts the
    whole file (``Store.put_blob``).  Writes and ``close`` share a lock, so a
    write from a thread the caller gave up on never reaches a closed (and
    perhaps reused) descriptor."""

    def __init__(self, store: Store, fd: int, spool: Path) -> None:
        self._store = store
        self._fd: int | None = fd
        self.spool = spool
        self.written = 0
        self._lock = threading.Lock()
        # A store that keeps this very file as the blob fsyncs it at commit:
        # sent to disk as it is written, little is left for that fsync.
        self._write_back = WriteBack(fd) if store.keeps_staged(spool.parent) else None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.spool} is closed")
            while view:
                done = os.write(self._fd, view)
                view = view[done:]
            self.written += n
            if self._write_back is not None:
                self._write_back.wrote(n)
        return n

    def close(self) -> None:
        """Close the spool file; later writes raise."""
        with self._lock:
            fd, self._fd = self._fd, None
        if self._write_back is not None:
            self._write_back.stop()
        if fd is not None:
            os.close(fd)

    async def commit(self, digest: str, size: int) -> None:
        self.close()
        if size != self.written:
            raise DigestMismatch(f"blob {digest}: {self.written} bytes written, expected {size}")
        await self._store.put_blob(self.spool, digest, size)

    async def discard(self) -> None:
        self.close()
        self.spool.unlink(missing_ok=True)


class Store(abc.ABC):
    """Blob and ref storage.  Every method is safe to call concurrently."""

    url: str
    # How many blobs a fetch of several (a restore's chain) downloads at once.
    fetch_concurrency: int = 4
    # Compressed bytes per segment of a checkpoint's layer, each put under its own
    # digest as soon as it is complete (``LayerWriter``); 0: one blob a layer,
    # for a store that moves a finished file into place for nothing (a rename).
    segment_size: int = 0

    # -- blobs ----------------------------------------------------------------

    @abc.abstractmethod
    async def has_blob(self, digest: str) -> bool:
        """Whether a blob with this digest exists (its content is not checked)."""

    @abc.abstractmethod
    async def blob_size(self, digest: str) -> int | None:
        """The stored blob's size in bytes, or None when it does not exist: one
        cheap lookup (a stat, a HEAD), so a check of many blobs reads none of them."""

    @abc.abstractmethod
    async def put_blob(self, src: Path, digest: str, size: int) -> None:
        """Store the local file ``src`` whose bytes hash to ``digest``.

        The caller computed ``digest`` and ``size`` while writing ``src``.  A blob
        that already exists is not written again but refreshed (its modified
        time becomes now), so a garbage collector's grace period counts from the
        last writer that needed it.  The store may move or delete ``src``; the
        caller must not use it afterwards.
        """

    def open_blob(self, fd: int, spool: Path, upload: str) -> BlobSink:
        """A sink for a new blob whose digest is known only once it is written.

        ``fd`` is open for writing on ``spool``, a new empty file in the caller's
        spool; the sink owns both from now on, and removes the file once it is
        done with it (committed or discarded).
        ``upload`` (``<owner>/<id>``, 32 hex digits each: the writer's session
        lease holder and a fresh id) names whatever the store keeps while the
        blob is written, so what a killed writer left can be found again: by
        ``clear_leftovers`` at its next start, which reads the name back from
        the spool file's, or by gc, which spares the uploads of live owners.
        This plain sink only spools, and ``commit`` puts the file.
        """
        return SpooledBlob(self, fd, spool)

    @abc.abstractmethod
    async def get_blob(
        self,
        digest: str,
        size: int | None,
        dest_dir: Path,
        *,
        verify: bool = True,
        on_data: Callable[[Path, int], None] | None = None,
    ) -> Path:
        """Return a local file holding the blob, verified against digest and size.

        The file may be a new file in ``dest_dir`` (which the caller removes) or
        the store's own file when the store is local; the caller only reads it.
        Raises ``BlobMissing`` or ``DigestMismatch``.  With ``verify=False`` the
        caller hashes the bytes itself as it reads them (a restore does, while it
        decompresses), and the store checks no more than the size.

        ``on_data(path, n)``, called on the event loop as the blob arrives, says
        that the first ``n`` bytes of the file at ``path`` are final: a caller may
        open it and read them while the rest downloads (the file may be renamed
        when complete; what is open stays valid).  The last call, before this
        returns, has the whole size.
        """

    def keeps_staged(self, directory: Path) -> bool:
        """Whether ``put_blob`` of a file in ``directory`` keeps that very file as the
        blob (renamed into place, then fsynced) rather than copying or uploading it.
        Then the spooled sink sends the file to disk while it is written, so that
        the fsync finds little left (``writeback.py``); otherwise that only costs
        the disk."""
        return False

    async def put_bytes(self, data: bytes, digest: str, dest_dir: Path) -> None:
        """Store a small blob (a manifest) held in memory."""
        # Unique: two puts of one blob at once (equal manifests) must not share a file.
        tmp = dest_dir / f"put-{digest.split(':')[-1][:16]}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot stage blob {digest} in {dest_dir}: {e.strerror or e}") from e
        try:
            await self.put_blob(tmp, digest, len(data))
        finally:
            tmp.unlink(missing_ok=True)

    async def get_bytes(self, digest: str, dest_dir: Path, max_size: int = 16 << 20) -> bytes:
        """Read a small verified blob (a manifest) into memory."""
        path = await self.get_blob(digest, None, dest_dir)
        try:
            if path.stat().st_size > max_size:
                from agent.errors import CorruptLayer

                raise CorruptLayer(f"blob {digest} is larger than {max_size} bytes")
            return path.read_bytes()
        finally:
            if path.parent == dest_dir:
                path.unlink(missing_ok=True)

    @abc.abstractmethod
    def iter_blobs(self) -> AsyncIterator[list[BlobInfo]]:
        """Every blob, a page at a time, so a listing of any size is held a page
        at a time.  Blobs written while it runs may or may not be listed."""

    @abc.abstractmethod
    async def delete_blob(self, digest: str) -> None:
        """Remove a blob (gone already is fine).  Only gc calls this: nothing
        else knows that no checkpoint needs it."""

    # -- refs -----------------------------------------------------------------

    @abc.abstractmethod
    async def get_ref(self, studio: str, name: str) -> RefValue | None:
        """The ref's current value, or None when it does not exist."""

    @abc.abstractmethod
    async def set_ref(self, studio: str, name: str, digest: str, expect: str | None) -> None:
        """Point the ref at ``digest`` if it currently points at ``expect``.

        ``expect=None`` means the ref must not exist yet.  Raises ``RefConflict``
        when another writer got there first; the winner's value is untouched.
        """

    @abc.abstractmethod
    async def delete_ref(self, studio: str, name: str, expect: str) -> None:
        """Remove the ref if it still points at ``expect`` (else ``RefConflict``)."""

    @abc.abstractmethod
    async def list_refs(self, studio: str) -> dict[str, RefValue]:
        """All refs of a studio, by name."""

    @abc.abstractmethod
    async def exists(self) -> bool:
        """Whether a checkpoint store was ever written here (its layout marker):
        a mistyped work directory is told apart from a store whose checkpoints
        were all deleted."""

    @abc.abstractmethod
    async def list_studios(self) -> list[str]:
        """Every studio that has (or had) refs in this work directory."""

    @abc.abstractmethod
    async def list_ref_names(self, studio: str) -> list[str]:
        """The names of a studio's refs, none of them read: gc reads each and
        must tell an unreadable ref from a vanished one, which ``list_refs`` hides."""

    # -- leases ---------------------------------------------------------------

    @abc.abstractmethod
    async def create_lease(self, name: str, body: bytes) -> str | None:
        """Create the lease ``name`` (``gc``, ``sessions/<studio>/<id>``) if no
        lease of that name exists; return its tag, or None when one exists.

        Exclusive, so two collectors cannot both believe they hold the lease.
        """

    @abc.abstractmethod
    async def get_lease(self, name: str) -> Lease | None:
        """The lease as stored now, or None."""

    @abc.abstractmethod
    async def replace_lease(self, name: str, body: bytes, expect: str) -> str:
        """Replace the lease if its tag is still ``expect``; return the new tag.

        Raises ``RefConflict`` when it changed or vanished: the caller no longer
        holds it (a stale lease taken over, say) and must not act as if it did.
        """

    @abc.abstractmethod
    async def delete_lease(self, name: str, expect: str) -> None:
        """Remove the lease if its tag is still ``expect`` (gone already is fine);
        ``RefConflict`` when someone else's lease stands there now."""

    @abc.abstractmethod
    async def list_leases(self, prefix: str) -> list[str]:
        """The names of the leases under ``prefix`` (``sessions``), at any depth."""

    # -- leftovers ------------------------------------------------------------

    @abc.abstractmethod
    def iter_leftovers(self, before: datetime) -> AsyncIterator[Leftover]:
        """Incomplete uploads and temporary files started before ``before``:
        what a writer killed mid-write left, which no one will finish."""

    @abc.abstractmethod
    async def remove_leftover(self, leftover: Leftover) -> None:
        """Remove one leftover (gone already is fine)."""

    async def clear_leftovers(self, uploads: Sequence[str] = ()) -> int:
        """Remove what killed writers left in the store's scratch space (never a live
        writer's), and what it keeps of the blob uploads named ``uploads`` (see
        ``open_blob``: a dead process's, which only the caller knows); how many.
        A store without such space has nothing to clear."""
        return 0

    async def prepare(self) -> None:
        """Get ready for the first request (load the SDK, open clients) while the
        caller does other work; never raises: the first real request reports."""
        return None

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        return None
