"""Verifying checkpoints as stored: is every blob they name there, whole and sound?

A checkpoint is sound when its manifest is a readable checkpoint manifest and
every blob it names (the config and each layer) is in the store with the size
the manifest gives.  With ``read_data`` each blob is also read and hashed, and
each layer decompressed and parsed as the restore would, so a blob damaged in
place (same size, other bytes) is found too; without it, such damage is not
detectable.  Blobs shared by several checkpoints (a chain's older layers, the
config) are checked once, and a problem names every checkpoint it breaks.

Manifests and refs are input from the store: whatever their shape, they give a
problem in the report, never an exception.  The CLI's ``verify`` and the start
of a session (revalidating a checkpoint its session never finalized) use this.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, cast

from agent.checkpoint.layer_reader import READ_SIZE, LayerReader
from agent.checkpoint.manifest import EMPTY_DIGEST, Manifest
from agent.errors import BlobMissing, CorruptLayer, DigestMismatch, InvalidRef, NotFound
from agent.session.records import Progress, ProgressFn
from agent.store.base import Store
from agent.store.checks import hex_of
from agent.store.fetch import Fetch


class Kind(StrEnum):
    REF = "ref"
    MANIFEST = "manifest"
    CONFIG = "config"
    LAYER = "layer"


class Status(StrEnum):
    MISSING = "missing"
    CORRUPT = "corrupt"


@dataclass(frozen=True, slots=True)
class Target:
    """A checkpoint to verify: its ref, and the manifest digest it names (or why
    the ref names none: it is not a ref document)."""

    studio: str
    name: str
    digest: str
    ref_error: str = ""

    @property
    def label(self) -> str:
        return f"{self.studio}/{self.name}"


@dataclass(frozen=True, slots=True)
class Problem:
    """One missing or corrupt object and the checkpoints (``studio/name``) it breaks."""

    kind: Kind
    status: Status
    digest: str
    detail: str
    checkpoints: tuple[str, ...]

    @property
    def well_known(self) -> bool:
        """The missing OCI empty config: its bytes are known (``{}``), a restore
        never reads it, and the next checkpoint written to the store writes it
        (one content-addressed blob serves every manifest)."""
        return (
            self.kind is Kind.CONFIG
            and self.status is Status.MISSING
            and (self.digest == EMPTY_DIGEST)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "status": self.status.value,
            "digest": self.digest,
            "detail": self.detail,
            "checkpoints": list(self.checkpoints),
            "well_known": self.well_known,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """One checkpoint: what its manifest says (when readable) and whether it is sound."""

    studio: str
    name: str
    digest: str
    state: str | None  # None when the manifest is unreadable
    layers: int
    problems: tuple[Problem, ...]

    @property
    def label(self) -> str:
        return f"{self.studio}/{self.name}"

    @property
    def sound(self) -> bool:
        return not self.problems

    @property
    def restorable(self) -> bool:
        """Sound but for the missing well-known config, which a restore never reads."""
        return all(p.well_known for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "studio": self.studio,
            "name": self.name,
            "digest": self.digest,
            "state": self.state,
            "layers": self.layers,
            "sound": self.sound,
            "problems": [f"{p.kind.value} {p.digest}" for p in self.problems],
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    read_data: bool
    checkpoints: tuple[Verdict, ...]
    problems: tuple[Problem, ...]
    blobs: int  # distinct blobs checked, manifests included
    size: int  # their bytes
    bytes_read: int

    @property
    def sound(self) -> bool:
        return not self.problems

    def verdict(self, label: str) -> Verdict:
        return next(v for v in self.checkpoints if v.label == label)

    def to_json(self) -> dict[str, Any]:
        return {
            "sound": self.sound,
            "read_data": self.read_data,
            "blobs": self.blobs,
            "size": self.size,
            "bytes_read": self.bytes_read,
            "checkpoints": [v.to_json() for v in self.checkpoints],
            "problems": [p.to_json() for p in self.problems],
        }


# -- the check ----------------------------------------------------------------------


@dataclass(slots=True)
class _Blob:
    """A blob as the manifests name it: which checkpoints claim it, at what size."""

    digest: str
    kind: Kind
    claims: dict[str, int] = field(default_factory=dict)  # label -> size in its manifest


@dataclass(frozen=True, slots=True)
class _Read:
    """What a ref's manifest gave: the manifest and the blobs it names, or the
    problem (``kind`` is the ref when it names no manifest)."""

    size: int
    manifest: Manifest | None = None
    blobs: tuple[tuple[Kind, str, int], ...] = ()
    kind: Kind = Kind.MANIFEST
    status: Status | None = None
    detail: str = ""


class Verifier:
    """Checks checkpoints in one store; scratch files go under ``scratch`` (the spool)."""

    def __init__(self, store: Store, scratch: Path) -> None:
        self._store = store
        self._scratch = scratch

    async def verify(
        self,
        targets: Sequence[Target],
        *,
        read_data: bool = False,
        progress: ProgressFn | None = None,
    ) -> VerifyReport:
        # Manifests first, each once (refs may share one): they name the other blobs.
        problems: list[Problem] = []
        sharing: dict[str, list[Target]] = {}
        for t in targets:
            sharing.setdefault(_read_key(t), []).append(t)
        reads = dict(
            zip(
                sharing,
                await self._gather(self._read_manifest(ts[0]) for ts in sharing.values()),
                strict=True,
            )
        )
        for key, read in reads.items():
            if read.status is not None:
                labels = tuple(t.label for t in sharing[key])
                digest = sharing[key][0].digest
                problems.append(Problem(read.kind, read.status, digest, read.detail, labels))
        blobs: dict[str, _Blob] = {}
        for t in targets:
            for kind, digest, size in reads[_read_key(t)].blobs:
                blob = blobs.setdefault(digest, _Blob(digest, kind))
                blob.claims.setdefault(t.label, size)
        meter = _Meter(progress, "read" if read_data else "check", blobs.values())
        found = await self._gather(self._check(b, read_data, meter) for b in blobs.values())
        problems.extend(p for ps in found for p in ps)
        verdicts = tuple(_verdict(t, reads[_read_key(t)].manifest, problems) for t in targets)
        manifest_bytes = sum(r.size for r in reads.values())
        return VerifyReport(
            read_data=read_data,
            checkpoints=verdicts,
            problems=tuple(problems),
            blobs=len(reads) + len(blobs),
            size=manifest_bytes + sum(max(b.claims.values()) for b in blobs.values()),
            bytes_read=manifest_bytes + meter.read,
        )

    async def unsound(self, studio: str, name: str, digest: str) -> str:
        """Why the checkpoint cannot be restored as stored ("" when it can), found
        without reading its layers: what a start checks before it uses a checkpoint
        its session never finalized.  The layers' hashes are checked as they are
        fetched for the restore, so nothing is downloaded twice."""
        verdict = (await self.verify([Target(studio, name, digest)])).checkpoints[0]
        if verdict.restorable:
            return ""
        return "; ".join(f"{p.kind} {p.digest} is {p.status}: {p.detail}" for p in verdict.problems)

    async def _gather(self, coros: Iterable[Any]) -> list[Any]:
        """At most the store's fetch concurrency at once, in order."""
        limit = asyncio.Semaphore(max(1, self._store.fetch_concurrency))

        async def one(c: Any) -> Any:
            async with limit:
                return await c

        return list(await asyncio.gather(*(one(c) for c in coros)))

    async def _read_manifest(self, t: Target) -> _Read:
        if t.ref_error:
            return _Read(0, kind=Kind.REF, status=Status.CORRUPT, detail=t.ref_error)
        try:
            hex_of(t.digest)
        except DigestMismatch as e:
            return _Read(0, kind=Kind.REF, status=Status.CORRUPT, detail=f"names no blob: {e}")
        try:
            data = await self._store.get_bytes(t.digest, self._scratch)
        except BlobMissing:
            return _Read(0, status=Status.MISSING, detail="not in the store")
        except (DigestMismatch, CorruptLayer) as e:
            return _Read(0, status=Status.CORRUPT, detail=str(e))
        try:
            return _Read(len(data), *_parse(data))
        except CorruptLayer as e:
            return _Read(len(data), status=Status.CORRUPT, detail=str(e))

    async def _check(self, blob: _Blob, read_data: bool, meter: _Meter) -> list[Problem]:
        found = await self._store.blob_size(blob.digest)
        if found is None:
            meter.done(blob, 0)
            detail = "not in the store"
            if blob.digest == EMPTY_DIGEST:
                detail += " (the OCI empty config {}: the next checkpoint written writes it)"
            return [_problem(blob, Status.MISSING, detail, blob.claims)]
        out: list[Problem] = []
        wrong = {k: v for k, v in blob.claims.items() if v != found}
        for size in sorted(set(wrong.values())):
            labels = [k for k, v in wrong.items() if v == size]
            detail = f"has {found} bytes, the manifest says {size}"
            out.append(_problem(blob, Status.CORRUPT, detail, labels))
        right = [k for k, v in blob.claims.items() if v == found]
        counter = _Counting(meter)
        if read_data and right:
            try:
                await self._read_blob(blob, found, counter)
            except BlobMissing:  # removed since its size was looked up
                out.append(_problem(blob, Status.MISSING, "not in the store", right))
            except (DigestMismatch, CorruptLayer) as e:
                out.append(_problem(blob, Status.CORRUPT, str(e), right))
        meter.done(blob, counter.count)
        return out

    async def _read_blob(self, blob: _Blob, size: int, counter: _Counting) -> None:
        """Fetch the blob as a restore does (the store verifies its digest), then check
        that a layer decompresses and parses."""
        async with Fetch(self._store, [(blob.digest, size)], self._scratch) as f:
            opener = f.opener(0)

            def run() -> None:
                with opener() as src:
                    counter.source = src
                    _check_bytes(counter, blob)

            fetched, checked = await asyncio.gather(
                f.wait(), asyncio.to_thread(run), return_exceptions=True
            )
        # A failed download fails the reader too: its error says more.
        for outcome in (fetched, checked):
            if isinstance(outcome, BaseException):
                raise outcome


