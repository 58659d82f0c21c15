"""Squashing a checkpoint: the upper part of its chain replaced by one layer.

Write order as for a checkpoint: the new layer (spooled while hashed, then put
in the store), the new manifest (the same annotations and state, the chain's
untouched lower layers and the new one), then the ref, moved by compare-and-swap.
Until the ref moves nothing names the new layer; a kill leaves the old
checkpoint listed and restorable.

The long part (fetching and squashing) runs without the session's lock, so a
checkpoint is never held up by it; only the last step, manifest and ref (and
the session's own chain when the checkpoint is its own), takes the lock, for a
moment.  A checkpoint that landed meanwhile is never lost: when its chain still
starts with the squashed layers, the squash is rebased onto it (the new layer
stands for the same layers; what came after them stays on top); when it does
not (another session wrote the ref), the squash gives up and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import platform
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from agent.checkpoint.layer_writer import Cancelled
from agent.checkpoint.manifest import LayerDesc, Manifest
from agent.checkpoint.merge import read_order
from agent.checkpoint.restore import LayerFile
from agent.checkpoint.squash import SquashResult, squash_layers
from agent.errors import AgentError, RefConflict
from agent.log import get_logger
from agent.session.local import LocalState
from agent.session.manifests import Manifests
from agent.session.records import CheckpointInfo
from agent.settings import Settings
from agent.store.base import Store
from agent.store.fetch import Fetch

log = get_logger("session")

T = TypeVar("T")
# Runs a step under the session's lock (the facade's).
Locked = Callable[[Callable[[], Awaitable["CheckpointInfo"]]], Awaitable["CheckpointInfo"]]

# Size tiers: a run of layers each at most FACTOR times the size of the newer
# ones together is merged; a bottom layer is rewritten once half of it is superseded.
FACTOR = 4
COMMIT_ATTEMPTS = 5


class SquashConflict(AgentError):
    """The checkpoint changed under the squash in a way it cannot rebase onto."""


@dataclass(frozen=True, slots=True)
class SquashOutcome:
    """What a squash did: ``before`` and ``after`` are the checkpoint as listed
    (the same when nothing was squashed)."""

    before: CheckpointInfo
    after: CheckpointInfo
    squashed: int  # layers replaced by one (0: nothing to do)
    superseded: int  # uncompressed bytes of theirs the new layer left out
    rebased: int  # layers of checkpoints written meanwhile, kept on top

    def to_json(self) -> dict[str, object]:
        return {
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "squashed": self.squashed,
            "superseded": self.superseded,
            "rebased": self.rebased,
        }


# -- the policy -----------------------------------------------------------------------


def _bytes(layer: LayerDesc) -> int:
    return layer.uncompressed or layer.size


def superseded_estimate(layers: Sequence[LayerDesc]) -> int:
    """Bytes of the chain its newer layers replace: each layer's recorded
    ``replaced`` (what its changes made obsolete below it, from the parent state
    when written), bounded by what lies below it in the chain.  An estimate from
    above: what was replaced in the image counts too."""
    below = 0
    out = 0
    for layer in layers:
        out += min(layer.replaced, below)
        below += _bytes(layer)
    return out


def plan(layers: Sequence[LayerDesc], max_layers: int) -> int | None:
    """Where the squash of this chain should start (its first layer's index), or
    None when it should not squash.

    Triggered by more than ``max_layers`` layers or superseded bytes over half of
    the chain.  It costs what the recent layers cost, as a log-structured store
    compacts: the newest run of layers of like size (each at most ``FACTOR``
    times the newer ones together) is merged; a bottom layer larger than that
    (a previous squash's) is rewritten only when half of it is superseded.

    A layer cut into segments counts as the one layer it was written as: its
    segments are never merged for being many, nor squashed apart."""
    whole, first = _uncut(layers)
    start = _plan(whole, max_layers)
    return None if start is None else first[start]


def _uncut(layers: Sequence[LayerDesc]) -> tuple[list[LayerDesc], list[int]]:
    """The chain with each cut layer's segments joined into one (sizes and counts
    summed), and the index in ``layers`` of each one's first."""
    whole: list[LayerDesc] = []
    first: list[int] = []
    for i, x in enumerate(layers):
        if x.continues and whole:
            w = whole[-1]
            whole[-1] = LayerDesc(
                w.digest,
                w.size + x.size,
                w.files + x.files,
                w.uncompressed + x.uncompressed,
                w.replaced + x.replaced,
            )
        else:
            whole.append(x)
            first.append(i)
    return whole, first


def _plan(layers: Sequence[LayerDesc], max_layers: int) -> int | None:
    n = len(layers)
    if n < 2:
        return None
    total = sum(_bytes(x) for x in layers)
    superseded = superseded_estimate(layers)
    over_count = n > max_layers
    if not over_count and superseded * 2 <= total:
        return None
    bottom = _bytes(layers[0])
    if min(bottom, sum(x.replaced for x in layers[1:])) * 2 >= bottom:
        return 0
    if over_count:
        start, run = n - 1, _bytes(layers[-1])
        for i in range(n - 2, -1, -1):  # a bottom of like size is no big rewrite
            if _bytes(layers[i]) > FACTOR * run:
                break
            run += _bytes(layers[i])
            start = i
        if n - start >= 2:
            return start
    return 1 if n >= 3 else 0


# -- low priority -------------------------------------------------------------------------

_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "arm64": 30}
_IOPRIO_CLASS_IDLE = 3


