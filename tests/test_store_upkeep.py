"""What gc needs of a store, on the local store and the S3 store alike: listings
of studios, refs and blobs, deletes, refreshes, leases and leftovers."""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from s3_server import S3Endpoint

from agent.errors import InvalidName, RefConflict
from agent.store.base import BlobInfo, Store
from agent.store.local import LocalStore
from agent.store.s3 import S3Store


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def put(store: Store, tmp: Path, data: bytes) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / f"src-{os.urandom(6).hex()}"
    src.write_bytes(data)
    digest = digest_of(data)
    await store.put_blob(src, digest, len(data))
    return digest


async def blobs(store: Store) -> dict[str, BlobInfo]:
    return {b.digest: b for page in [p async for p in store.iter_blobs()] for b in page}


async def test_blobs_listed_with_size_and_age_then_deleted(
    any_store: Store, tmp_path: Path
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)  # S3 times are whole seconds
    a = await put(any_store, tmp_path, b"a" * 10)
    b = await put(any_store, tmp_path, b"b" * 20)
    listed = await blobs(any_store)
    assert set(listed) == {a, b}
    assert (listed[a].size, listed[b].size) == (10, 20)
    assert all(
        before <= x.modified <= datetime.now(UTC) + timedelta(seconds=2) for x in listed.values()
    )
    await any_store.delete_blob(a)
    await any_store.delete_blob(a)  # gone already: fine
    assert set(await blobs(any_store)) == {b}
    assert not await any_store.has_blob(a)


async def test_put_of_a_present_blob_refreshes_it(
    any_store: Store, tmp_path: Path, s3: S3Endpoint | None
) -> None:
    data = os.urandom(100)
    digest = await put(any_store, tmp_path, data)
    if isinstance(any_store, LocalStore):
        path = any_store.root / "blobs/sha256" / digest.split(":")[1]
        old = datetime.now(UTC) - timedelta(days=3)
        os.utime(path, (old.timestamp(), old.timestamp()))
    first = (await blobs(any_store))[digest].modified
    while datetime.now(UTC) - first < timedelta(seconds=1.5):  # S3's clock has seconds
        await asyncio.sleep(0.1)
    await put(any_store, tmp_path, data)
    assert (await blobs(any_store))[digest].modified > first
    assert (await any_store.get_blob(digest, len(data), tmp_path / "d")).read_bytes() == data


async def test_studios_and_ref_names(any_store: Store) -> None:
    digest = digest_of(b"m")
    await any_store.set_ref("s1", "a", digest, None)
    await any_store.set_ref("s1", "b", digest, None)
    await any_store.set_ref("s2", "c", digest, None)
    assert sorted(await any_store.list_studios()) == ["s1", "s2"]
    assert sorted(await any_store.list_ref_names("s1")) == ["a", "b"]
    assert await any_store.list_ref_names("nobody") == []


async def test_leases_are_exclusive_and_conditional(any_store: Store) -> None:
    tag = await any_store.create_lease("gc", b"first")
    assert tag is not None
    assert await any_store.create_lease("gc", b"second") is None  # exclusive
    lease = await any_store.get_lease("gc")
    assert lease is not None and lease.body == b"first" and lease.tag == tag
    new = await any_store.replace_lease("gc", b"third", tag)
    with pytest.raises(RefConflict):
        await any_store.replace_lease("gc", b"stale", tag)  # the old tag no longer holds
    with pytest.raises(RefConflict):
        await any_store.delete_lease("gc", tag)
    assert (await any_store.get_lease("gc")).body == b"third"  # type: ignore[union-attr]
    await any_store.delete_lease("gc", new)
    await any_store.delete_lease("gc", new)  # gone already: fine
    assert await any_store.get_lease("gc") is None
    with pytest.raises(RefConflict):
        await any_store.replace_lease("gc", b"x", new)  # gone: not ours to write

    await any_store.create_lease("sessions/s1/h1", b"1")
    await any_store.create_lease("sessions/s2/h2", b"2")
    assert sorted(await any_store.list_leases("sessions")) == ["sessions/s1/h1", "sessions/s2/h2"]
    for bad in ("../x", "sessions/../gc", "", "sessions//x", ".hidden"):
        with pytest.raises(InvalidName):
            await any_store.create_lease(bad, b"")


async def test_concurrent_creates_of_a_lease_have_one_winner(any_store: Store) -> None:
    tags = await asyncio.gather(*(any_store.create_lease("gc", f"{i}".encode()) for i in range(8)))
    assert sum(t is not None for t in tags) == 1


async def test_leftovers_older_than_the_cutoff(
    any_store: Store, s3: S3Endpoint | None, tmp_path: Path
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    if isinstance(any_store, LocalStore):
        await put(any_store, tmp_path, b"makes the layout")
        old, young = any_store.root / "tmp/old.part", any_store.root / "tmp/young.part"
        old.write_bytes(b"x" * 7)
        young.write_bytes(b"y")
        ref_tmp = any_store.root / "refs/s1/.a.0123.tmp"
        ref_tmp.parent.mkdir(parents=True)
        ref_tmp.write_bytes(b"{}")
        past = (datetime.now(UTC) - timedelta(days=2)).timestamp()
        os.utime(old, (past, past))
        os.utime(ref_tmp, (past, past))
        cutoff = datetime.now(UTC) - timedelta(days=1)
        found = [x async for x in any_store.iter_leftovers(cutoff)]
        assert sorted(Path(x.handle).name for x in found) == [".a.0123.tmp", "old.part"]
        assert {x.size for x in found} == {7, 2}
        for x in found:
            await any_store.remove_leftover(x)
        assert not old.exists() and young.exists() and not ref_tmp.exists()
        return
    assert isinstance(any_store, S3Store) and s3 is not None
    key = any_store.url.removeprefix(f"s3://{s3.bucket}/") + "/blobs/sha256/" + "ab" * 32
    up = s3.admin.create_multipart_upload(Bucket=s3.bucket, Key=key)
    s3.admin.upload_part(
        Bucket=s3.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"z" * 1000
    )
    found = [x async for x in any_store.iter_leftovers(later)]
    assert [(x.size, up["UploadId"] in x.what) for x in found] == [(1000, True)]
    await any_store.remove_leftover(found[0])
    assert [x async for x in any_store.iter_leftovers(later)] == []
