"""Deleting checkpoints and collecting garbage, on both stores: exactly the
unreachable blobs go, shared ones stay, running sessions' chains are kept by
their leases, one gc runs at a time, and hostile refs stop the sweep."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fault_proxy import Fault, FaultProxy
from fsutil import settings_for

from agent.checkpoint.manifest import CheckpointState, LayerDesc, Manifest
from agent.errors import AgentError
from agent.session import Session
from agent.session.gc import GcReport, collect
from agent.session.lease import GC_LEASE, GcLease, GcLeaseDoc, GcLeaseHeld, SessionLease
from agent.session.reach import ManifestReader
from agent.settings import Settings
from agent.store.base import Store
from agent.store.local import LocalStore
from agent.store.s3 import S3Store

ZERO = timedelta(0)


class World:
    """Sessions of several studios on one store, each on a root of its own."""

    def __init__(self, store: Store, tmp: Path) -> None:
        self.store = store
        self.tmp = tmp
        self.n = 0

    def session(self, studio: str) -> tuple[Session, Path]:
        self.n += 1
        root = self.tmp / f"root{self.n}"
        root.mkdir(parents=True)
        state = self.tmp / f"state{self.n}"
        return Session(settings_for(root, self.tmp / "work", state, studio), self.store), root

    async def restore(self, source: str) -> Path:
        """Restore ``source`` on a fresh root; return the root."""
        s, root = self.session("restorer")
        out = await s.start(source, required=True)
        assert out.restored is not None
        await s.release_lease()
        return root

    async def gc(self, **kw: object) -> GcReport:
        return await collect(self.store, self.tmp / "gc-scratch", grace=ZERO, **kw)  # type: ignore[arg-type]


@pytest.fixture
def world(any_store: Store, tmp_path: Path) -> World:
    return World(any_store, tmp_path)


async def blob_set(store: Store) -> set[str]:
    return {b.digest async for page in store.iter_blobs() for b in page}


def noise(n: int) -> str:
    """Text that does not compress: sizes then say something."""
    return os.urandom(n // 2).hex()


async def reachable(store: Store, scratch: Path) -> set[str]:
    """What every ref of every studio reaches, computed here independently."""
    reader = ManifestReader(store, scratch)
    out: set[str] = set()
    for studio in await store.list_studios():
        for ref in (await store.list_refs(studio)).values():
            out.add(ref.digest)
            _, kids = await reader.read(ref.digest)
            out.update(k.digest for k in kids)
    return out


def files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in root.rglob("*.txt")
        if "var/lib/studio-agent" not in str(p)
    }


async def all_restore(world: World, expected: dict[str, dict[str, str]]) -> None:
    """Every listed checkpoint restores to what it held when written."""
    for source, content in expected.items():
        root = await world.restore(source)
        assert files(root) == content, source


async def test_delete_then_gc_removes_exactly_the_unreachable(world: World) -> None:
    s, root = world.session("st")
    await s.baseline()
    expected: dict[str, dict[str, str]] = {}
    for i, name in enumerate(["one", "two", "three"]):
        (root / f"f{i}.txt").write_text(name)
        await s.checkpoint(name)
        expected[f"st/{name}"] = files(root)
    other, oroot = world.session("st")
    await other.baseline()
    (oroot / "lone.txt").write_text("x")
    await other.checkpoint("lone")
    await s.release_lease()
    await other.release_lease()

    info = await s.delete("three")
    assert info is not None and info.name == "three"
    await other.delete("st/lone")
    del expected["st/three"]
    before = await blob_set(world.store)
    keep = await reachable(world.store, world.tmp / "scratch")
    report = await world.gc()
    after = await blob_set(world.store)
    assert after == before & keep
    assert report.deleted == len(before - keep) == 4  # two manifests, two layers
    assert report.exit_code == 0
    assert [c.name for c in await s.list_checkpoints()] == ["two", "one"]
    await all_restore(world, expected)
    again = await world.gc()
    assert again.deleted == 0 and again.doomed == [] and again.exit_code == 0


async def test_sizes_say_what_deleting_would_free(world: World) -> None:
    s, root = world.session("st")
    await s.baseline()
    (root / "a.txt").write_text(noise(5000))
    await s.checkpoint("one")
    (root / "b.txt").write_text(noise(9000))
    await s.checkpoint("two")
    await s.release_lease()
    sizes = {c.name: c for c in await s.list_checkpoints(sizes=True)}
    one, two = sizes["one"], sizes["two"]
    assert two.size > one.size and two.layers == 2
    assert one.frees is not None and two.frees is not None
    # "two" alone reaches its own layer and manifest; "one" only its manifest.
    layer2 = two.size - one.size
    assert two.frees > layer2 > one.frees > 0
    assert "frees" in one.to_json() and "frees" not in (await s.list_checkpoints())[0].to_json()
    before = await blob_set(world.store)
    await s.delete("two")
    report = await world.gc()
    assert report.freed == two.frees
    assert len(before) - len(await blob_set(world.store)) == 2


async def test_blobs_shared_with_a_clone_survive_deleting_the_studio(world: World) -> None:
    a, aroot = world.session("a")
    await a.baseline()
    (aroot / "base.txt").write_text("from a")
    await a.checkpoint("base")
    (aroot / "mine.txt").write_text("only a")
    await a.checkpoint("later")
    await a.release_lease()

    b, broot = world.session("b")
    await b.start("a/base", required=True)
    (broot / "b.txt").write_text("from b")
    await b.checkpoint("work")
    await b.release_lease()
    expected = files(broot)

    done = await a.delete_studio("a")
    assert sorted(done.deleted) == ["base", "later"] and done.failed == []
    assert await world.store.list_refs("a") == {}
    report = await world.gc()
    assert report.deleted == 3  # a's two manifests and the layer only "later" had
    await all_restore(world, {"b/work": expected})


async def test_a_running_session_keeps_the_chain_it_started_from(world: World) -> None:
    src, sroot = world.session("src")
    await src.baseline()
    (sroot / "base.txt").write_text("base")
    await src.checkpoint("base")
    await src.release_lease()

    running, root = world.session("run")
    await running.start("src/base", required=True)
    await src.delete_studio("src")  # the checkpoint it started from: gone
    report = await world.gc()
    assert report.exit_code == 0 and report.leases == 1 and report.deleted == 0
    (root / "new.txt").write_text("new")
    result = await running.checkpoint()
    assert result is not None
    await running.release_lease()
    await all_restore(world, {f"run/{result.info.name}": files(root)})


async def test_without_a_lease_a_collected_chain_is_not_extended_but_started_anew(
    world: World,
) -> None:
    """A chain gc took while no lease kept it is never extended (that checkpoint
    could not be restored): the next checkpoint starts a new chain holding the
    whole root, so nothing of the session's is lost."""
    src, sroot = world.session("src")
    await src.baseline()
    (sroot / "base.txt").write_text("base")
    await src.checkpoint("base")
    await src.release_lease()
    running, root = world.session("run")
    await running.start("src/base", required=True)
    await running.release_lease()  # as if it had lapsed
    await src.delete_studio("src")
    assert (await world.gc()).deleted == 3  # the manifest, the layer and the config blob
    (root / "new.txt").write_text("new")
    result = await running.checkpoint()
    assert result is not None and "starts a new chain" in result.note
    assert result.info.layers == 1
    await running.release_lease()
    await all_restore(world, {f"run/{result.info.name}": files(root)})