def _read_key(t: Target) -> str:
    return f"ref {t.label}" if t.ref_error else t.digest


def _problem(blob: _Blob, status: Status, detail: str, labels: Iterable[str]) -> Problem:
    return Problem(blob.kind, status, blob.digest, detail, tuple(labels))


def _verdict(t: Target, manifest: Manifest | None, problems: Sequence[Problem]) -> Verdict:
    return Verdict(
        t.studio,
        t.name,
        t.digest,
        manifest.state.value if manifest is not None else None,
        len(manifest.layers) if manifest is not None else 0,
        tuple(p for p in problems if t.label in p.checkpoints),
    )


async def resolve(store: Store, studio: str, name: str | None) -> list[Target]:
    """The checkpoints to verify: ``name`` of ``studio``, or (``name`` None) every
    checkpoint of the studio, most recently written first.  A ref that is not a
    ref document is a target too, reported as corrupt."""
    if name is None:
        refs = await store.list_refs(studio)
        ordered = sorted(refs.items(), key=lambda kv: kv[1].updated, reverse=True)
        return [Target(studio, n, ref.digest) for n, ref in ordered]
    try:
        ref = await store.get_ref(studio, name)
    except InvalidRef as e:
        return [Target(studio, name, "", ref_error=str(e))]
    if ref is None:
        raise NotFound(f"no checkpoint {name!r} in studio {studio}")
    return [Target(studio, name, ref.digest)]