def lower_thread_priority() -> None:
    """This thread (and the threads it starts, which inherit it) at nice 19 and
    in the idle I/O class, where the system allows; best effort."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    nr = _IOPRIO_SET.get(platform.machine())
    if nr is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall(nr, 1, tid, _IOPRIO_CLASS_IDLE << 13)  # IOPRIO_WHO_PROCESS


async def _in_thread(fn: Callable[[], T], low_priority: bool) -> T:
    """``fn`` on a thread of its own (a pool thread would keep the lowered priority)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def done(result: T | None, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        if low_priority:
            lower_thread_priority()
        try:
            result = fn()
        except BaseException as e:
            loop.call_soon_threadsafe(done, None, e)
            return
        loop.call_soon_threadsafe(done, result, None)

    threading.Thread(target=run, name="squash", daemon=True).start()
    return await fut


# -- the squash ---------------------------------------------------------------------------


class Squasher:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        spool: Path,
        local: LocalState,
        manifests: Manifests,
        locked: Locked,
    ) -> None:
        self._settings = settings
        self._store = store
        self._spool = spool
        self._local = local
        self._manifests = manifests
        self._locked = locked

    async def squash(
        self,
        studio: str,
        name: str,
        *,
        start: int = 0,
        cancel: threading.Event | None = None,
        low_priority: bool = False,
    ) -> SquashOutcome:
        """Squash ``studio``/``name`` from layer ``start`` (default: the whole
        chain) to its newest.  ``cancel`` set stops it with ``Cancelled``, the
        checkpoint untouched."""
        before, manifest = await self._manifests.resolve(studio, name)
        layers = manifest.layers
        while 0 < start < len(layers) and layers[start].continues:
            start -= 1  # a cut layer is squashed whole: its hardlinks may cross its segments
        if len(layers) - start < 2:
            return SquashOutcome(before, before, 0, 0, 0)
        tmp = self._spool / f"squash-{uuid.uuid4().hex}.tmp"
        try:
            result = await self._write(layers[start:], tmp, cancel, low_priority)
            await self._store.put_blob(tmp, result.layer.digest, result.layer.size)
        finally:
            tmp.unlink(missing_ok=True)
        desc = _squashed_desc(layers[start:], result)
        if cancel is not None and cancel.is_set():
            raise Cancelled("squash cancelled")
        return await self._commit(before, manifest, start, desc, result)

    async def _write(
        self,
        layers: Sequence[LayerDesc],
        tmp: Path,
        cancel: threading.Event | None,
        low_priority: bool,
    ) -> SquashResult:
        """Fetch the layers (newest first, each read as it arrives and verified as
        read) and squash them to the spool file ``tmp``."""
        blobs = [(x.digest, x.size) for x in layers]
        continues = [x.continues for x in layers]
        order = read_order(len(layers), continues)
        self._spool.mkdir(parents=True, exist_ok=True)
        async with Fetch(self._store, blobs, self._spool, order=order) as fetch:

            def get(index: int) -> LayerFile:
                # The store verified the blob before handing it out.
                return LayerFile(fetch.wait_complete(index), size=layers[index].size)

            def run() -> SquashResult:
                with open(tmp, "wb") as f:
                    return squash_layers(
                        len(layers),
                        f,
                        get,
                        level=self._settings.compression_level,
                        threads=self._settings.compression_threads,
                        cancel=cancel,
                        total_bytes=sum(x.uncompressed for x in layers),
                        continues=continues,
                    )

            try:
                return await _in_thread(run, low_priority)
            except OSError as e:
                raise AgentError(
                    f"cannot write the squashed layer to {self._spool}: {e.strerror or e}"
                ) from e

    async def _commit(
        self,
        before: CheckpointInfo,
        old: Manifest,
        start: int,
        desc: LayerDesc,
        result: SquashResult,
    ) -> SquashOutcome:
        """Manifest and ref, under the session's lock; rebased onto a checkpoint
        written meanwhile."""
        studio, name = before.studio, before.name
        end = len(old.layers)
        expect, current = before.digest, old

        async def once() -> CheckpointInfo:
            chain = (*current.layers[:start], desc, *current.layers[end:])
            manifest = Manifest(
                current.studio, current.session, current.state, current.created, chain
            )
            info = await self._manifests.write(studio, name, manifest, expect)
            await self._follow(studio, name, expect, info.digest, current.layers, chain)
            return info

        for _ in range(COMMIT_ATTEMPTS):
            try:
                after = await self._locked(once)
            except RefConflict:
                ref = await self._store.get_ref(studio, name)
                if ref is None:
                    raise SquashConflict(
                        f"checkpoint {name!r} of studio {studio} was deleted during the "
                        "squash; nothing was changed"
                    ) from None
                current = await self._manifests.read(ref.digest)
                if current.layers[:end] != old.layers:
                    raise SquashConflict(
                        f"checkpoint {name!r} of studio {studio} was rewritten during the "
                        "squash with another chain; gave up, it is kept as written"
                    ) from None
                expect = ref.digest
                continue
            rebased = len(current.layers) - end
            log.info(
                "checkpoint.squashed",
                studio=studio,
                checkpoint=name,
                layers_before=len(current.layers),
                layers_after=after.layers,
                squashed=end - start,
                size_before=current.size,
                size_after=after.size,
                superseded=result.superseded,
                rebased=rebased,
            )
            return SquashOutcome(before, after, end - start, result.superseded, rebased)
        raise SquashConflict(
            f"checkpoint {name!r} of studio {studio} kept changing during the squash; "
            "gave up, it is kept as written"
        )

    async def _follow(
        self,
        studio: str,
        name: str,
        old: str,
        new: str,
        replaced: Sequence[LayerDesc],
        chain: Sequence[LayerDesc],
    ) -> None:
        """When this session wrote the ref's old manifest, its record follows: the
        ref's new digest, and its chain, when it starts with the replaced chain
        (it may have grown since, under another name), starts with the new one,
        so the next checkpoint extends the squashed chain."""
        local = self._local.peek()
        if local is None or studio != self._settings.studio or local.refs.get(name) != old:
            return
        local.refs[name] = new
        n = len(replaced)
        if tuple(local.chain[:n]) == tuple(replaced):
            local.chain = [*chain, *local.chain[n:]]
        await asyncio.to_thread(self._local.save, local, None)


def _squashed_desc(layers: Sequence[LayerDesc], result: SquashResult) -> LayerDesc:
    """The new layer's descriptor; what it replaces below it is what its layers
    replaced less what they superseded of each other."""
    below = max(0, sum(x.replaced for x in layers) - result.superseded)
    r = result.layer
    return LayerDesc(r.digest, r.size, r.entries, r.uncompressed, below)


__all__ = [
    "SquashConflict",
    "SquashOutcome",
    "Squasher",
    "lower_thread_priority",
    "plan",
    "superseded_estimate",
]