async def test_a_deleted_own_checkpoint_is_written_again(world: World) -> None:
    s, root = world.session("st")
    await s.baseline()
    (root / "a.txt").write_text("1")
    first = await s.checkpoint()
    assert first is not None
    other, _ = world.session("st")  # another process deletes it
    await other.delete(first.info.name)
    (root / "b.txt").write_text("2")
    again = await s.checkpoint()
    assert again is not None and again.info.name == first.info.name
    await s.release_lease()
    await all_restore(world, {f"st/{first.info.name}": files(root)})


async def test_two_gcs_at_once_one_runs_the_other_is_told(world: World) -> None:
    s, root = world.session("st")
    await s.baseline()
    (root / "a.txt").write_text("a")
    await s.checkpoint("gone")
    await s.release_lease()
    await s.delete("gone")

    listing = asyncio.Event()
    go_on = asyncio.Event()
    real = world.store.iter_blobs

    async def held_up() -> object:
        listing.set()
        await go_on.wait()
        async for page in real():
            yield page

    world.store.iter_blobs = held_up  # type: ignore[method-assign,assignment]
    first = asyncio.create_task(world.gc())
    await listing.wait()
    world.store.iter_blobs = real  # type: ignore[method-assign]
    with pytest.raises(GcLeaseHeld, match=r"another gc holds the lease .* expires at"):
        await world.gc()
    go_on.set()
    report = await first
    assert report.deleted == 3  # manifest, layer, config
    assert await world.store.get_lease(GC_LEASE) is None  # released


async def test_a_stale_gc_lease_is_taken_over(world: World) -> None:
    now = [time.time()]
    stale = GcLease(world.store, lambda: now[0], ttl=60)
    await stale.take()
    now[0] += 61  # blobs written since are younger than the cutoff: harmless here
    report = await collect(world.store, world.tmp / "x", grace=ZERO, clock=lambda: now[0])
    assert report.exit_code == 0
    with pytest.raises(AgentError, match=r"taken over|expired"):
        await stale.renew("delete")