def _parse(data: bytes) -> tuple[Manifest, tuple[tuple[Kind, str, int], ...]]:
    """The manifest and every blob it names; any other shape raises ``CorruptLayer``."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise CorruptLayer("not a checkpoint manifest: not a JSON object")
        manifest = Manifest.decode(data)
        config = doc.get("config")
        if not isinstance(config, dict):
            raise CorruptLayer("malformed checkpoint manifest: no config descriptor")
        named: list[tuple[Kind, object, object]] = [
            (Kind.CONFIG, config.get("digest"), config.get("size"))
        ]
        named += [(Kind.LAYER, x.digest, x.size) for x in manifest.layers]
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise CorruptLayer(f"malformed checkpoint manifest: {e}") from e
    blobs: list[tuple[Kind, str, int]] = []
    for kind, digest, size in named:
        if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool):
            raise CorruptLayer(f"malformed checkpoint manifest: a {kind} descriptor is malformed")
        try:
            hex_of(digest)
        except DigestMismatch as e:
            raise CorruptLayer(f"checkpoint manifest names a bad {kind} digest: {e}") from e
        if size < 0:
            raise CorruptLayer(f"checkpoint manifest gives {kind} {digest} a negative size")
        blobs.append((kind, digest, size))
    return manifest, tuple(blobs)


def _check_bytes(src: _Counting, blob: _Blob) -> None:
    """Read a blob the store has verified against its digest; a layer is also
    decompressed and its archive parsed (bytes can hash right and still be no
    layer, if they were written wrong)."""
    if blob.kind is not Kind.LAYER:
        while src.read(READ_SIZE):
            pass
        return
    with LayerReader(cast(BinaryIO, src), f"layer {blob.digest}") as reader:
        for _ in reader.members():
            pass


class _Counting:
    """One blob's bytes counted as they are read (from ``source``), for the meter."""

    def __init__(self, meter: _Meter) -> None:
        self._meter = meter
        self.source: BinaryIO | None = None
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        assert self.source is not None
        data = self.source.read(n)
        self.count += len(data)
        self._meter.add(len(data))
        return data


class _Meter:
    """Progress over all the blobs: bytes read (without reading: sizes checked)
    of their total, and blobs done.  Called from any thread."""

    def __init__(self, progress: ProgressFn | None, phase: str, blobs: Iterable[_Blob]) -> None:
        self._progress = progress
        self._phase = phase
        blobs = list(blobs)
        self._total = sum(max(b.claims.values()) for b in blobs)
        self._count = len(blobs)
        self._lock = threading.Lock()
        self._bytes = 0
        self._blobs = 0
        self.read = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.read += n
            self._bytes += n
            self._report()

    def done(self, blob: _Blob, read: int) -> None:
        """Blob done, ``read`` of its bytes read: the rest counts as checked."""
        with self._lock:
            self._blobs += 1
            self._bytes += max(0, max(blob.claims.values()) - read)
            self._report()

    def _report(self) -> None:
        if self._progress is not None:
            done = min(self._bytes, self._total)
            self._progress(Progress(self._phase, done, self._total, self._blobs, self._count))
