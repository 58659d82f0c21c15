"""Each hostile or damaged layer is refused with a clear error, nothing is
written outside the root, and no partly written file is left under its name."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fsutil import (
    Entry,
    put_checkpoint,
    put_layer_blob,
    replace_blob,
    settings_for,
    tar_bytes,
    zstd,
)
from s3_server import S3Endpoint

from agent.errors import AgentError, BlobMissing, CorruptLayer, DigestMismatch, UnsafeLayer
from agent.session import Session
from agent.store.base import Store
from agent.store.local import LocalStore


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc/keep").write_text("image content")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    return {"root": root, "outside": outside, "work": tmp_path / "work", "tmp": tmp_path}


def outside_untouched(env: dict[str, Path]) -> None:
    assert sorted(p.name for p in env["outside"].iterdir()) == ["secret"]
    assert (env["outside"] / "secret").read_text() == "do not touch"


def no_temp_files(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.startswith(".studio-restore-")]
    assert leftovers == []


async def restore(env: dict[str, Path], *layers: bytes) -> None:
    descs = [put_layer_blob(env["work"], zstd(t)) for t in layers]
    put_checkpoint(env["work"], "s", "cp", descs)
    session = Session(
        settings_for(env["root"], env["work"], env["tmp"] / "state"), LocalStore(env["work"])
    )
    await session.start("cp", required=True)


async def expect_refused(
    env: dict[str, Path], exc: type[Exception], match: str, *layers: bytes
) -> None:
    with pytest.raises(exc, match=match):
        await restore(env, *layers)
    outside_untouched(env)
    no_temp_files(env["root"])
    assert (env["root"] / "etc/keep").read_text() == "image content"


async def test_dotdot_name_refused(env: dict[str, Path]) -> None:
    await expect_refused(
        env, UnsafeLayer, r"'\.\.'", tar_bytes([Entry("../outside/pwned", data=b"x")])
    )


async def test_absolute_name_refused(env: dict[str, Path]) -> None:
    evil = str(env["outside"] / "pwned")
    await expect_refused(env, UnsafeLayer, "absolute name", tar_bytes([Entry(evil, data=b"x")]))


async def test_symlink_climbing_out_refused(env: dict[str, Path]) -> None:
    layer = tar_bytes([Entry("etc/up", tarfile.SYMTYPE, linkname="../../../../../../outside")])
    await expect_refused(env, UnsafeLayer, "climbs above the root", layer)


async def test_write_through_symlink_planted_by_earlier_entry_refused(env: dict[str, Path]) -> None:
    layer = tar_bytes(
        [
            Entry("evil", tarfile.SYMTYPE, linkname=str(env["outside"])),
            Entry("evil/pwned", data=b"x"),
        ]
    )
    await expect_refused(env, UnsafeLayer, "symlink", layer)


async def test_write_through_symlink_planted_by_earlier_layer_refused(env: dict[str, Path]) -> None:
    older = tar_bytes([Entry("evil", tarfile.SYMTYPE, linkname=str(env["outside"]))])
    newer = tar_bytes([Entry("evil/pwned", data=b"x")])
    await expect_refused(env, UnsafeLayer, "symlink", older, newer)


async def test_write_through_symlink_in_image_refused(env: dict[str, Path]) -> None:
    os.symlink(env["outside"], env["root"] / "link")
    await expect_refused(env, UnsafeLayer, "symlink", tar_bytes([Entry("link/pwned", data=b"x")]))


async def test_hardlink_escaping_refused(env: dict[str, Path]) -> None:
    layer = tar_bytes([Entry("etc/h", tarfile.LNKTYPE, linkname="../outside/secret")])
    await expect_refused(env, UnsafeLayer, r"'\.\.'", layer)


async def test_hardlink_through_symlink_refused(env: dict[str, Path]) -> None:
    os.symlink(env["outside"], env["root"] / "link")
    layer = tar_bytes([Entry("etc/h", tarfile.LNKTYPE, linkname="link/secret")])
    await expect_refused(env, UnsafeLayer, "not inside the root", layer)
    assert not (env["root"] / "etc/h").exists()


async def test_whiteout_escaping_directory_refused(env: dict[str, Path]) -> None:
    await expect_refused(env, UnsafeLayer, "whiteout", tar_bytes([Entry("etc/.wh...")]))


async def test_whiteout_through_symlink_refused(env: dict[str, Path]) -> None:
    os.symlink(env["outside"], env["root"] / "link")
    await expect_refused(env, UnsafeLayer, "symlink", tar_bytes([Entry("link/.wh.secret")]))


async def test_device_node_refused(env: dict[str, Path]) -> None:
    await expect_refused(
        env, UnsafeLayer, "device node", tar_bytes([Entry("dev-null", tarfile.CHRTYPE)])
    )


async def test_truncated_zstd_refused(env: dict[str, Path]) -> None:
    blob = zstd(tar_bytes([Entry("etc/big", data=os.urandom(200_000))]))
    desc = put_layer_blob(env["work"], blob[: len(blob) // 2])
    put_checkpoint(env["work"], "s", "cp", [desc])
    session = Session(
        settings_for(env["root"], env["work"], env["tmp"] / "st"), LocalStore(env["work"])
    )
    with pytest.raises(CorruptLayer, match="truncated"):
        await session.start("cp", required=True)
    assert not (env["root"] / "etc/big").exists()
    no_temp_files(env["root"])


async def test_corrupt_zstd_refused(env: dict[str, Path]) -> None:
    blob = bytearray(zstd(tar_bytes([Entry("etc/f", data=b"hello " * 5000)])))
    blob[len(blob) // 2] ^= 0xFF
    desc = put_layer_blob(env["work"], bytes(blob))
    put_checkpoint(env["work"], "s", "cp", [desc])
    session = Session(
        settings_for(env["root"], env["work"], env["tmp"] / "st"), LocalStore(env["work"])
    )
    with pytest.raises(CorruptLayer):
        await session.start("cp", required=True)
    assert not (env["root"] / "etc/f").exists()
    no_temp_files(env["root"])


async def test_digest_mismatch_refused(env: dict[str, Path]) -> None:
    """A finalized checkpoint's layers are hashed while they are applied: a blob
    that is not what its name says fails the restore."""
    blob = zstd(tar_bytes([Entry("etc/new", data=b"x")]))
    wrong = "sha256:" + "0" * 64
    desc = put_layer_blob(env["work"], blob, digest=wrong)
    put_checkpoint(env["work"], "s", "cp", [desc])
    session = Session(
        settings_for(env["root"], env["work"], env["tmp"] / "st"), LocalStore(env["work"])
    )
    with pytest.raises(DigestMismatch, match="corrupt"):
        await session.start("cp", required=True)
    outside_untouched(env)
    no_temp_files(env["root"])
    assert not (env["tmp"] / "st/session.json").exists()  # no session began on it


async def test_corrupt_layer_in_either_store_is_refused(
    tmp_path: Path, any_store: Store, s3: S3Endpoint | None
) -> None:
    """Bit rot in a stored layer, read through either store: the restore reports
    the digest mismatch (not just a zstd error) and begins no session."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    settings = settings_for(root, tmp_path / "work", tmp_path / "st")
    writer = Session(settings, any_store)
    await writer.baseline()
    (root / "etc/big").write_bytes(os.urandom(300_000))
    await writer.checkpoint("cp")
    layer = writer.chain[-1]
    stored = await any_store.get_blob(layer.digest, layer.size, tmp_path / "g")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    replace_blob(any_store, layer.digest, bytes(data), s3)

    target = tmp_path / "target"
    target.mkdir()
    reader = Session(settings_for(target, tmp_path / "work", tmp_path / "st2"), any_store)
    with pytest.raises(DigestMismatch, match="corrupt"):
        await reader.start("cp", required=True)
    assert [p.name for p in target.rglob("*") if p.name.startswith(".studio-restore-")] == []
    assert not (tmp_path / "st2/session.json").exists()


