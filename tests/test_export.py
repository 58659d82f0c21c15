"""Exporting a checkpoint as an OCI image, on the local store and the S3 store:
the layout is one that skopeo reads and copies, each diff_id is the digest of
its layer's tar, a base image's layers and config are kept under the
checkpoint's squashed layer, bad input is refused in one line before anything
is written, and an export that fails or is killed never leaves a layout that
looks complete.  With buildah, the exported image runs: what the session
installed is there, what it deleted is gone."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from fsutil import copy_tree, replace_blob, settings_for
from images.image_helpers import Buildah, need
from s3_server import S3Endpoint

from agent.checkpoint.oci_layout import this_platform
from agent.session import Session
from agent.store.base import Store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the layers keep owners: needs root")

BUSYBOX = Path("/bin/busybox")
HELLO = "#!/bin/sh\necho installed-in-the-session\n"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_base_root(root: Path) -> None:
    """A tiny image root: a shell (busybox, when static and present), and what the
    session will delete, replace and keep."""
    (root / "bin").mkdir(parents=True)
    if BUSYBOX.exists():
        shutil.copy2(BUSYBOX, root / "bin/busybox")
    else:
        (root / "bin/busybox").write_bytes(b"not a shell")
    (root / "bin/sh").symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("base\n")
    (root / "etc/keep").write_text("kept\n")
    (root / "usr/share").mkdir(parents=True)
    (root / "usr/share/old.txt").write_text("deleted in the session\n")
    (root / "opt/tool").mkdir(parents=True)
    (root / "opt/tool/a").write_text("a\n")
    (root / "opt/tool/b").write_text("b\n")


def session_changes(root: Path, step: int) -> None:
    if step == 1:  # an install
        (root / "usr/local/bin").mkdir(parents=True)
        (root / "usr/local/bin/hello").write_text(HELLO)
        (root / "usr/local/bin/hello").chmod(0o755)
        (root / "etc/motd").write_text("one\n")
        shutil.rmtree(root / "opt/tool")
    else:  # a delete, a directory made anew, a file rewritten
        (root / "usr/share/old.txt").unlink()
        (root / "opt/tool").mkdir()
        (root / "opt/tool/c").write_text("c\n")
        (root / "etc/motd").write_text("two\n")


@dataclass
class World:
    """Studio ``s``: checkpoints ``one`` (an install) and ``two`` (one's chain and a
    second layer: deletions), on a root that started as ``base``."""

    store: Store
    s3: S3Endpoint | None
    tmp: Path
    base: Path
    session: Session

    def workdir(self) -> str:
        return self.store.url.removesuffix("/.studios/checkpoints")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True)

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "agent", "--root", str(self.tmp / "root"),
            "--workdir", self.workdir(), "--studio", "s",
            "--state-dir", str(self.tmp / "cli-state"), *args,
        ]  # fmt: skip

    def export(self, *args: str) -> dict[str, Any]:
        proc = self.cli("export", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc


@pytest.fixture
async def world(any_store: Store, s3: S3Endpoint | None, tmp_path: Path) -> World:
    base = tmp_path / "base"
    make_base_root(base)
    root = tmp_path / "root"
    copy_tree(base, root)
    session = Session(settings_for(root, tmp_path / "work", tmp_path / "st"), any_store)
    await session.baseline()
    session_changes(root, 1)
    await session.checkpoint("one")
    session_changes(root, 2)
    await session.checkpoint("two")
    return World(any_store, s3, tmp_path, base, session)


# -- reading a layout back ------------------------------------------------------------------


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs/sha256" / digest.removeprefix("sha256:")).read_bytes()


def _tar(media_type: str, data: bytes) -> bytes:
    if media_type == ZSTD_LAYER:
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    assert media_type == GZIP_LAYER
    return gzip.decompress(data)


def read_layout(layout: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any], list[bytes]]:
    """The manifest, config and uncompressed layers of the image ``tag``, each
    blob checked against its digest and each diff_id against its layer's tar."""
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    [entry] = index["manifests"]
    assert entry["annotations"] == {REF_NAME: tag}
    assert entry["mediaType"] == MANIFEST
    manifest_data = _blob(layout, entry["digest"])
    assert (_sha(manifest_data), len(manifest_data)) == (entry["digest"], entry["size"])
    manifest = json.loads(manifest_data)
    assert manifest["mediaType"] == MANIFEST and manifest["config"]["mediaType"] == CONFIG
    config_data = _blob(layout, manifest["config"]["digest"])
    assert _sha(config_data) == manifest["config"]["digest"]
    config = json.loads(config_data)
    assert entry["platform"] == {"architecture": config["architecture"], "os": config["os"]}
    assert config["rootfs"]["type"] == "layers"
    tars = []
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        data = _blob(layout, desc["digest"])
        assert (_sha(data), len(data)) == (desc["digest"], desc["size"])
        tar = _tar(desc["mediaType"], data)
        assert _sha(tar) == diff_id  # the uncompressed digest
        tars.append(tar)
    layered = [h for h in config["history"] if not h.get("empty_layer")]
    assert len(layered) == len(manifest["layers"])
    return manifest, config, tars


