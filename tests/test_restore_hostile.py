"""Crafted checkpoints, written in the agent's own store format, that once got
past the restore: each is refused in one line, and nothing outside the root is
written, linked or removed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fsutil import Entry, put_checkpoint, put_layer_blob, settings_for, small_tmpfs, tar_bytes, zstd

from agent.checkpoint import tarformat as tf
from agent.checkpoint.manifest import CheckpointState, LayerDesc, Manifest
from agent.checkpoint.restore import apply_layers
from agent.errors import AgentError, CorruptLayer, NoSpace, UnsafeLayer
from agent.session import Session
from agent.store.local import LocalStore


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/keep").write_text("image content")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    return {"root": root, "outside": outside, "work": tmp_path / "work", "tmp": tmp_path}


def outside_untouched(env: dict[str, Path]) -> None:
    assert sorted(p.name for p in env["outside"].iterdir()) == ["secret"]
    assert (env["outside"] / "secret").read_text() == "do not touch"


def session(env: dict[str, Path], state: str = "state") -> Session:
    return Session(
        settings_for(env["root"], env["work"], env["tmp"] / state), LocalStore(env["work"])
    )


async def restore(env: dict[str, Path], *layers: bytes) -> None:
    """Put ``layers`` (tar bytes, oldest first) in the store as checkpoint ``cp``; restore it."""
    descs = [put_layer_blob(env["work"], zstd(t)) for t in layers]
    put_checkpoint(env["work"], "s", "cp", descs)
    await session(env).start("cp", required=True)


async def refused(env: dict[str, Path], exc: type[Exception], match: str, *layers: bytes) -> None:
    with pytest.raises(exc, match=match) as info:
        await restore(env, *layers)
    assert "\n" not in str(info.value)
    outside_untouched(env)


# -- 1. a hardlink re-linked after its directory became a symlink ------------------------


@pytest.mark.parametrize("where", ["outside", "inside"])
async def test_relinked_hardlink_rechecks_its_parents(env: dict[str, Path], where: str) -> None:
    """The older layer links p/h to t and then makes p a symlink; a newer layer
    replaces t, so h's content is read again after the pass: by then p is a link."""
    (env["root"] / "elsewhere").mkdir()
    target = str(env["outside"]) if where == "outside" else "elsewhere"
    older = tar_bytes(
        [
            Entry("t", data=b"old"),
            Entry("p", tarfile.DIRTYPE, mode=0o755),
            Entry("p/h", tarfile.LNKTYPE, linkname="t"),
            Entry("p", tarfile.SYMTYPE, linkname=target),
        ]
    )
    newer = tar_bytes([Entry("t", data=b"new")])
    await refused(env, UnsafeLayer, "symlink", older, newer)
    assert list((env["root"] / "elsewhere").iterdir()) == []


# -- 2. an opaque whiteout below a symlinked directory -------------------------------------


@pytest.mark.parametrize("link", ["absolute", "relative"])
async def test_opaque_whiteout_below_image_symlink_refused(env: dict[str, Path], link: str) -> None:
    target = str(env["outside"]) if link == "absolute" else "../outside"
    os.symlink(target, env["root"] / "lnk")
    await refused(env, UnsafeLayer, "symlink", tar_bytes([Entry("lnk/.wh..wh..opq")]))


@pytest.mark.parametrize("link", ["absolute", "relative"])
async def test_opaque_whiteout_below_symlink_of_same_layer_refused(
    env: dict[str, Path], link: str
) -> None:
    """Relative links climbing above the root are refused anyway; one to a directory
    of the root must not be emptied through the link either."""
    target = str(env["outside"]) if link == "absolute" else "etc"
    layer = tar_bytes([Entry("lnk", tarfile.SYMTYPE, linkname=target), Entry("lnk/.wh..wh..opq")])
    await refused(env, UnsafeLayer, "symlink", layer)
    assert (env["root"] / "etc/keep").read_text() == "image content"


async def test_opaque_whiteout_deeper_below_image_symlink_refused(env: dict[str, Path]) -> None:
    os.symlink(env["outside"], env["root"] / "lnk")
    (env["outside"] / "sub").mkdir()
    (env["outside"] / "sub/x").write_text("x")
    with pytest.raises(UnsafeLayer, match="symlink"):
        await restore(env, tar_bytes([Entry("lnk/sub/.wh..wh..opq")]))
    assert (env["outside"] / "sub/x").read_text() == "x"


