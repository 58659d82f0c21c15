"""Verifying checkpoints as stored, on the local store and the S3 store alike:
what is missing or damaged is named with every checkpoint it breaks, hostile
manifests and refs are reported rather than raised, and the start of a session
uses the same check before it trusts an unfinished checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from fsutil import replace_blob, settings_for
from s3_server import S3Endpoint

from agent.checkpoint.manifest import EMPTY_CONFIG, EMPTY_DIGEST, CheckpointState, LayerDesc
from agent.session import Progress, Session
from agent.session.verify import Kind, Status, VerifyReport
from agent.store.base import Store
from agent.store.local import LocalStore
from agent.store.s3 import S3Store


@dataclass
class World:
    """Two checkpoints of studio ``s``: ``one`` (layer A) and ``two`` (layers A, B)."""

    store: Store
    s3: S3Endpoint | None
    tmp: Path
    session: Session
    a: LayerDesc
    b: LayerDesc

    def workdir(self) -> str:
        return self.store.url.removesuffix("/.studios/checkpoints")

    def _key(self, digest: str) -> str:
        assert isinstance(self.store, S3Store)
        root = self.store.url.removeprefix(f"s3://{self.store.bucket}/")
        return f"{root}/blobs/sha256/{digest.split(':')[1]}"

    def read(self, digest: str) -> bytes:
        if isinstance(self.store, LocalStore):
            return (self.store.root / "blobs/sha256" / digest.split(":")[1]).read_bytes()
        assert self.s3 is not None
        obj = self.s3.admin.get_object(Bucket=self.s3.bucket, Key=self._key(digest))
        data: bytes = obj["Body"].read()
        return data

    def delete(self, digest: str) -> None:
        if isinstance(self.store, LocalStore):
            (self.store.root / "blobs/sha256" / digest.split(":")[1]).unlink()
        else:
            assert self.s3 is not None
            self.s3.admin.delete_object(Bucket=self.s3.bucket, Key=self._key(digest))

    def replace(self, digest: str, data: bytes) -> None:
        replace_blob(self.store, digest, data, self.s3)

    def flip(self, digest: str) -> None:
        data = bytearray(self.read(digest))
        data[len(data) // 2] ^= 0x01
        self.replace(digest, bytes(data))

    async def manifest_of(self, name: str) -> str:
        ref = await self.store.get_ref("s", name)
        assert ref is not None
        return ref.digest

    async def verify(self, source: str = "", **kw: bool) -> VerifyReport:
        return await self.session.verify(source, **kw)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable, "-m", "agent", "--root", str(self.tmp / "root"),
            "--workdir", self.workdir(), "--studio", "s",
            "--state-dir", str(self.tmp / "cli-state"), *args,
        ]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
async def world(any_store: Store, s3: S3Endpoint | None, tmp_path: Path) -> World:
    root = tmp_path / "root"
    root.mkdir()
    session = Session(settings_for(root, tmp_path / "work", tmp_path / "st"), any_store)
    await session.baseline()
    (root / "a.txt").write_bytes(os.urandom(50_000))  # incompressible: a layer of some size
    await session.checkpoint("one")
    (root / "b.txt").write_bytes(os.urandom(30_000))
    await session.checkpoint("two")
    a, b = session.chain
    return World(any_store, s3, tmp_path, session, a, b)


def problems(report: VerifyReport) -> set[tuple[Kind, Status, str, frozenset[str]]]:
    return {(p.kind, p.status, p.digest, frozenset(p.checkpoints)) for p in report.problems}


# -- sound -------------------------------------------------------------------------------


@pytest.mark.parametrize("read_data", [False, True])
async def test_a_sound_store_verifies_clean(world: World, read_data: bool) -> None:
    seen: list[Progress] = []
    report = await world.verify(every=True, read_data=read_data, progress=seen.append)
    assert report.sound and report.problems == ()
    assert [v.label for v in report.checkpoints] == ["s/two", "s/one"]  # newest first
    assert all(v.sound for v in report.checkpoints)
    assert report.blobs == 5  # two manifests, the config, two layers (A checked once)
    layers = world.a.size + world.b.size
    manifests = report.size - layers - len(EMPTY_CONFIG)
    if read_data:
        assert report.bytes_read == report.size
    else:
        assert report.bytes_read == manifests  # only the manifests are read
    # Progress ends at the whole of the blobs the manifests name.
    assert seen and (seen[-1].bytes_done, seen[-1].bytes_total) == (layers + 2,) * 2
    assert (seen[-1].files_done, seen[-1].files_total) == (3, 3)


async def test_default_is_the_newest_checkpoint_and_named_ones(world: World) -> None:
    report = await world.verify()
    assert [v.label for v in report.checkpoints] == ["s/two"]
    assert report.checkpoints[0].layers == 2 and report.checkpoints[0].state == "finalized"
    report = await world.verify("s/one")
    assert [v.label for v in report.checkpoints] == ["s/one"] and report.sound


async def test_publishing_writes_the_config_blob(world: World) -> None:
    assert await world.store.blob_size(EMPTY_DIGEST) == len(EMPTY_CONFIG)
    assert world.read(EMPTY_DIGEST) == EMPTY_CONFIG
    assert await world.store.blob_size(world.a.digest) == world.a.size
    assert await world.store.blob_size("sha256:" + "0" * 64) is None


# -- damage ------------------------------------------------------------------------------


@pytest.mark.parametrize("read_data", [False, True])
async def test_a_missing_shared_blob_breaks_every_checkpoint_naming_it(
    world: World, read_data: bool
) -> None:
    world.delete(world.a.digest)
    report = await world.verify(every=True, read_data=read_data)
    assert problems(report) == {
        (Kind.LAYER, Status.MISSING, world.a.digest, frozenset({"s/one", "s/two"}))
    }
    assert not any(v.sound for v in report.checkpoints)


@pytest.mark.parametrize("read_data", [False, True])
async def test_a_truncated_blob_is_found_by_its_size(world: World, read_data: bool) -> None:
    world.replace(world.b.digest, world.read(world.b.digest)[:-100])
    report = await world.verify(every=True, read_data=read_data)
    assert problems(report) == {(Kind.LAYER, Status.CORRUPT, world.b.digest, frozenset({"s/two"}))}
    assert f"has {world.b.size - 100} bytes" in report.problems[0].detail
    assert report.verdict("s/one").sound and not report.verdict("s/two").sound


async def test_a_flipped_byte_is_found_only_by_reading(world: World) -> None:
    world.flip(world.a.digest)
    # Same size: a check of sizes cannot see it.
    assert (await world.verify(every=True)).sound
    report = await world.verify(every=True, read_data=True)
    assert problems(report) == {
        (Kind.LAYER, Status.CORRUPT, world.a.digest, frozenset({"s/one", "s/two"}))
    }
    assert "hash to" in report.problems[0].detail


async def test_a_missing_config_is_a_missing_blob(world: World) -> None:
    """A checkpoint written before configs were stored: the empty config is reported
    (the store is not a complete image layout), and marked as the well-known one."""
    world.delete(EMPTY_DIGEST)
    report = await world.verify(every=True)
    assert problems(report) == {
        (Kind.CONFIG, Status.MISSING, EMPTY_DIGEST, frozenset({"s/one", "s/two"}))
    }
    assert report.problems[0].well_known
    assert all(v.restorable and not v.sound for v in report.checkpoints)
    # The next checkpoint written to the store writes it again, for all of them.
    (world.tmp / "root" / "c.txt").write_text("c")
    fresh = Session(world.session.settings, world.store)
    await fresh.checkpoint("three")
    assert (await world.verify(every=True, read_data=True)).sound


async def test_a_manifest_naming_another_missing_config(world: World) -> None:
    other = "sha256:" + "ab" * 32
    await _put_manifest(world, "odd", _manifest_doc(world, config=other))
    report = await world.verify("odd")
    assert problems(report) == {(Kind.CONFIG, Status.MISSING, other, frozenset({"s/odd"}))}
    assert not report.problems[0].well_known and not report.checkpoints[0].restorable


async def test_a_missing_manifest(world: World) -> None:
    digest = await world.manifest_of("two")
    world.delete(digest)
    report = await world.verify(every=True, read_data=True)
    assert problems(report) == {(Kind.MANIFEST, Status.MISSING, digest, frozenset({"s/two"}))}
    assert report.verdict("s/one").sound


# -- hostile manifests and refs ----------------------------------------------------------


def _manifest_doc(world: World, *, config: str = EMPTY_DIGEST) -> dict[str, object]:
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.studio-agent.checkpoint.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [world.a.to_json()],
        "annotations": {
            "io.studio-agent.studio": "s",
            "io.studio-agent.session": "x",
            "io.studio-agent.state": "finalized",
            "org.opencontainers.image.created": "2024-01-01T00:00:00Z",
        },
    }


async def _put_manifest(world: World, name: str, doc: object) -> str:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await world.store.put_bytes(data, digest, world.tmp / "spool")
    await world.store.set_ref("s", name, digest, None)
    return digest


def _hostile(world: World) -> dict[str, object]:
    """Manifests (bytes, or documents to encode) that are not sound ones."""

    def doc(**changes: object) -> dict[str, object]:
        d = _manifest_doc(world)
        for key, value in changes.items():
            if key == "created":
                d["annotations"] = {
                    **d["annotations"],
                    "org.opencontainers.image.created": value,
                }
            else:
                d[key] = value
        return d

    def layer(**changes: object) -> list[dict[str, object]]:
        return [{**world.a.to_json(), **changes}]

    return {
        "not-json": b"\xff{not json",
        "a-list": [],
        "a-string": "manifest",
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "no-layers": {"mediaType": "application/vnd.oci.image.manifest.v1+json"},
        "layers-a-string": doc(layers="abc"),
        "layer-a-string": doc(layers=["abc"]),
        "layer-bad-digest": doc(layers=layer(digest="sha256:../../etc")),
        "layer-numeric-digest": doc(layers=layer(digest=12)),
        "layer-negative-size": doc(layers=layer(size=-5)),
        "no-config": doc(config=None),
        "config-a-list": doc(config=[]),
        "config-bad-digest": doc(config={"digest": "md5:x", "size": 2}),
        "config-bool-size": doc(config={"digest": EMPTY_DIGEST, "size": True}),
        "created-a-number": doc(created=5),
        "annotations-a-list": doc(annotations=[]),
    }


async def test_hostile_manifests_are_reported_corrupt(world: World) -> None:
    names = []
    for name, doc in _hostile(world).items():
        await _put_manifest(world, name, doc)
        names.append(name)
    report = await world.verify(every=True, read_data=True)
    corrupt = {label for p in report.problems if p.kind is Kind.MANIFEST for label in p.checkpoints}
    assert corrupt == {f"s/{n}" for n in names}
    assert all(p.status is Status.CORRUPT for p in report.problems)
    assert report.verdict("s/one").sound and report.verdict("s/two").sound
    # Each one on its own, as the CLI asks for it.
    for name in names:
        one = await world.verify(name)
        assert not one.sound and one.checkpoints[0].state is None, name
    # The listing passes over those it cannot read, and raises for none.
    assert {"one", "two"} <= {c.name for c in await world.session.list_checkpoints()}


async def test_a_ref_naming_a_bad_digest(world: World) -> None:
    await world.store.set_ref("s", "evil", "sha256:../../../../etc/passwd", None)
    report = await world.verify("evil")
    assert [(p.kind, p.status) for p in report.problems] == [(Kind.REF, Status.CORRUPT)]
    assert report.problems[0].checkpoints == ("s/evil",)


async def test_a_ref_that_is_not_a_ref_document(world: World) -> None:
    if isinstance(world.store, LocalStore):
        (world.store.root / "refs/s/junk").write_text('{"digest": 5}')
    else:
        assert world.s3 is not None
        key = world.store.url.removeprefix(f"s3://{world.s3.bucket}/") + "/refs/s/junk"
        world.s3.admin.put_object(Bucket=world.s3.bucket, Key=key, Body=b"[1, 2]")
    report = await world.verify("junk")
    assert [(p.kind, p.status) for p in report.problems] == [(Kind.REF, Status.CORRUPT)]
    assert "not a valid ref" in report.problems[0].detail
    # Listed nowhere (skipped, as both stores do), so --all still verifies the rest.
    assert (await world.verify(every=True)).sound


# -- the command -------------------------------------------------------------------------


async def test_cli_reports_and_exits_non_zero(world: World) -> None:
    ok = world.cli("verify", "--all", "--read-data")
    assert ok.returncode == 0, ok.stderr
    assert "s/one: sound" in ok.stdout and "s/two: sound" in ok.stdout
    assert "0 problems" in ok.stdout

    world.delete(world.a.digest)
    world.flip(world.b.digest)
    shallow = world.cli("verify", "--all")
    assert shallow.returncode == 1 and shallow.stderr == ""
    assert f"missing layer {world.a.digest}" in shallow.stdout
    assert "breaks s/two, s/one" in shallow.stdout
    assert world.b.digest not in shallow.stdout  # same size: not seen without reading

    deep = world.cli("verify", "--all", "--read-data", "--json")
    assert deep.returncode == 1, deep.stderr
    doc = json.loads(deep.stdout)
    assert doc["sound"] is False and doc["read_data"] is True
    found = {(p["kind"], p["status"], p["digest"]): p["checkpoints"] for p in doc["problems"]}
    assert found == {
        ("layer", "missing", world.a.digest): ["s/two", "s/one"],
        ("layer", "corrupt", world.b.digest): ["s/two"],
    }
    assert {c["name"]: c["sound"] for c in doc["checkpoints"]} == {"one": False, "two": False}


async def test_cli_hostile_manifest_and_unknown_checkpoint(world: World) -> None:
    await _put_manifest(world, "bad", [])
    proc = world.cli("verify", "--checkpoint", "bad")
    assert proc.returncode == 1 and proc.stderr == ""
    assert "corrupt manifest" in proc.stdout and "breaks s/bad" in proc.stdout
    proc = world.cli("verify", "--checkpoint", "s/nope")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "studio-agent: error: no checkpoint 'nope' in studio s"
    ]


# -- the start's revalidation ------------------------------------------------------------


async def _interim(world: World) -> str:
    (world.tmp / "root" / "c.txt").write_bytes(os.urandom(20_000))
    r = await world.session.checkpoint(state=CheckpointState.INTERIM)
    assert r is not None
    return r.info.name


async def _start_fresh(world: World, name: str) -> Session:
    fresh = world.tmp / f"fresh-{name}"
    fresh.mkdir()
    return Session(settings_for(fresh, world.tmp / "work", world.tmp / f"st-{name}"), world.store)


async def test_start_invalidates_a_truncated_interim_checkpoint(world: World) -> None:
    interim = await _interim(world)
    layer = world.session.chain[-1]
    world.replace(layer.digest, world.read(layer.digest)[:10])
    starter = await _start_fresh(world, "t")
    out = await starter.start()
    assert out.restored is not None and out.restored.name == "two"
    assert [i.name for i in out.invalidated] == [interim]
    assert not (starter.root / "c.txt").exists() and (starter.root / "b.txt").exists()


async def test_start_uses_an_interim_checkpoint_missing_only_the_empty_config(
    world: World,
) -> None:
    """Written before the config was stored: sound for a restore, so not invalidated."""
    interim = await _interim(world)
    world.delete(EMPTY_DIGEST)
    starter = await _start_fresh(world, "c")
    out = await starter.start()
    assert out.restored is not None and out.restored.name == interim
    assert out.invalidated == [] and (starter.root / "c.txt").exists()
