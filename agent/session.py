"""A session's checkpoints: the engine and a store composed, for the CLI and the daemon.

Write order makes every checkpoint atomic (restic's data -> index -> snapshot):
the layer blob, then the manifest blob, then the ref (compare-and-swap), then
the local session file and parent state.  A crash or kill at any point leaves
the previous checkpoint listed and restorable; a half-written one is never
listed because nothing names it until its ref is written.

Local state lives in the state dir (never checkpointed): ``session.json``
(session id, start epoch, chain, the refs this session wrote) naming its
parent-state file, which is replaced by generation so the two always agree.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.checkpoint import diff as diffmod
from agent.checkpoint.layer_writer import LayerResult
from agent.checkpoint.manifest import CheckpointState, LayerDesc, Manifest
from agent.checkpoint.names import auto_name, normalize_name
from agent.checkpoint.pipeline import Pass, scan_and_write
from agent.checkpoint.restore import LayerFile, RestoreStats, apply_layers
from agent.checkpoint.scan import Excluder, Scan, Stat, scan
from agent.checkpoint.state import load_state, save_state
from agent.errors import (
    AgentError,
    BlobMissing,
    CorruptLayer,
    DigestMismatch,
    NoParentState,
    NotFound,
    RefConflict,
)
from agent.log import get_logger
from agent.settings import Settings
from agent.store.arrival import Arrival
from agent.store.base import RefValue, Store

log = get_logger("session")

_SESSION_FILE = "session.json"


@dataclass(frozen=True, slots=True)
class Progress:
    phase: str  # "download" | "apply" | "scan" | "write" | "upload"
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    studio: str
    name: str
    digest: str
    state: CheckpointState
    session: str
    created: datetime
    updated: datetime
    size: int
    layers: int

    def to_json(self) -> dict[str, Any]:
        return {
            "studio": self.studio,
            "name": self.name,
            "digest": self.digest,
            "state": self.state.value,
            "session": self.session,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "size": self.size,
            "layers": self.layers,
        }


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    info: CheckpointInfo
    changed: int
    layer_size: int
    duration: float
    skipped: list[Skipped]


@dataclass(frozen=True, slots=True)
class StartOutcome:
    restored: CheckpointInfo | None
    invalidated: list[CheckpointInfo]
    stats: RestoreStats | None = None


@dataclass(frozen=True, slots=True)
class DiffReport:
    lines: list[diffmod.DiffLine]
    skipped: list[Skipped]


@dataclass(slots=True)
class _Local:
    """What this machine remembers of its session (session.json)."""

    studio: str
    session: str
    started: int
    name: str
    chain: list[LayerDesc] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)  # name -> manifest digest we wrote
    created: dict[str, str] = field(default_factory=dict)  # name -> first write (ISO)
    state_file: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "studio": self.studio,
            "session": self.session,
            "started": self.started,
            "name": self.name,
            "chain": [layer.to_json() for layer in self.chain],
            "refs": self.refs,
            "created": self.created,
            "state_file": self.state_file,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Local:
        return cls(
            studio=d["studio"],
            session=d["session"],
            started=int(d["started"]),
            name=d["name"],
            chain=[LayerDesc.from_json(x) for x in d["chain"]],
            refs=dict(d["refs"]),
            created=dict(d.get("created", {})),
            state_file=d["state_file"],
        )


class Session:
    """Checkpoint operations of one studio session on one root."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.root = Path(os.path.abspath(settings.root))
        self.state_dir = Path(os.path.abspath(settings.state_path))
        self.spool = self.state_dir / "spool"
        self._clock = clock
        self._lock = asyncio.Lock()
        self._local: _Local | None = None
        self._cancel = threading.Event()

    # -- identity -------------------------------------------------------------------

    @property
    def studio(self) -> str:
        return self.settings.studio

    def _session(self) -> _Local:
        if self._local is None:
            self._local = self._load_local()
        if self._local is None:
            raise NoParentState(
                f"no session on {self.root}: run 'studio-agent baseline' or 'restore' first"
            )
        return self._local

    @property
    def session_id(self) -> str:
        return self._session().session

    @property
    def auto_name(self) -> str:
        """The name of this session's own checkpoint (``<studio>_<start epoch>``, or as renamed)."""
        return self._session().name

    @property
    def chain(self) -> list[LayerDesc]:
        return list(self._session().chain)

    # -- local state files ----------------------------------------------------------------

    def _load_local(self) -> _Local | None:
        path = self.state_dir / _SESSION_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise AgentError(f"session file {path} is unreadable ({e}); run baseline again") from e
        local = _Local.from_json(data)
        if local.studio != self.studio:
            raise AgentError(
                f"the state dir {self.state_dir} holds a session of studio {local.studio!r}, "
                f"not {self.studio!r}; run baseline or restore for this studio"
            )
        return local

    def _save_local(self, local: _Local, entries: dict[str, Stat] | None) -> None:
        """Write the parent state under a new name, then switch session.json to it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        old = local.state_file
        if entries is not None:
            local.state_file = f"parent-{uuid.uuid4().hex[:12]}.state"
            save_state(self.state_dir / local.state_file, entries)
        path = self.state_dir / _SESSION_FILE
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(local.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if entries is not None and old and old != local.state_file:
            (self.state_dir / old).unlink(missing_ok=True)
        self._local = local

    def _parent_entries(self, local: _Local) -> dict[str, Stat]:
        try:
            return load_state(self.state_dir / local.state_file)
        except FileNotFoundError:
            raise NoParentState(
                f"parent state of session {local.session} is missing; run baseline again"
            ) from None

    # -- scanning -------------------------------------------------------------------------

    def _excluder(self) -> Excluder:
        paths: list[Path | str] = [self.state_dir]
        if sys.prefix != sys.base_prefix:  # the agent's own virtual environment
            paths.append(sys.prefix)
        paths.append(Path(__file__).resolve().parent)
        if self.settings.workdir and "://" not in self.settings.workdir:
            paths.append(os.path.abspath(self.settings.workdir))
        return Excluder(self.root, paths, self.settings.exclude)

    def _scan(self, parent: dict[str, Stat] | None = None) -> Scan:
        result = scan(self.root, self._excluder())
        if parent:
            diffmod.keep_unlisted(result, parent)
        _log_skipped(result)
        return result

    # -- starting a session -------------------------------------------------------------------

    async def baseline(self) -> None:
        """Begin a new session on the root as it is now (nothing restored)."""
        async with self._lock:
            await self._begin(chain=[])

    async def _begin(self, chain: list[LayerDesc]) -> None:
        started = int(self._clock())
        # Two sessions started within one second would share a name: take the next free one.
        while await self.store.get_ref(self.studio, auto_name(self.studio, started)) is not None:
            started += 1
        local = _Local(
            studio=self.studio,
            session=uuid.uuid4().hex,
            started=started,
            name=auto_name(self.studio, started),
            chain=chain,
        )
        # The state dir first: its parents must not show up as the session's changes.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        result = await asyncio.to_thread(self._scan)
        await asyncio.to_thread(self._save_local, local, result.entries)
        log.info(
            "session.begin",
            session=local.session,
            checkpoint=local.name,
            layers=len(chain),
            entries=len(result.entries),
        )

    async def start(
        self,
        restore_from: str = "",
        progress: ProgressFn | None = None,
        *,
        required: bool = False,
    ) -> StartOutcome:
        """Restore a checkpoint (named, or the latest valid one), then begin a session."""
        async with self._lock:
            t0 = time.monotonic()
            invalidated: list[CheckpointInfo] = []
            restored: CheckpointInfo | None = None
            stats: RestoreStats | None = None
            chain: list[LayerDesc] = []
            if restore_from:
                studio, name = self._split_source(restore_from)
                restored, manifest = await self._resolve(studio, name)
                if manifest.state is CheckpointState.INVALID:
                    raise AgentError(f"checkpoint {studio}/{name} is marked invalid")
                unfinished = manifest.state is not CheckpointState.FINALIZED
                stats = await self._restore(manifest, progress, verify_first=unfinished)
                chain = list(manifest.layers)
            else:
                found = await self._restore_latest(progress, invalidated)
                if found is not None:
                    restored, manifest, stats = found
                    chain = list(manifest.layers)
                elif required:
                    raise NotFound(f"studio {self.studio} has no valid checkpoint to restore")
            t_restore = time.monotonic()
            await self._begin(chain)
            if restored is not None:
                log.info(
                    "restore.done",
                    checkpoint=f"{restored.studio}/{restored.name}",
                    layers=restored.layers,
                    files=stats.files if stats else 0,
                    restore_seconds=round(t_restore - t0, 3),
                    baseline_seconds=round(time.monotonic() - t_restore, 3),
                )
            return StartOutcome(restored=restored, invalidated=invalidated, stats=stats)

    def _split_source(self, source: str) -> tuple[str, str]:
        studio, slash, name = source.partition("/")
        if not slash:
            return self.studio, normalize_name(source)
        if not studio or "/" in name:
            raise AgentError(f"invalid checkpoint reference {source!r}: use NAME or STUDIO/NAME")
        return studio, normalize_name(name)

    async def _restore_latest(
        self, progress: ProgressFn | None, invalidated: list[CheckpointInfo]
    ) -> tuple[CheckpointInfo, Manifest, RestoreStats] | None:
        refs = await self.store.list_refs(self.studio)
        for name, ref in sorted(refs.items(), key=lambda kv: kv[1].updated, reverse=True):
            try:
                manifest = await self._manifest(ref.digest)
            except (BlobMissing, DigestMismatch, CorruptLayer) as e:
                log.warning("restore.manifest_unusable", checkpoint=name, error=str(e))
                continue
            info = _info(self.studio, name, ref, manifest)
            if manifest.state is CheckpointState.INVALID:
                continue
            unfinished = manifest.state is not CheckpointState.FINALIZED
            try:
                stats = await self._restore(manifest, progress, verify_first=unfinished)
            except (BlobMissing, DigestMismatch) as e:
                if not unfinished:
                    raise
                # Left by a session that never finalized (force stop, OOM, spot
                # reclamation) and not sound: mark it, fall back to the next one.
                log.warning("restore.invalid", checkpoint=name, error=str(e))
                bad = await self._write_manifest(
                    self.studio, name, manifest.with_state(CheckpointState.INVALID), ref.digest
                )
                invalidated.append(bad)
                continue
            return info, manifest, stats
        return None

    async def _resolve(self, studio: str, name: str) -> tuple[CheckpointInfo, Manifest]:
        ref = await self.store.get_ref(studio, name)
        if ref is None:
            raise NotFound(f"no checkpoint {name!r} in studio {studio}")
        manifest = await self._manifest(ref.digest)
        return _info(studio, name, ref, manifest), manifest

    async def _manifest(self, digest: str) -> Manifest:
        return Manifest.decode(await self.store.get_bytes(digest, self.spool))

    async def _restore(
        self, manifest: Manifest, progress: ProgressFn | None, *, verify_first: bool
    ) -> RestoreStats:
        """Fetch the chain (bounded, newest first) and apply each layer as it arrives.

        With ``verify_first`` (for a checkpoint its session never finalized)
        every blob is fetched and verified before the first byte is applied, so
        an unsound chain is refused without touching the root; otherwise each
        layer is hashed while it is applied and a mismatch fails the restore.
        """
        layers = list(manifest.layers)
        if not layers:
            return RestoreStats()
        self.spool.mkdir(parents=True, exist_ok=True)
        workdir = Path(self._mkdtemp())
        total_compressed = sum(layer.size for layer in layers)
        fetched = [0]
        sem = asyncio.Semaphore(max(1, self.settings.s3_concurrency))
        arrivals = [Arrival() for _ in layers]

        async def fetch(index: int) -> None:
            layer, arrival = layers[index], arrivals[index]
            try:
                async with sem:
                    dest = workdir / layer.digest.split(":")[-1]
                    dest.mkdir(exist_ok=True)
                    path = await self.store.get_blob(
                        layer.digest, layer.size, dest, verify=verify_first, on_data=arrival.data
                    )
            except BaseException as e:  # the apply, waiting for bytes, raises it too
                arrival.fail(e)
                raise
            arrival.finish(path)
            fetched[0] += layer.size
            if progress is not None:
                progress(Progress("download", fetched[0], total_compressed, 0, 0))

        tasks = [asyncio.ensure_future(fetch(i)) for i in reversed(range(len(layers)))]
        try:
            if verify_first:
                await asyncio.gather(*tasks)

            def get(index: int) -> LayerFile:
                # Applied as it arrives; unless verified already, hashed as it is read.
                arrival, digest = arrivals[index], layers[index].digest
                expect = None if verify_first else digest
                path = arrival.complete()
                if path is not None:
                    return LayerFile(path, expect, layers[index].size)
                return LayerFile(digest=expect, size=layers[index].size, opener=arrival.open)

            def on_apply(done: int, total: int, b_done: int, b_total: int) -> None:
                if progress is not None:
                    progress(Progress("apply", b_done, b_total, done, total))

            totals = (sum(x.files for x in layers), sum(x.uncompressed for x in layers))
            return await asyncio.to_thread(
                apply_layers, self.root, len(layers), get, totals=totals, progress=on_apply
            )
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for arrival in arrivals:
                arrival.close()
            shutil.rmtree(workdir, ignore_errors=True)

    def _mkdtemp(self) -> str:
        import tempfile

        return tempfile.mkdtemp(prefix="restore-", dir=self.spool)

    # -- checkpoints -----------------------------------------------------------------------

    async def checkpoint(
        self,
        name: str | None = None,
        state: CheckpointState = CheckpointState.FINALIZED,
        *,
        skip_unchanged: bool = False,
        progress: ProgressFn | None = None,
    ) -> CheckpointResult | None:
        """Write the changes since the parent state as a layer and point ``name`` at it."""
        async with self._lock:
            t0 = time.monotonic()
            local = self._session()
            target = normalize_name(name) if name else local.name
            parent = await asyncio.to_thread(self._parent_entries, local)
            # The store readies itself (an S3 client takes a while) while the root
            # is walked and the layer compressed, mostly outside the GIL.
            ready = asyncio.ensure_future(self.store.prepare())
            tmp = self.spool / f"layer-{uuid.uuid4().hex}.tmp"
            try:
                try:
                    done = await self._scan_and_write(parent, tmp, progress)
                finally:
                    await ready
                current, changes, layer = done.scan, done.changes, done.layer
                skipped = [Skipped(p, r) for p, r in current.skipped]
                if not changes and skip_unchanged:
                    return None
                chain = list(local.chain)
                if layer is not None:
                    skipped.extend(Skipped(p, r) for p, r in layer.skipped)
                    for s in layer.skipped:
                        log.warning("checkpoint.skipped", path=s[0], reason=s[1])
                    await self._upload(tmp, layer, progress)
                    chain.append(
                        LayerDesc(layer.digest, layer.size, layer.entries, layer.uncompressed)
                    )
            finally:
                tmp.unlink(missing_ok=True)
            t_layer = time.monotonic()
            info = await self._publish(local, target, chain, state)
            new_entries = current.entries
            if layer is not None:
                new_entries = _next_parent(parent, current.entries, layer)
            local.chain = chain
            await asyncio.to_thread(self._save_local, local, new_entries)
            duration = time.monotonic() - t0
            log.info(
                "checkpoint.written",
                checkpoint=target,
                state=state.value,
                changed=len(changes),
                layer_size=layer.size if layer else 0,
                size=info.size,
                layers=info.layers,
                seconds=round(duration, 3),
                walk_seconds=round(done.walk_seconds, 3),
                layer_seconds=round(t_layer - t0, 3),
            )
            return CheckpointResult(
                info=info,
                changed=len(changes),
                layer_size=layer.size if layer else 0,
                duration=duration,
                skipped=skipped,
            )

    async def _scan_and_write(
        self, parent: dict[str, Stat], tmp: Path, progress: ProgressFn | None
    ) -> Pass:
        """Walk the root and write its changes to the spool file ``tmp`` in one pass."""

        def on_progress(phase: str, done: int, total: int, b_done: int, b_total: int) -> None:
            if progress is not None:
                progress(Progress(phase, b_done, b_total, done, total))

        def run() -> Pass:
            self.spool.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                done = scan_and_write(
                    self.root,
                    self._excluder(),
                    parent,
                    f,
                    level=self.settings.compression_level,
                    threads=self.settings.compression_threads,
                    progress=on_progress,
                    cancel=self._cancel,
                )
            _log_skipped(done.scan)
            return done

        try:
            return await asyncio.to_thread(run)
        except OSError as e:  # the spool's disk is full or read-only
            raise AgentError(f"cannot write the layer to {self.spool}: {e.strerror or e}") from e

    async def _upload(self, tmp: Path, layer: LayerResult, progress: ProgressFn | None) -> None:
        if progress is not None:
            progress(Progress("upload", 0, layer.size, 0, 1))
        await self.store.put_blob(tmp, layer.digest, layer.size)
        if progress is not None:
            progress(Progress("upload", layer.size, layer.size, 1, 1))

    async def mark(self, state: CheckpointState, name: str | None = None) -> CheckpointInfo:
        """Write this session's checkpoint with the current chain and ``state``, no scan."""
        async with self._lock:
            local = self._session()
            target = normalize_name(name) if name else local.name
            info = await self._publish(local, target, list(local.chain), state)
            await asyncio.to_thread(self._save_local, local, None)
            return info

    async def _publish(
        self, local: _Local, name: str, chain: list[LayerDesc], state: CheckpointState
    ) -> CheckpointInfo:
        """Manifest blob, then the ref: the moment the checkpoint exists."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        created = datetime.fromisoformat(local.created.get(name, now.isoformat()))
        manifest = Manifest(self.studio, local.session, state, created, tuple(chain))
        expect = local.refs.get(name)
        try:
            info = await self._write_manifest(self.studio, name, manifest, expect)
        except RefConflict:
            current = await self.store.get_ref(self.studio, name)
            if current is None or not await self._written_by(current.digest, local.session):
                if expect is None:
                    raise RefConflict(
                        f"checkpoint {name!r} already exists in studio {self.studio}; "
                        "names are unique per studio"
                    ) from None
                raise
            # We wrote it but were stopped before recording so: carry on from it.
            info = await self._write_manifest(self.studio, name, manifest, current.digest)
        local.refs[name] = info.digest
        local.created.setdefault(name, created.isoformat())
        return info

    async def _written_by(self, digest: str, session: str) -> bool:
        try:
            return (await self._manifest(digest)).session == session
        except AgentError:
            return False

    async def _write_manifest(
        self, studio: str, name: str, manifest: Manifest, expect: str | None
    ) -> CheckpointInfo:
        data, digest = manifest.encode()
        await self.store.put_bytes(data, digest, self.spool)
        await self.store.set_ref(studio, name, digest, expect)
        updated = datetime.fromtimestamp(self._clock(), UTC)
        return _info(studio, name, RefValue(digest, updated), manifest)

    # -- listing, renaming, diff ---------------------------------------------------------------

    async def list_checkpoints(self) -> list[CheckpointInfo]:
        """This studio's checkpoints, most recently updated first."""
        refs = await self.store.list_refs(self.studio)

        async def one(name: str, ref: RefValue) -> CheckpointInfo | None:
            try:
                return _info(self.studio, name, ref, await self._manifest(ref.digest))
            except (BlobMissing, DigestMismatch, CorruptLayer) as e:
                log.warning("checkpoint.unreadable", checkpoint=name, error=str(e))
                return None

        infos = await asyncio.gather(*(one(n, r) for n, r in refs.items()))
        out = [i for i in infos if i is not None]
        out.sort(key=lambda i: i.updated, reverse=True)
        return out

    async def rename(self, old: str, new: str) -> CheckpointInfo:
        old_n, new_n = normalize_name(old), normalize_name(new)
        async with self._lock:
            ref = await self.store.get_ref(self.studio, old_n)
            if ref is None:
                raise NotFound(f"no checkpoint {old_n!r} in studio {self.studio}")
            if old_n == new_n:
                return _info(self.studio, old_n, ref, await self._manifest(ref.digest))
            try:
                await self.store.set_ref(self.studio, new_n, ref.digest, None)
            except RefConflict:
                raise RefConflict(
                    f"checkpoint {new_n!r} already exists in studio {self.studio}"
                ) from None
            await self.store.delete_ref(self.studio, old_n, ref.digest)
            local = self._local or self._load_local()
            if local is not None and old_n in local.refs:
                local.refs[new_n] = local.refs.pop(old_n)
                if old_n in local.created:
                    local.created[new_n] = local.created.pop(old_n)
                if local.name == old_n:
                    local.name = new_n
                await asyncio.to_thread(self._save_local, local, None)
            manifest = await self._manifest(ref.digest)
            new_ref = await self.store.get_ref(self.studio, new_n)
            return _info(self.studio, new_n, new_ref or ref, manifest)

    async def diff(self) -> DiffReport:
        """What changed since the parent state, largest first."""
        local = self._session()
        parent = await asyncio.to_thread(self._parent_entries, local)
        current = await asyncio.to_thread(self._scan, parent)
        lines = diffmod.report(parent, current.entries)
        return DiffReport(lines, [Skipped(p, r) for p, r in current.skipped])

    def cancel(self) -> None:
        """Abandon a checkpoint in progress (its ref is never written)."""
        self._cancel.set()


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _info(studio: str, name: str, ref: RefValue, manifest: Manifest) -> CheckpointInfo:
    return CheckpointInfo(
        studio=studio,
        name=name,
        digest=ref.digest,
        state=manifest.state,
        session=manifest.session,
        created=manifest.created,
        updated=ref.updated,
        size=manifest.size,
        layers=len(manifest.layers),
    )


def _log_skipped(result: Scan) -> None:
    for path, reason in result.skipped:
        log.warning("scan.skipped", path=path, reason=reason)


def _next_parent(
    parent: dict[str, Stat], current: dict[str, Stat], layer: LayerResult
) -> dict[str, Stat]:
    """The root as the chain now records it: what was written, as it was read."""
    entries = dict(current)
    entries.update(layer.records)
    for path in layer.reverted:
        old = parent.get(path)
        if old is None:
            entries.pop(path, None)
        else:
            entries[path] = old
    return entries