async def test_opaque_whiteout_below_symlink_of_older_layer_stays_inside(
    env: dict[str, Path],
) -> None:
    """Newest first, the newer whiteout comes before the older layer's link exists."""
    older = tar_bytes([Entry("lnk", tarfile.SYMTYPE, linkname=str(env["outside"]))])
    newer = tar_bytes([Entry("lnk/.wh..wh..opq")])
    await restore(env, older, newer)
    assert os.readlink(env["root"] / "lnk") == str(env["outside"])
    outside_untouched(env)


async def test_opaque_whiteout_of_real_directory_still_prunes(env: dict[str, Path]) -> None:
    (env["root"] / "etc/sub").mkdir()
    (env["root"] / "etc/sub/old").write_text("old")
    layer = tar_bytes(
        [
            Entry("etc", tarfile.DIRTYPE, mode=0o755),
            Entry("etc/.wh..wh..opq"),
            Entry("etc/new", data=b"new"),
        ]
    )
    await restore(env, layer)
    assert sorted(p.name for p in (env["root"] / "etc").iterdir()) == ["new"]
    outside_untouched(env)


# -- 3. a layer digest that is a path ---------------------------------------------------------


def put_manifest_doc(env: dict[str, Path], doc: object, raw: bytes | None = None) -> None:
    """A manifest blob holding ``doc`` (or ``raw`` bytes), and ref s/cp naming it."""
    data = raw if raw is not None else json.dumps(doc).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs = env["work"] / ".studios/checkpoints/blobs/sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest.split(":")[1]).write_bytes(data)
    refs = env["work"] / ".studios/checkpoints/refs/s"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "cp").write_text(json.dumps({"digest": digest, "updated": "2024-01-01T00:00:00Z"}))


def good_doc() -> dict[str, Any]:
    created = datetime(2024, 1, 1, tzinfo=UTC)
    doc: dict[str, Any] = json.loads(
        Manifest("s", "crafted", CheckpointState.FINALIZED, created, ()).encode()[0]
    )
    return doc


@pytest.mark.parametrize("bad", ["sha256:../../x", "sha256:/abs", "sha256:" + "A" * 64])
async def test_digest_that_is_a_path_refused_before_use(env: dict[str, Path], bad: str) -> None:
    if bad == "sha256:/abs":
        bad = "sha256:" + str(env["tmp"] / "abs")
    doc = good_doc()
    doc["layers"] = [LayerDesc("sha256:" + "0" * 64, 10).to_json() | {"digest": bad}]
    put_manifest_doc(env, doc)
    with pytest.raises(CorruptLayer, match="not a sha256 digest"):
        await session(env).start("cp", required=True)
    made = {p.name for p in env["tmp"].iterdir()}
    assert made <= {"root", "outside", "work", "state"}, made
    assert not (env["tmp"] / "abs").exists()


# -- 4. one-line errors instead of tracebacks ----------------------------------------------


def pax_entry(name: str, records: dict[bytes, bytes], data: bytes = b"") -> bytes:
    """A regular file preceded by a PAX header of exactly ``records``."""
    body = b""
    for key, value in records.items():
        rec = b" " + key + b"=" + value + b"\n"
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    return (
        tf.encode_header("PaxHeaders/f", tf.XHDTYPE, 0o644, 0, 0, len(body), 0)
        + body
        + tf.padding(len(body))
        + tf.encode_header(name, tf.REGTYPE, 0o644, 0, 0, len(data), 1_700_000_000 * 10**9)
        + data
        + tf.padding(len(data))
    )


def layer_of(*parts: bytes) -> bytes:
    return b"".join(parts) + tf.end_of_archive()


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ({b"mtime": b"9" * 100}, "mtime"),
        ({b"mtime": b"9" * 30}, "mtime"),
        ({b"uid": b"9" * 30}, "owner"),
        ({b"gid": b"9" * 30}, "owner"),
        ({b"size": b"9" * 30}, "size"),
        ({b"SCHILY.xattr.user.a\0b": b"v"}, "xattr name"),
        ({b"SCHILY.xattr.": b"v"}, "xattr name"),
        ({b"SCHILY.xattr.user.big": b"x" * 70_000}, "xattr"),
        ({b"linkpath": b"a\0b"}, "NUL"),
    ],
)
async def test_out_of_range_pax_values_refused(
    env: dict[str, Path], records: dict[bytes, bytes], match: str
) -> None:
    await refused(env, CorruptLayer, match, layer_of(pax_entry("etc/f", records, b"x")))
    assert not (env["root"] / "etc/f").exists()


async def test_base256_numbers_out_of_range_refused(env: dict[str, Path]) -> None:
    header = bytearray(tf.encode_header("etc/f", tf.REGTYPE, 0o644, 0, 0, 0, 0))
    header[108:116] = b"\x80" + b"\xff" * 7  # uid, base-256: 2**56 - 1
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    await refused(env, CorruptLayer, "owner", layer_of(bytes(header)))


