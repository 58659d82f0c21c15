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

The checkpoint engine works on local files; a store only moves verified files
in and out, so the engine never knows which store it talks to (the model is
restic's ``internal/backend``).
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.errors import StoreError

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


class Store(abc.ABC):
    """Blob and ref storage.  Every method is safe to call concurrently."""

    url: str
    # How many blobs a fetch of several (a restore's chain) downloads at once.
    fetch_concurrency: int = 4

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
        Then a writer may send the file to disk while writing it, so that the fsync
        finds little left (``session/writeback.py``); otherwise that only costs the disk."""
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

    async def clear_leftovers(self) -> int:
        """Remove what killed writers left in the store's scratch space (never a live
        writer's); how many.  A store without such space has nothing to clear."""
        return 0

    async def prepare(self) -> None:
        """Get ready for the first request (load the SDK, open clients) while the
        caller does other work; never raises: the first real request reports."""
        return None

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        return None