def members(tar: bytes) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t:
            f = t.extractfile(m) if m.isfile() else None
            out[m.name.rstrip("/")] = f.read() if f is not None else None
    return out


def skopeo_reads(layout: Path, tag: str, manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    need("skopeo", shutil.which("skopeo") is not None, "apt-get install skopeo")
    proc = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:{tag}"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    inspected: dict[str, Any] = json.loads(proc.stdout)
    assert inspected["Layers"] == [x["digest"] for x in manifest["layers"]]
    proc = subprocess.run(
        ["skopeo", "copy", f"oci:{layout}:{tag}", f"dir:{out}"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for desc in manifest["layers"]:
        copied = (out / desc["digest"].removeprefix("sha256:")).read_bytes()
        assert _sha(copied) == desc["digest"]
    return inspected


def check_session_layer(tar: bytes) -> None:
    """The squashed layer: both checkpoints' changes, OCI whiteouts for the deletes."""
    got = members(tar)
    assert got["usr/local/bin/hello"] == HELLO.encode()
    assert got["etc/motd"] == b"two\n"
    assert "usr/share/.wh.old.txt" in got  # a file of the image, deleted
    assert "opt/tool/.wh..wh..opq" in got and got["opt/tool/c"] == b"c\n"  # a directory reset
    assert "etc/keep" not in got and "opt/tool/a" not in got  # untouched or superseded


# -- a base layout made by hand (no buildah) ---------------------------------------------------


def write_blob(layout: Path, data: bytes) -> dict[str, Any]:
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    digest = _sha(data)
    (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def image_of(layout: Path, root: Path, arch: str = "") -> tuple[dict[str, Any], bytes]:
    """An image of ``root`` in one gzip layer, written into ``layout``: its index
    entry, and its tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for p in sorted(root.rglob("*")):
            t.add(p, arcname=str(p.relative_to(root)), recursive=False)
    tar = buf.getvalue()
    layer = {"mediaType": GZIP_LAYER, **write_blob(layout, gzip.compress(tar, mtime=0))}
    platform = this_platform().to_json()
    if arch:
        platform["architecture"] = arch
    config = {
        **platform,
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "FOO=bar"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hello"],
            "Labels": {"org.example.template": "tiny"},
            "WorkingDir": "/opt",
        },
        "rootfs": {"type": "layers", "diff_ids": [_sha(tar)]},
        "history": [{"created_by": "made by hand"}, {"empty_layer": True, "comment": "env"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, **write_blob(layout, json.dumps(config).encode())},
        "layers": [layer],
    }
    desc = {"mediaType": MANIFEST, **write_blob(layout, json.dumps(manifest).encode())}
    return {**desc, "platform": platform}, tar


def hand_layout(layout: Path, root: Path, entries: list[dict[str, Any]] | None = None) -> bytes:
    entry, tar = image_of(layout, root)
    entry["annotations"] = {REF_NAME: "base"}
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {"schemaVersion": 2, "manifests": entries if entries is not None else [entry]}
    (layout / "index.json").write_text(json.dumps(index))
    return tar


# -- the tests -----------------------------------------------------------------------------------


async def test_an_export_is_an_image_skopeo_reads(world: World) -> None:
    out = world.tmp / "oci"
    doc = world.export("--oci", str(out))  # the default: the latest checkpoint, "two"
    assert doc["checkpoint"]["name"] == "two" and doc["tag"] == "two"
    assert doc["squashed"] == 2 and doc["base_layers"] == 0
    manifest, config, [tar] = read_layout(out, "two")
    [layer] = manifest["layers"]
    assert layer["mediaType"] == ZSTD_LAYER
    assert (layer["digest"], layer["size"]) == (doc["layer"]["digest"], doc["layer"]["size"])
    assert config["rootfs"]["diff_ids"] == [doc["layer"]["diff_id"]]
    assert len(tar) == doc["layer"]["uncompressed"]
    assert (config["os"], config["architecture"]) == ("linux", this_platform().architecture)
    assert "studio-agent export s/two" in config["history"][-1]["created_by"]
    check_session_layer(tar)
    inspected = skopeo_reads(out, "two", manifest, world.tmp / "copied")
    assert inspected["Architecture"] == this_platform().architecture
    # an older checkpoint, under a tag of one's choice: only its own changes
    doc = world.export("--checkpoint", "s/one", "--oci", str(world.tmp / "one"), "--tag", "v1")
    _, _, [tar] = read_layout(world.tmp / "one", "v1")
    got = members(tar)
    assert got["etc/motd"] == b"one\n" and "usr/share/.wh.old.txt" not in got
    assert "opt/.wh.tool" in got


async def test_an_export_on_a_base_keeps_its_layers_and_config(world: World) -> None:
    base = world.tmp / "base-oci"
    base_tar = hand_layout(base, world.base)
    out = world.tmp / "oci"
    doc = world.export("--checkpoint", "two", "--oci", str(out), "--base", str(base))
    assert doc["base_layers"] == 1
    manifest, config, tars = read_layout(out, "two")
    base_manifest = json.loads(_blob(base, json.loads((base / "index.json").read_text())
                                     ["manifests"][0]["digest"]))  # fmt: skip
    base_config = json.loads(_blob(base, base_manifest["config"]["digest"]))
    assert manifest["layers"][0] == base_manifest["layers"][0]
    assert [x["mediaType"] for x in manifest["layers"]] == [GZIP_LAYER, ZSTD_LAYER]
    assert tars[0] == base_tar
    check_session_layer(tars[1])
    assert config["config"] == base_config["config"]  # env, entrypoint, cmd, labels, workdir
    assert config["rootfs"]["diff_ids"][0] == base_config["rootfs"]["diff_ids"][0]
    assert config["history"][:2] == base_config["history"]
    assert manifest["annotations"]["org.opencontainers.image.base.digest"] == _sha(
        _blob(base, json.loads((base / "index.json").read_text())["manifests"][0]["digest"])
    )
    # the base's layer is shared, not copied, on one filesystem
    digest = manifest["layers"][0]["digest"].removeprefix("sha256:")
    assert (out / "blobs/sha256" / digest).stat().st_ino == (
        base / "blobs/sha256" / digest
    ).stat().st_ino
    inspected = skopeo_reads(out, "two", manifest, world.tmp / "copied")
    assert "FOO=bar" in inspected["Env"]
    assert inspected["Labels"] == {"org.example.template": "tiny"}


async def test_a_base_of_several_platforms_gives_this_machines(world: World) -> None:
    base = world.tmp / "base-oci"
    ours, _ = image_of(base, world.base)
    other_arch = "s390x" if this_platform().architecture != "s390x" else "amd64"
    other, _ = image_of(base, world.base / "etc", arch=other_arch)
    nested = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [other, ours],
    }
    index_entry = {
        "mediaType": nested["mediaType"],
        **write_blob(base, json.dumps(nested).encode()),
    }
    hand_layout(base, world.base, [index_entry])
    out = world.tmp / "oci"
    world.export("--oci", str(out), "--base", str(base))
    manifest, config, _ = read_layout(out, "two")
    assert config["architecture"] == this_platform().architecture
    assert manifest["annotations"]["org.opencontainers.image.base.digest"] == ours["digest"]


def test_base_blobs_from_another_filesystem_are_copied_and_checked(world: World) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == world.tmp.stat().st_dev:
        pytest.skip("no second filesystem to copy from")
    with tempfile.TemporaryDirectory(dir=shm) as d:
        base = Path(d) / "base"
        hand_layout(base, world.base)
        out = world.tmp / "oci"
        world.export("--oci", str(out), "--base", str(base))
        manifest, _, _ = read_layout(out, "two")
        digest = manifest["layers"][0]["digest"].removeprefix("sha256:")
        assert (out / "blobs/sha256" / digest).stat().st_nlink == 1  # a copy
        # a base layer damaged in place (same size) is found as it is copied
        blob = base / "blobs/sha256" / digest
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 1
        blob.write_bytes(bytes(data))
        proc = world.cli("export", "--oci", str(world.tmp / "bad"), "--base", str(base))
        one_line_error(proc, "does not match its digest")
        assert not (world.tmp / "bad").exists()  # what it wrote is removed


def one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("studio-agent: error: "), proc.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("any_store", ["local"], indirect=True)
async def test_bad_input_is_refused_before_anything_is_written(world: World) -> None:
    tmp = world.tmp
    out = tmp / "oci"
    # a directory that is not empty: left as it was
    out.mkdir()
    (out / "mine").write_text("x")
    one_line_error(world.cli("export", "--oci", str(out)), "exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["mine"]
    (tmp / "a-file").write_text("x")
    one_line_error(world.cli("export", "--oci", str(tmp / "a-file")), "is not a directory")
    fresh = tmp / "fresh"
    refusals = [
        (["--base", str(tmp / "nowhere")], "is not an OCI image layout"),
        (["--base", str(world.base)], "is not an OCI image layout"),
        (["--checkpoint", "nope"], "no checkpoint 'nope'"),
        (["--tag=a..b"], "invalid tag"),
    ]
    for args, needle in refusals:
        one_line_error(world.cli("export", "--oci", str(fresh), *args), needle)
        assert not fresh.exists()

    def refused_base(needle: str) -> None:
        one_line_error(world.cli("export", "--oci", str(fresh), "--base", str(base)), needle)
        assert not fresh.exists()

    # two images of this platform: which one is meant is not ours to guess
    base = tmp / "two-images"
    one, _ = image_of(base, world.base)
    two, _ = image_of(base, world.base / "etc")
    hand_layout(base, world.base, [one, two])
    refused_base("holds 2 images")
    # a config that cannot be read: missing, then not JSON
    base = tmp / "no-config"
    hand_layout(base, world.base)
    manifest = json.loads(_blob(base, json.loads((base / "index.json").read_text())
                                ["manifests"][0]["digest"]))  # fmt: skip
    config_blob = base / "blobs/sha256" / manifest["config"]["digest"].removeprefix("sha256:")
    config_blob.unlink()
    refused_base("cannot read the config")
    base = tmp / "bad-config"
    hand_layout(base, world.base)
    junk = {"mediaType": CONFIG, **write_blob(base, b"not json")}
    manifest = {**manifest, "config": junk}
    entry = {"mediaType": MANIFEST, **write_blob(base, json.dumps(manifest).encode())}
    (base / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    refused_base("is not JSON")
    # diff_ids that do not match the layers
    base = tmp / "short-config"
    hand_layout(base, world.base)
    manifest = json.loads(_blob(base, json.loads((base / "index.json").read_text())
                                ["manifests"][0]["digest"]))  # fmt: skip
    config = json.loads(_blob(base, manifest["config"]["digest"]))
    config["rootfs"]["diff_ids"] = []
    manifest["config"] = {"mediaType": CONFIG, **write_blob(base, json.dumps(config).encode())}
    entry = {"mediaType": MANIFEST, **write_blob(base, json.dumps(manifest).encode())}
    (base / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    refused_base("0 diff_ids for 1 layers")


async def test_a_failed_export_removes_what_it_wrote(world: World) -> None:
    # a layer damaged in the store: the export fails after it began writing
    layer = world.session.chain[0]
    replace_blob(world.store, layer.digest, b"damaged", world.s3)
    base = world.tmp / "base-oci"
    hand_layout(base, world.base)
    out = world.tmp / "oci"
    out.mkdir()  # an empty directory given: emptied again, kept
    proc = world.cli("export", "--oci", str(out), "--base", str(base))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert out.is_dir() and list(out.iterdir()) == []
    proc = world.cli("export", "--oci", str(world.tmp / "new"), "--base", str(base))
    assert proc.returncode == 1 and not (world.tmp / "new").exists()


@pytest.mark.parametrize("any_store", ["local"], indirect=True)
async def test_a_killed_export_leaves_no_index(world: World) -> None:
    """Killed while its layer is written: blobs maybe, never index.json, so no
    tool sees an image, and the next export into it says what it is."""
    big = world.tmp / "root/big.bin"
    with open(big, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    await world.session.checkpoint("big")
    out = world.tmp / "oci"
    proc = subprocess.Popen(
        world.argv("export", "--checkpoint", "big", "--oci", str(out)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        blobs = out / "blobs/sha256"
        while proc.poll() is None and not any(_temps(blobs)):
            os.sched_yield()
        proc.send_signal(signal.SIGSTOP)
        assert proc.poll() is None, "the export ended before it could be killed"
        assert not (out / "index.json").exists()
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert (out / "oci-layout").exists() and not (out / "index.json").exists()
    if shutil.which("skopeo"):
        inspect = subprocess.run(["skopeo", "inspect", f"oci:{out}"], capture_output=True)
        assert inspect.returncode != 0
    one_line_error(world.cli("export", "--oci", str(out)), "an unfinished export")


def _temps(blobs: Path) -> Iterator[Path]:
    try:
        yield from (p for p in blobs.iterdir() if p.name.startswith(".tmp-"))
    except FileNotFoundError:
        return


# -- run with buildah ----------------------------------------------------------------------------


@pytest.fixture
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buildah]:
    need("buildah", shutil.which("buildah") is not None, "apt-get install buildah")
    need("busybox-static", BUSYBOX.exists(), "apt-get install busybox-static")
    # a path of lowercase letters: buildah names images after their oci: path
    root = Path(tempfile.mkdtemp(prefix="buildah-", dir=tmp_path_factory.getbasetemp()))
    b = Buildah(root, os.environ.get("STUDIO_TEST_STORAGE_DRIVER", "vfs"))
    yield b
    b.cleanup()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
async def test_the_exported_image_runs_with_buildah(world: World, buildah: Buildah) -> None:
    """The template built with buildah and pushed to a layout, the session's
    checkpoint exported on it, and the result run: the program the session
    installed runs, what it deleted is gone, the template's environment stays."""
    ctr = buildah("from", "scratch").stdout.strip()
    buildah("copy", ctr, f"{world.base}/", "/")
    buildah("config", "--env", "FOO=bar", "--cmd", '["/bin/sh"]', "--label", "t=tiny", ctr)
    buildah("commit", "--quiet", "--rm", ctr, "template:1")
    base = world.tmp / "template-oci"
    buildah("push", "--quiet", "template:1", f"oci:{base}:template")
    out = world.tmp / "exported"
    doc = world.export("--oci", str(out), "--base", str(base), "--tag", "custom")
    assert doc["base_layers"] == 1
    read_layout(out, "custom")
    image = buildah.new_container(f"oci:{out}:custom")
    try:
        proc = buildah.run(
            image,
            "hello; cat /etc/motd /etc/keep; echo $FOO; ls /opt/tool;"
            "test ! -e /usr/share/old.txt && echo old-is-gone",
        )
        assert proc.stdout.split() == [
            "installed-in-the-session",
            "two",
            "kept",
            "bar",
            "c",
            "old-is-gone",
        ], proc.stderr
        config = json.loads(buildah("inspect", image).stdout)["OCIv1"]["config"]
        assert "FOO=bar" in config["Env"] and config["Labels"]["t"] == "tiny"
    finally:
        buildah("rm", image, check=False)


def test_the_layer_sink_hashes_the_tar_in_bounded_memory(tmp_path: Path) -> None:
    """A tar of 1 GiB of zeros is a few hundred KB of zstd: its diff_id is still
    computed in chunks, never from the whole tar in memory."""
    script = """
import hashlib, io, resource, sys, zstandard
from agent.checkpoint.oci_layout import LayerSink
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = io.BytesIO()
sink = LayerSink(out)
writer = zstandard.ZstdCompressor().stream_writer(sink, closefd=False, write_size=1 << 20)
block, want = bytes(1 << 20), hashlib.sha256()
for _ in range(1024):
    writer.write(block)
    want.update(block)
writer.flush(zstandard.FLUSH_FRAME)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
assert sink.diff_id == "sha256:" + want.hexdigest() and sink.uncompressed == 1 << 30
assert sink.digest == "sha256:" + hashlib.sha256(out.getvalue()).hexdigest()
print(grew)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 200_000, f"peak memory grew by {proc.stdout.strip()} KiB"