async def test_a_gc_whose_lease_expires_stops_deleting(world: World) -> None:
    s, root = world.session("st")
    await s.baseline()
    for i in range(3):
        (root / f"{i}.txt").write_text(str(i))
        await s.checkpoint(f"c{i}")
    await s.release_lease()
    for i in range(3):
        await s.delete(f"c{i}")
    now = [time.time() + 1]

    def progress(line: str) -> None:
        if line.startswith("deleted"):
            now[0] += 1000  # held up past the lease's expiry after the first batch

    report = await collect(
        world.store,
        world.tmp / "x",
        grace=ZERO,
        clock=lambda: now[0],
        lease_ttl=100,
        batch=1,
        progress=progress,
    )
    assert report.deleted == 1
    assert report.stopped is not None and "expired" in report.stopped
    assert len(report.left) == len(report.doomed) - 1 == 6
    assert len(await blob_set(world.store)) == 6


async def test_a_writer_waits_out_a_gc_batch_before_trusting_a_present_blob(
    world: World,
) -> None:
    """The race a refresh cannot close: gc chose a batch on a view of the leases
    older than the writer's.  The writer's hold returns only after the gc's next
    renewal, after which the gc reads the writer's lease before it deletes more."""
    gc = GcLease(world.store)
    await gc.take()
    await gc.renew("delete")  # a batch is in flight
    polls = asyncio.Event()
    calls = 0
    real_get = world.store.get_lease

    async def counting(name: str) -> object:
        nonlocal calls
        if name == GC_LEASE:
            calls += 1
            if calls >= 4:
                polls.set()
        return await real_get(name)

    world.store.get_lease = counting  # type: ignore[method-assign,assignment]
    lease = SessionLease(world.store, "st")
    writer = asyncio.create_task(lease.hold([], ["sha256:" + "0" * 64]))
    await polls.wait()
    assert not writer.done()  # still fenced: the batch may delete what it named
    await gc.renew("delete")  # the batch is over; the next reads the leases again
    assert await writer is True  # fresh: the caller checks what it relies on
    world.store.get_lease = real_get  # type: ignore[method-assign]
    doc = GcLeaseDoc.decode((await world.store.get_lease(GC_LEASE)).body)  # type: ignore[union-attr]
    assert doc.phase == "delete" and doc.batch == 2
    await gc.release()
    await lease.release()


async def test_a_bad_ref_or_manifest_stops_the_sweep(world: World, tmp_path: Path) -> None:
    s, root = world.session("st")
    await s.baseline()
    (root / "a.txt").write_text("a")
    await s.checkpoint("kept")
    (root / "b.txt").write_text("b")
    await s.checkpoint("gone")
    await s.release_lease()
    await s.delete("gone")
    before = await blob_set(world.store)

    # A manifest that is not one, under a ref: what it protects is unknown.
    junk = b'{"layers": [{"digest": 7}]}'
    junk_digest = "sha256:" + hashlib.sha256(junk).hexdigest()
    await world.store.put_bytes(junk, junk_digest, tmp_path / "stage")
    await world.store.set_ref("evil", "x", junk_digest, None)
    report = await world.gc()
    assert (
        report.refused is not None and "evil/x" in report.refused and "malformed" in report.refused
    )
    assert report.exit_code == 1 and report.deleted == 0
    assert await blob_set(world.store) == before | {junk_digest}
    await world.store.delete_ref("evil", "x", junk_digest)

    # A ref that is not a ref document.
    await _write_raw_ref(world.store, "evil", "y", b"not json")
    report = await world.gc()
    assert report.refused is not None and "evil/y" in report.refused
    assert report.deleted == 0
    await _remove_raw_ref(world.store, "evil", "y")

    # A ref whose manifest is gone: reported as broken, the sweep goes on.
    await world.store.set_ref("evil", "z", "sha256:" + "e" * 64, None)
    report = await world.gc()
    assert report.refused is None and any("evil/z is broken" in p for p in report.problems)
    assert report.deleted == 3  # "gone"'s manifest, its layer, the junk manifest
    assert [c.name for c in await s.list_checkpoints()] == ["kept"]


async def _write_raw_ref(store: Store, studio: str, name: str, data: bytes) -> None:
    if isinstance(store, LocalStore):
        path = store.root / "refs" / studio / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    assert isinstance(store, S3Store)
    key = store.url.removeprefix(f"s3://{store.bucket}/") + f"/refs/{studio}/{name}"
    await store._conn.call(
        "PutObject", key, lambda c: c.put_object(Bucket=store.bucket, Key=key, Body=data)
    )