async def test_missing_blob_refused(env: dict[str, Path]) -> None:
    from agent.checkpoint.manifest import LayerDesc

    put_checkpoint(env["work"], "s", "cp", [LayerDesc("sha256:" + "1" * 64, 10)])
    session = Session(
        settings_for(env["root"], env["work"], env["tmp"] / "st"), LocalStore(env["work"])
    )
    with pytest.raises(BlobMissing, match="missing"):
        await session.start("cp", required=True)


async def test_bad_header_checksum_refused(env: dict[str, Path]) -> None:
    raw = bytearray(tar_bytes([Entry("etc/f", data=b"x")]))
    raw[0] ^= 0x01  # first byte of the first header's name
    await expect_refused(env, CorruptLayer, "checksum", bytes(raw))


async def test_failed_file_keeps_previous_content(env: dict[str, Path]) -> None:
    """A file replaced by a layer that breaks mid-file keeps its old content."""
    raw = tar_bytes([Entry("etc/keep", data=os.urandom(300_000))])
    blob = zstd(raw[: len(raw) // 2])
    desc = put_layer_blob(env["work"], blob)
    put_checkpoint(env["work"], "s", "cp", [desc])
    session = Session(
        settings_for(env["root"], env["work"], env["tmp"] / "st"), LocalStore(env["work"])
    )
    with pytest.raises(CorruptLayer):
        await session.start("cp", required=True)
    assert (env["root"] / "etc/keep").read_text() == "image content"
    no_temp_files(env["root"])


def test_cli_reports_refusal_in_one_line(env: dict[str, Path]) -> None:
    layer = tar_bytes([Entry("../outside/pwned", data=b"x")])
    put_checkpoint(env["work"], "s", "cp", [put_layer_blob(env["work"], zstd(layer))])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "--root",
            str(env["root"]),
            "--workdir",
            str(env["work"]),
            "--studio",
            "s",
            "--state-dir",
            str(env["tmp"] / "st"),
            "restore",
            "--checkpoint",
            "cp",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("studio-agent: error: refused entry")
    assert "Traceback" not in proc.stderr
    outside_untouched(env)


def test_errors_are_agent_errors() -> None:
    for exc in (UnsafeLayer, CorruptLayer, DigestMismatch, BlobMissing):
        assert issubclass(exc, AgentError)


@pytest.mark.parametrize("damage", [(b"mtime=", b"mtimf="), (b"\n", b"x"), (b".", b"a")])
async def test_malformed_mtime_record_refused(
    env: dict[str, Path], damage: tuple[bytes, bytes]
) -> None:
    """The reader takes our writer's mtime-only PAX header by its exact bytes and
    reads the one record after it without the general parser; still strictly."""
    from agent.checkpoint import tarformat as tf

    header = tf.encode_header("etc/f", tf.REGTYPE, 0o644, 0, 0, 1, 1_700_000_000_123_456_789)
    assert header[: tf.BLOCK] in tf.MTIME_PAX_BLOCKS
    old, new = damage
    record = header[tf.BLOCK : 2 * tf.BLOCK].replace(old, new, 1)
    layer = header[: tf.BLOCK] + record + header[2 * tf.BLOCK :] + b"x" + tf.padding(1)
    layer += tf.end_of_archive()
    await expect_refused(env, CorruptLayer, "malformed PAX mtime", layer)
