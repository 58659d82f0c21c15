"""The Store contract, run against the local store and the S3 store alike."""

from __future__ import annotations

import asyncio
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fsutil import replace_blob
from s3_server import S3Endpoint

from agent.errors import BlobMissing, DigestMismatch, InvalidName, RefConflict
from agent.settings import Settings, load_settings
from agent.store import open_store
from agent.store.base import Store
from agent.store.s3 import S3Store

MiB = 1 << 20
# Sizes that take every path: empty, tiny, one part, and (with 5 MiB parts)
# a multipart upload read back with ranged GETs.
SIZES = [0, 1, 3 * MiB, 11 * MiB + 7]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_src(dir: Path, data: bytes) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    path = dir / f"src-{os.urandom(6).hex()}"
    path.write_bytes(data)
    return path


async def put(store: Store, tmp_path: Path, data: bytes) -> str:
    digest = digest_of(data)
    await store.put_blob(write_src(tmp_path / "src", data), digest, len(data))
    return digest


# -- blobs ----------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
async def test_put_then_get_round_trips(any_store: Store, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    digest = digest_of(data)
    assert not await any_store.has_blob(digest)
    await any_store.put_blob(write_src(tmp_path / "src", data), digest, size)
    assert await any_store.has_blob(digest)
    for known_size in (size, None):
        path = await any_store.get_blob(digest, known_size, tmp_path / "dest")
        assert path.read_bytes() == data
    dest = tmp_path / "dest"
    if dest.exists():  # nothing but finished blobs is left in the destination
        assert all(not p.name.startswith(".") for p in dest.iterdir())


async def test_put_of_an_existing_blob_is_harmless(any_store: Store, tmp_path: Path) -> None:
    data = os.urandom(4096)
    digest = await put(any_store, tmp_path, data)
    await put(any_store, tmp_path, data)
    path = await any_store.get_blob(digest, len(data), tmp_path / "dest")
    assert path.read_bytes() == data


async def test_put_refuses_a_wrong_size(any_store: Store, tmp_path: Path) -> None:
    data = os.urandom(1000)
    with pytest.raises(DigestMismatch):
        await any_store.put_blob(write_src(tmp_path, data), digest_of(data), len(data) + 1)
    assert not await any_store.has_blob(digest_of(data))


async def test_get_of_a_missing_blob(any_store: Store, tmp_path: Path) -> None:
    digest = digest_of(b"never stored")
    assert not await any_store.has_blob(digest)
    with pytest.raises(BlobMissing):
        await any_store.get_blob(digest, None, tmp_path / "dest")


@pytest.mark.parametrize("size", [4096, 11 * MiB])
async def test_corrupt_blob_is_detected(
    any_store: Store, s3: S3Endpoint | None, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    digest = await put(any_store, tmp_path, data)
    flipped = bytes([data[size // 2] ^ 0x01])
    replace_blob(any_store, digest, data[: size // 2] + flipped + data[size // 2 + 1 :], s3)
    for known_size in (size, None):
        with pytest.raises(DigestMismatch, match="corrupt"):
            await any_store.get_blob(digest, known_size, tmp_path / "dest")
    assert_nothing_left(any_store, tmp_path / "dest")


@pytest.mark.parametrize("size", [4096, 11 * MiB])
@pytest.mark.parametrize("kept", ["empty", "short"])
async def test_short_or_empty_blob_is_refused(
    any_store: Store, s3: S3Endpoint | None, tmp_path: Path, size: int, kept: str
) -> None:
    data = os.urandom(size)
    digest = await put(any_store, tmp_path, data)
    replace_blob(any_store, digest, b"" if kept == "empty" else data[:-1], s3)
    for known_size in (size, None):
        with pytest.raises(DigestMismatch):
            await any_store.get_blob(digest, known_size, tmp_path / "dest")
    assert_nothing_left(any_store, tmp_path / "dest")


async def test_unverified_get_checks_the_size(
    any_store: Store, s3: S3Endpoint | None, tmp_path: Path
) -> None:
    """``verify=False`` is for a caller that hashes as it reads: the bytes come
    back as stored, and a blob of the wrong size is still refused."""
    size = 11 * MiB
    data = os.urandom(size)
    digest = await put(any_store, tmp_path, data)
    path = await any_store.get_blob(digest, size, tmp_path / "dest", verify=False)
    assert path.read_bytes() == data
    replace_blob(any_store, digest, data[:-1], s3)
    with pytest.raises(DigestMismatch):
        await any_store.get_blob(digest, size, tmp_path / "dest2", verify=False)
    assert_nothing_left(any_store, tmp_path / "dest2")


@pytest.mark.parametrize("verify", [True, False])
async def test_get_reports_the_bytes_as_they_arrive(
    any_store: Store, tmp_path: Path, verify: bool
) -> None:
    """``on_data(path, n)``: the first n bytes of path are final when it is called
    (a restore starts reading them), n grows, and the last call has the whole blob."""
    size = 11 * MiB  # more than one ranged GET through S3
    data = os.urandom(size)
    digest = await put(any_store, tmp_path, data)
    seen: list[int] = []

    def on_data(path: Path, n: int) -> None:
        with open(path, "rb") as f:
            assert f.read(n) == data[:n]
        seen.append(n)

    got = await any_store.get_blob(digest, size, tmp_path / "dest", verify=verify, on_data=on_data)
    assert got.read_bytes() == data
    assert seen and seen == sorted(seen) and seen[-1] == size
    if isinstance(any_store, S3Store):
        assert len(seen) == -(-size // any_store.part_size)  # one report per range


def assert_nothing_left(store: Store, dest: Path) -> None:
    if isinstance(store, S3Store) and dest.exists():
        assert list(dest.iterdir()) == []


async def test_small_blobs_in_memory(any_store: Store, tmp_path: Path) -> None:
    data = b'{"schemaVersion": 2}'
    digest = digest_of(data)
    await any_store.put_bytes(data, digest, tmp_path / "tmp")
    assert await any_store.get_bytes(digest, tmp_path / "tmp") == data


# -- refs -----------------------------------------------------------------------


async def test_ref_create_update_delete(any_store: Store) -> None:
    a, b = digest_of(b"a"), digest_of(b"b")
    assert await any_store.get_ref("s1", "cp") is None
    before = datetime.now(UTC) - timedelta(seconds=5)

    await any_store.set_ref("s1", "cp", a, expect=None)
    ref = await any_store.get_ref("s1", "cp")
    assert ref is not None and ref.digest == a and ref.updated >= before

    with pytest.raises(RefConflict):
        await any_store.set_ref("s1", "cp", b, expect=None)  # exists already
    with pytest.raises(RefConflict):
        await any_store.set_ref("s1", "cp", b, expect=b)  # not what it points at
    assert (await any_store.get_ref("s1", "cp")).digest == a  # type: ignore[union-attr]

    await any_store.set_ref("s1", "cp", b, expect=a)
    assert (await any_store.get_ref("s1", "cp")).digest == b  # type: ignore[union-attr]

    with pytest.raises(RefConflict):
        await any_store.delete_ref("s1", "cp", expect=a)
    assert (await any_store.get_ref("s1", "cp")).digest == b  # type: ignore[union-attr]
    await any_store.delete_ref("s1", "cp", expect=b)
    assert await any_store.get_ref("s1", "cp") is None
    with pytest.raises(RefConflict):
        await any_store.delete_ref("s1", "cp", expect=b)
    with pytest.raises(RefConflict):
        await any_store.set_ref("s1", "cp", a, expect=b)  # gone: updating it is a conflict
    await any_store.set_ref("s1", "cp", a, expect=None)  # and it can be created again


async def test_list_refs(any_store: Store) -> None:
    assert await any_store.list_refs("s1") == {}
    want = {f"s1_{i}": digest_of(str(i).encode()) for i in range(5)}
    for name, digest in want.items():
        await any_store.set_ref("s1", name, digest, expect=None)
    await any_store.set_ref("s10", "other", digest_of(b"x"), expect=None)
    await any_store.set_ref("s", "other", digest_of(b"y"), expect=None)

    refs = await any_store.list_refs("s1")
    assert {name: ref.digest for name, ref in refs.items()} == want
    for name, ref in refs.items():
        assert ref == await any_store.get_ref("s1", name)


async def test_list_studios(any_store: Store) -> None:
    assert await any_store.list_studios() == []  # no store there (yet)
    for studio in ("b", "a", "a"):
        name = f"n{len(await any_store.list_refs(studio))}"
        await any_store.set_ref(studio, name, digest_of(b"x"), expect=None)
    assert await any_store.list_studios() == ["a", "b"]
    await any_store.delete_ref("b", "n0", digest_of(b"x"))
    assert await any_store.list_studios() == ["a"]  # a studio without checkpoints is none


async def test_list_refs_pages_through_many(
    s3_endpoint: S3Endpoint, s3_workdir: str, store_settings: Settings
) -> None:
    """More refs than one ListObjectsV2 page (1000 keys) holds."""
    store = S3Store.from_url(s3_workdir, store_settings)
    count = 1003
    doc = b'{"digest": "%s", "updated": "2024-10-01T00:00:00+00:00"}' % digest_of(b"p").encode()
    root = store.url.removeprefix(f"s3://{store.bucket}/")

    def seed(i: int) -> None:
        s3_endpoint.admin.put_object(Bucket=store.bucket, Key=f"{root}/refs/many/r{i}", Body=doc)

    with ThreadPoolExecutor(8) as pool:
        await asyncio.gather(
            *(asyncio.get_running_loop().run_in_executor(pool, seed, i) for i in range(count))
        )
    try:
        refs = await store.list_refs("many")
    finally:
        await store.close()
    assert len(refs) == count
    assert refs["r1002"].updated == datetime(2024, 10, 1, tzinfo=UTC)


@pytest.mark.parametrize("studio,name", [("s1", ""), ("s1", "a/b"), ("..", "x"), ("s1", "..")])
async def test_refs_refuse_names_that_escape(any_store: Store, studio: str, name: str) -> None:
    with pytest.raises(InvalidName):
        await any_store.set_ref(studio, name, digest_of(b"a"), expect=None)


async def test_concurrent_writers_of_one_ref(any_store: Store) -> None:
    """Every round, all writers race to move the ref on from the same value: one wins."""
    writers, rounds = 8, 6
    current: str | None = None
    for r in range(rounds):
        candidates = [digest_of(f"{r}-{w}".encode()) for w in range(writers)]
        results = await asyncio.gather(
            *(any_store.set_ref("s1", "race", d, expect=current) for d in candidates),
            return_exceptions=True,
        )
        winners = [d for d, res in zip(candidates, results, strict=True) if res is None]
        losers = [res for res in results if res is not None]
        assert len(winners) == 1, results
        assert all(isinstance(e, RefConflict) for e in losers), losers
        ref = await any_store.get_ref("s1", "race")
        assert ref is not None and ref.digest == winners[0]
        current = winners[0]


async def test_concurrent_deleters_of_one_ref(any_store: Store) -> None:
    """Deleters of one value may all see it gone (on S3 a DELETE that finds nothing
    cannot tell a lost answer from a rival); none may delete a newer value."""
    a, b = digest_of(b"a"), digest_of(b"b")
    await any_store.set_ref("s1", "gone", a, expect=None)
    results = await asyncio.gather(
        *(any_store.delete_ref("s1", "gone", expect=a) for _ in range(6)),
        return_exceptions=True,
    )
    assert any(r is None for r in results), results
    assert all(isinstance(r, RefConflict) for r in results if r is not None)
    assert await any_store.get_ref("s1", "gone") is None

    await any_store.set_ref("s1", "gone", a, expect=None)
    results = await asyncio.gather(
        any_store.set_ref("s1", "gone", b, expect=a),
        *(any_store.delete_ref("s1", "gone", expect=a) for _ in range(4)),
        return_exceptions=True,
    )
    ref = await any_store.get_ref("s1", "gone")
    if results[0] is None:  # the update won: no delete may have removed b
        assert ref is not None and ref.digest == b, results
    else:  # a delete won first; the update lost
        assert isinstance(results[0], RefConflict) and ref is None, results


@pytest.mark.parametrize(
    "workdir,url",
    [
        ("s3://bkt/team/work/", "s3://bkt/team/work/.studios/checkpoints"),
        ("s3://bkt", "s3://bkt/.studios/checkpoints"),
    ],
)
async def test_open_store_picks_s3_for_s3_urls(workdir: str, url: str) -> None:
    store = open_store(load_settings(workdir=workdir))
    assert isinstance(store, S3Store) and store.url == url
    await store.close()


async def test_the_local_sweep_removes_only_partial_blobs_no_writer_holds(tmp_path: Path) -> None:
    import fcntl

    from agent.store.local import LocalStore

    store = LocalStore(tmp_path / "work")
    await put(store, tmp_path, b"a blob")  # the layout, with tmp/
    tmp = store.root / "tmp"
    dead = tmp / ("0" * 64 + ".dead")
    dead.write_bytes(b"left by a killed writer")
    live = tmp / ("1" * 64 + ".live")
    live.write_bytes(b"being written")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer holds its partial blob
    stray_ref = store.root / "refs" / "s1"
    stray_ref.mkdir(parents=True)
    (stray_ref / ".n.0123.tmp").write_bytes(b"{")
    try:
        assert await store.clear_leftovers() == 2
        assert sorted(p.name for p in tmp.iterdir()) == [live.name]
        assert list(stray_ref.iterdir()) == []
    finally:
        os.close(fd)
    assert await store.clear_leftovers() == 1
    assert list(tmp.iterdir()) == []
    assert await store.has_blob(digest_of(b"a blob"))