async def _remove_raw_ref(store: Store, studio: str, name: str) -> None:
    if isinstance(store, LocalStore):
        (store.root / "refs" / studio / name).unlink()
        return
    assert isinstance(store, S3Store)
    key = store.url.removeprefix(f"s3://{store.bucket}/") + f"/refs/{studio}/{name}"
    await store._conn.call(
        "DeleteObject", key, lambda c: c.delete_object(Bucket=store.bucket, Key=key)
    )


async def test_a_squashed_style_manifest_is_followed_generically(
    world: World, tmp_path: Path
) -> None:
    """gc follows any OCI manifest's descriptors, whatever wrote it: an index
    naming a manifest naming a layer keeps all three."""
    layer = b"layer bytes"
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    await world.store.put_bytes(layer, layer_digest, tmp_path / "stage")
    layers = (LayerDesc(layer_digest, len(layer)),)
    inner = Manifest("st", "sess", CheckpointState.FINALIZED, datetime.now(UTC), layers)
    data, inner_digest = inner.encode()
    await world.store.put_bytes(data, inner_digest, tmp_path / "stage")
    index = json.dumps(
        {"schemaVersion": 2, "manifests": [{"digest": inner_digest, "size": len(data)}]}
    ).encode()
    index_digest = "sha256:" + hashlib.sha256(index).hexdigest()
    await world.store.put_bytes(index, index_digest, tmp_path / "stage")
    await world.store.set_ref("st", "squashed", index_digest, None)
    orphan = b"orphan"
    await world.store.put_bytes(orphan, "sha256:" + hashlib.sha256(orphan).hexdigest(), tmp_path)
    report = await world.gc()
    assert report.deleted == 1
    assert await blob_set(world.store) == {layer_digest, inner_digest, index_digest}


async def test_dry_run_deletes_nothing_and_says_what_would_go(world: World) -> None:
    s, root = world.session("st")
    await s.baseline()
    (root / "a.txt").write_text(noise(1000))
    await s.checkpoint("gone")
    await s.release_lease()
    await s.delete("gone")
    before = await blob_set(world.store)
    report = await world.gc(dry_run=True)
    assert {d for d, _ in report.doomed} == before and report.doomed_bytes > 1000
    assert await blob_set(world.store) == before
    assert await world.store.get_lease(GC_LEASE) is None  # a dry run takes no lease
    young = await collect(world.store, world.tmp / "x", grace=timedelta(hours=1), dry_run=True)
    assert young.doomed == []  # all written within the grace period


# -- refusals on S3 -----------------------------------------------------------------------


@pytest.fixture
def proxied_store(
    fault_proxy: FaultProxy,
    s3_env: Callable[[str], None],
    s3_workdir: str,
    store_settings: Settings,
) -> S3Store:
    s3_env(fault_proxy.endpoint_url)
    return S3Store.from_url(s3_workdir, store_settings, backoff_base=0.01)


@pytest.mark.parametrize("times", [None, 1])
async def test_a_refused_delete_is_reported_and_harms_nothing(
    proxied_store: S3Store, fault_proxy: FaultProxy, tmp_path: Path, times: int | None
) -> None:
    world = World(proxied_store, tmp_path)
    s, root = world.session("st")
    await s.baseline()
    (root / "kept.txt").write_text("kept")
    await s.checkpoint("kept")
    expected = files(root)
    (root / "x.txt").write_text("x")
    await s.checkpoint("gone")
    await s.release_lease()
    await s.delete("gone")
    before = await blob_set(proxied_store)
    fault_proxy.add(
        Fault(
            "status",
            operation="DeleteObject",
            path="/blobs/",
            times=times,
            status=403,
            code="AccessDenied",
        )
    )
    report = await world.gc()
    assert len(report.doomed) == 2
    assert report.errors and "s3:DeleteObject" in report.errors[0]
    if times is None:  # every delete refused: nothing it had to delete went
        assert report.deleted == 0 and len(report.left) == 2 and report.exit_code == 1
        assert await blob_set(proxied_store) == before
    else:  # one refused: the other went, and the run succeeded
        assert report.deleted == 1 and len(report.left) == 1 and report.exit_code == 0
        assert await blob_set(proxied_store) == before - {d for d, _ in report.doomed} | set(
            report.left
        )
    assert await proxied_store.get_lease(GC_LEASE) is None
    await all_restore(World(proxied_store, tmp_path / "r"), {"st/kept": expected})
    await proxied_store.close()