async def test_xattr_the_filesystem_refuses_names_the_entry(env: dict[str, Path]) -> None:
    """Not "Operation not supported: 7": the error names the entry's path."""
    layer = layer_of(pax_entry("etc/f", {b"SCHILY.xattr.nonamespace": b"v"}, b"x"))
    with pytest.raises(OSError) as info:
        await restore(env, layer)
    assert info.value.filename == f"{env['root']}/etc/f"
    assert "nonamespace" in str(info.value)
    assert not (env["root"] / "etc/f").exists()


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(layers="sha256:abc"),
        lambda d: d.update(layers=[1, 2, 3]),
        lambda d: d.update(layers=[{"digest": 5}]),
        lambda d: d.update(annotations=[]),
        lambda d: d["annotations"].pop("io.studio-agent.state"),
        lambda d: d["annotations"].update({"org.opencontainers.image.created": "yesterday"}),
        lambda d: d.update(schemaVersion="2"),
    ],
)
async def test_malformed_manifest_refused(
    env: dict[str, Path], change: Callable[[dict[str, Any]], None]
) -> None:
    doc = good_doc()
    change(doc)
    put_manifest_doc(env, doc)
    with pytest.raises(CorruptLayer, match="malformed checkpoint manifest") as info:
        await session(env).start("cp", required=True)
    assert "\n" not in str(info.value)


async def test_deeply_nested_manifest_refused(env: dict[str, Path]) -> None:
    put_manifest_doc(env, None, raw=b'{"layers":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(CorruptLayer, match="malformed checkpoint manifest"):
        await session(env).start("cp", required=True)


def test_cli_reports_deep_manifest_in_one_line(env: dict[str, Path]) -> None:
    put_manifest_doc(env, None, raw=b"[" * 100_000)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "agent", "--root", str(env["root"])),
            *("--workdir", str(env["work"]), "--studio", "s"),
            *("--state-dir", str(env["tmp"] / "st"), "restore", "--checkpoint", "cp"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "malformed checkpoint manifest" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- 5. a decompression bomb -----------------------------------------------------------------


def free_bytes(path: Path) -> int:
    v = os.statvfs(path)
    return v.f_bavail * v.f_frsize


def test_layer_larger_than_free_space_stops_before_writing(env: dict[str, Path]) -> None:
    """The reserve is what the check keeps free: set just under what is free now,
    a layer of 64 MiB of zeros (64 KiB compressed) must stop at its first byte."""
    bomb = tar_bytes([Entry("etc/small", data=b"s"), Entry("etc/bomb", data=bytes(64 << 20))])
    path = env["tmp"] / "bomb.tar.zst"
    path.write_bytes(zstd(bomb))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(NoSpace, match=r"'etc/bomb'.*decompression bomb"):
        apply_layers(env["root"], [path], reserve=free_bytes(env["root"]) - (32 << 20))
    assert not (env["root"] / "etc/bomb").exists()
    assert [p.name for p in (env["root"] / "etc").iterdir() if p.name.startswith(".studio")] == []


def test_free_space_is_asked_rarely(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The check stays off the hot path: a thousand entries, a look or two."""
    looks: list[int] = []
    real = os.fstatvfs

    def counted(fd: int) -> os.statvfs_result:
        looks.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fstatvfs", counted)
    layer = tar_bytes([Entry(f"etc/f{i}", data=b"x" * 100) for i in range(1000)])
    path = env["tmp"] / "many.tar.zst"
    path.write_bytes(zstd(layer))
    apply_layers(env["root"], [path])
    assert (env["root"] / "etc/f999").read_bytes() == b"x" * 100
    assert 1 <= len(looks) <= 3


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (needs the right to mount: root with CAP_SYS_ADMIN)."""
    with small_tmpfs(tmp_path, "8m") as mnt:
        yield mnt


async def test_decompression_bomb_through_the_store_stops_on_a_small_disk(
    env: dict[str, Path], small_fs: Path
) -> None:
    root = small_fs / "root"
    root.mkdir()
    env = env | {"root": root}
    layer = tar_bytes([Entry("big", data=bytes(64 << 20))])
    with pytest.raises(NoSpace, match="'big'"):
        await restore(env, layer)
    assert free_bytes(small_fs) > 7 << 20  # nothing of it was written
    assert list(root.iterdir()) == []


def test_errors_added_here_are_agent_errors() -> None:
    assert issubclass(NoSpace, AgentError)
