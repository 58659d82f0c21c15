"""Helpers for engine tests: tree snapshots that compare every kept attribute,
and crafted layers for the restore's refusal cases."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import zstandard

from agent.checkpoint.manifest import LayerDesc, Manifest
from agent.settings import Settings
from agent.store.base import Store
from agent.store.local import LocalStore
from agent.store.s3 import S3Store

if TYPE_CHECKING:
    from s3_server import S3Endpoint

Snapshot = dict[str, tuple[object, ...]]


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> Snapshot:
    """Every entry below ``root`` with type, mode, owner, mtime (ns), content,
    link target, xattrs and hardlink group (the first path sharing its inode)."""
    out: Snapshot = {}
    inode_first: dict[int, str] = {}
    paths: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirs.sort()
        for name in sorted(dirs + files):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            paths.append(rel)
        dirs[:] = [
            d
            for d in dirs
            if not any((d if rel_dir == "." else f"{rel_dir}/{d}") == s for s in skip)
        ]
    for rel in sorted(paths):
        full = root / rel
        s = os.lstat(full)
        try:
            xattrs = tuple(
                sorted(
                    (k, os.getxattr(full, k, follow_symlinks=False))
                    for k in os.listxattr(full, follow_symlinks=False)
                )
            )
        except OSError:
            xattrs = ()
        content: object = None
        group: object = None
        if stat.S_ISREG(s.st_mode):
            content = hashlib.sha256(full.read_bytes()).hexdigest()
            if s.st_nlink > 1:
                group = inode_first.setdefault(s.st_ino, rel)
        elif stat.S_ISLNK(s.st_mode):
            content = os.readlink(full)
        out[rel] = (
            stat.S_IFMT(s.st_mode),
            stat.S_IMODE(s.st_mode),
            s.st_uid,
            s.st_gid,
            s.st_mtime_ns,
            s.st_size if not stat.S_ISDIR(s.st_mode) else None,
            content,
            xattrs,
            group,
        )
    return out


def diff_snapshots(a: Snapshot, b: Snapshot) -> list[str]:
    problems = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            problems.append(f"{k}: {a.get(k)} != {b.get(k)}")
    return problems


def copy_tree(src: Path, dst: Path) -> None:
    """An exact copy (modes, owners, nanosecond times, xattrs, hardlinks)."""
    subprocess.run(["cp", "-a", "--preserve=all", str(src), str(dst)], check=True)


def settings_for(root: Path, workdir: Path, state: Path, studio: str = "s") -> Settings:
    return Settings(root=root, workdir=str(workdir), studio=studio, state_dir=state)


# -- crafted layers ----------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644


def tar_bytes(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.type
            info.mode = e.mode
            info.linkname = e.linkname
            info.size = len(e.data) if e.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(e.data) if info.size else None)
    return buf.getvalue()


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def put_layer_blob(workdir: Path, blob: bytes, digest: str | None = None) -> LayerDesc:
    """Store ``blob`` in the local store layout (under ``digest`` if given, even a wrong one)."""
    real = "sha256:" + hashlib.sha256(blob).hexdigest()
    name = (digest or real).split(":")[1]
    d = workdir / ".studios/checkpoints/blobs/sha256"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(blob)
    return LayerDesc(digest or real, len(blob), 0, 0)


def put_checkpoint(workdir: Path, studio: str, name: str, layers: list[LayerDesc]) -> None:
    """Write a manifest and its ref straight into a local store."""
    import json
    from datetime import UTC, datetime

    from agent.checkpoint.manifest import CheckpointState

    m = Manifest(studio, "crafted", CheckpointState.FINALIZED, datetime.now(UTC), tuple(layers))
    data, digest = m.encode()
    d = workdir / ".studios/checkpoints/blobs/sha256"
    d.mkdir(parents=True, exist_ok=True)
    (d / digest.split(":")[1]).write_bytes(data)
    refs = workdir / ".studios/checkpoints/refs" / studio
    refs.mkdir(parents=True, exist_ok=True)
    (refs / name).write_text(
        json.dumps({"digest": digest, "updated": datetime.now(UTC).isoformat()})
    )


def replace_blob(store: Store, digest: str, data: bytes, s3: S3Endpoint | None) -> None:
    """Overwrite a stored blob behind the store's back, as bit rot or a bad copy would."""
    hexd = digest.split(":")[1]
    if isinstance(store, LocalStore):
        (store.root / "blobs" / "sha256" / hexd).write_bytes(data)
    else:
        assert isinstance(store, S3Store) and s3 is not None
        key = store.url.removeprefix(f"s3://{store.bucket}/") + f"/blobs/sha256/{hexd}"
        s3.admin.put_object(Bucket=store.bucket, Key=key, Body=data)


@contextmanager
def small_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``"4m"``): a real filesystem that fills up.  Mounting
    needs root with CAP_SYS_ADMIN; the test is skipped where it cannot mount."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
