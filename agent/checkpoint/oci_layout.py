"""OCI image layouts on disk: one read (a base image), one written (an export).

Files and byte streams only.  A layout being written gets its blobs first, each
under a temporary name renamed into place once complete and synced, and
``index.json`` last: until it is there, no OCI tool sees an image, so an export
killed half way never leaves a layout that looks complete.

A base layout is input from the user: whatever its shape, reading it gives a
one-line ``BadLayout``, never a traceback.  Its manifest and config are read
whole (they are small, and bounded) and checked against their digests; its
layer blobs are checked by size, and by digest when they must be copied (a
hardlink shares the bytes without reading them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform as _platform
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from agent.checkpoint.manifest import LAYER_MEDIA_TYPE, MANIFEST_MEDIA_TYPE
from agent.errors import AgentError

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"
INDEX_FILE = "index.json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
BASE_DIGEST = "org.opencontainers.image.base.digest"
BASE_NAME = "org.opencontainers.image.base.name"
CREATED = "org.opencontainers.image.created"

# Docker's media types, as a layout copied with --preserve-digests may hold them.
_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_MANIFEST_TYPES = frozenset({MANIFEST_MEDIA_TYPE, _DOCKER_MANIFEST})
_INDEX_TYPES = frozenset({INDEX_MEDIA_TYPE, _DOCKER_LIST})
# A base layer keeps its compression; docker's names become OCI's.
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    LAYER_MEDIA_TYPE: LAYER_MEDIA_TYPE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": (
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ),
}
MAX_DOCUMENT = 16 << 20  # manifests, indexes and configs: anything bigger is refused
_MAX_DEPTH = 4  # indexes of indexes
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# image-layout's grammar for org.opencontainers.image.ref.name
_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_CHUNK = 1 << 20
_GOARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


class BadLayout(AgentError):
    """A directory that is not the OCI image layout it should be."""


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def to_json(self) -> dict[str, str]:
        doc = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            doc["variant"] = self.variant
        return doc

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


def this_platform() -> Platform:
    """This machine as OCI names platforms (Go's GOOS/GOARCH)."""
    machine = _platform.machine().lower()
    arch, variant = _GOARCH.get(machine, (machine, ""))
    return Platform("linux", arch, variant)


def ref_name(text: str) -> str:
    """``text`` made a valid ``ref.name``: runs of other characters become one '-'."""
    parts = re.split(r"[^A-Za-z0-9]+", text)
    name = "-".join(p for p in parts if p)
    return name or "latest"


def check_ref_name(name: str) -> str:
    if not _REF_NAME.fullmatch(name):
        raise BadLayout(
            f"invalid tag {name!r}: letters and digits, separated by one of '-._:@+' or '--'"
        )
    return name


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        if self.platform is not None:
            doc["platform"] = self.platform.to_json()
        return doc


def encode(doc: Mapping[str, Any]) -> tuple[bytes, str]:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


# -- reading a base image -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BaseImage:
    """One image of a layout: its manifest, config, and layers (``files``: each
    layer's blob, in the manifest's order)."""

    root: Path
    name: str  # its ref.name in the layout, "" when it has none
    manifest: Descriptor
    config: dict[str, Any]
    layers: tuple[Descriptor, ...]
    files: tuple[Path, ...]

    @property
    def platform(self) -> Platform:
        return Platform(
            str(self.config.get("os") or "linux"),
            str(self.config.get("architecture") or this_platform().architecture),
            str(self.config.get("variant") or ""),
        )


def read_image(root: Path, want: Platform | None = None) -> BaseImage:
    """The image of the layout at ``root``; of several, the one for ``want``
    (default: this machine), or ``BadLayout`` naming them."""
    where = str(root)
    if not root.is_dir():
        raise BadLayout(f"{where} is not an OCI image layout: not a directory")
    layout = _read_json(root / LAYOUT_FILE, f"{where} is not an OCI image layout")
    if not isinstance(layout.get("imageLayoutVersion"), str):
        raise BadLayout(f"{where} is not an OCI image layout: {LAYOUT_FILE} has no version")
    index = _read_json(root / INDEX_FILE, f"{where} is not an OCI image layout")
    found: list[tuple[Descriptor, str]] = []
    _images(root, index, "", 0, found)
    if not found:
        raise BadLayout(f"{where}: index.json names no image manifest")
    if len(found) > 1:
        want = want or this_platform()
        match = [x for x in found if x[0].platform is not None and _fits(x[0].platform, want)]
        if len(match) != 1:
            names = ", ".join(_label(d, n) for d, n in found[:8])
            raise BadLayout(
                f"{where} holds {len(found)} images ({names}) and "
                f"{'none' if not match else 'several'} for {want}: give a layout of one image "
                "(skopeo copy oci:DIR:TAG oci:NEWDIR)"
            )
        found = match
    desc, name = found[0]
    manifest = _read_doc(root, desc, "manifest")
    return _image(root, desc, name, manifest)


def _images(
    root: Path, index: dict[str, Any], name: str, depth: int, out: list[tuple[Descriptor, str]]
) -> None:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise BadLayout(f"{root}: index has no list of manifests")
    for raw in entries:
        desc = _descriptor(root, raw, "index entry")
        label = desc.annotations.get(REF_NAME, name)
        if desc.media_type in _MANIFEST_TYPES:
            out.append((desc, label))
        elif desc.media_type in _INDEX_TYPES and depth < _MAX_DEPTH:
            _images(root, _read_doc(root, desc, "index"), label, depth + 1, out)
        # anything else (signatures, attestations, artifacts) is not an image


def _fits(have: Platform, want: Platform) -> bool:
    if (have.os, have.architecture) != (want.os, want.architecture):
        return False
    return not have.variant or not want.variant or have.variant == want.variant


def _label(desc: Descriptor, name: str) -> str:
    where = f" {desc.platform}" if desc.platform else ""
    return f"{name or desc.digest[:19]}{where}"


def _image(root: Path, desc: Descriptor, name: str, manifest: dict[str, Any]) -> BaseImage:
    config_desc = _descriptor(root, manifest.get("config"), "manifest config")
    config = _read_doc(root, config_desc, "config")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise BadLayout(f"{root}: the image manifest has no list of layers")
    layers: list[Descriptor] = []
    files: list[Path] = []
    for i, raw in enumerate(raw_layers):
        d = _descriptor(root, raw, f"layer {i + 1}")
        media_type = _LAYER_TYPES.get(d.media_type)
        if media_type is None:
            raise BadLayout(f"{root}: layer {i + 1} has unsupported media type {d.media_type!r}")
        path = _blob_path(root, d.digest)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise BadLayout(
                f"{root}: layer {i + 1} blob {d.digest} is missing ({e.strerror})"
            ) from None
        if size != d.size:
            raise BadLayout(
                f"{root}: layer {i + 1} blob {d.digest} is {size} bytes, its manifest says {d.size}"
            )
        layers.append(Descriptor(media_type, d.digest, d.size, d.annotations))
        files.append(path)
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(x, str) and _DIGEST.fullmatch(x) for x in diff_ids
    ):
        raise BadLayout(f"{root}: the image config has no rootfs.diff_ids of sha256 digests")
    if len(diff_ids) != len(layers):
        raise BadLayout(
            f"{root}: the image config lists {len(diff_ids)} diff_ids for {len(layers)} layers"
        )
    return BaseImage(root, name, desc, config, tuple(layers), tuple(files))


def _descriptor(root: Path, raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise BadLayout(f"{root}: {what} is not a descriptor")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise BadLayout(f"{root}: {what} has no mediaType and digest")
    if not _DIGEST.fullmatch(digest):
        raise BadLayout(f"{root}: {what} digest {digest[:80]!r} is not a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadLayout(f"{root}: {what} has no size")
    ann = raw.get("annotations") or {}
    annotations = {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}
    plat = raw.get("platform")
    platform = None
    if isinstance(plat, dict) and isinstance(plat.get("architecture"), str):
        platform = Platform(
            str(plat.get("os") or ""), plat["architecture"], str(plat.get("variant") or "")
        )
    return Descriptor(media_type, digest, size, annotations, platform)


def _read_doc(root: Path, desc: Descriptor, what: str) -> dict[str, Any]:
    """A blob that is a JSON document, checked against its descriptor."""
    if desc.size > MAX_DOCUMENT:
        raise BadLayout(f"{root}: the {what} {desc.digest} is {desc.size} bytes, too big")
    path = _blob_path(root, desc.digest)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DOCUMENT + 1)
    except OSError as e:
        raise BadLayout(f"{root}: cannot read the {what} {desc.digest}: {e.strerror}") from None
    if len(data) != desc.size or "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
        raise BadLayout(f"{root}: the {what} blob {desc.digest} does not match its digest")
    return _parse(data, f"{root}: the {what} {desc.digest}")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DOCUMENT + 1)
    except OSError as e:
        raise BadLayout(f"{what}: cannot read {path.name} ({e.strerror})") from None
    return _parse(data, f"{what}: {path.name}")


def _parse(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_DOCUMENT:
        raise BadLayout(f"{what} is bigger than {MAX_DOCUMENT} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise BadLayout(f"{what} is not JSON ({str(e)[:80]})") from None
    if not isinstance(doc, dict):
        raise BadLayout(f"{what} is not a JSON object")
    return doc


def _blob_path(root: Path, digest: str) -> Path:
    algorithm, _, hex_ = digest.partition(":")
    return root / "blobs" / algorithm / hex_


# -- the image's documents ------------------------------------------------------------------


def image_config(
    base: Mapping[str, Any] | None,
    platform: Platform,
    diff_id: str,
    created: str,
    history: Mapping[str, Any],
) -> dict[str, Any]:
    """The base's config (everything it says kept: env, cmd, entrypoint, labels,
    user...) with one more layer; without a base, a config of that layer alone."""
    if base is None:
        doc: dict[str, Any] = {**platform.to_json(), "config": {}, "history": []}
        diff_ids: list[str] = []
    else:
        doc = json.loads(json.dumps(base))  # a deep copy of plain JSON
        diff_ids = list(doc["rootfs"]["diff_ids"])
    entries = doc.get("history")
    entries = [h for h in entries if isinstance(h, dict)] if isinstance(entries, list) else []
    # history's non-empty entries match the layers one to one: fill in what a base left out
    with_layer = sum(1 for h in entries if not h.get("empty_layer"))
    entries += [{"comment": "base image layer"}] * max(0, len(diff_ids) - with_layer)
    entries.append({"created": created, **history})
    doc["history"] = entries
    doc["created"] = created
    doc["rootfs"] = {"type": "layers", "diff_ids": [*diff_ids, diff_id]}
    return doc


def image_manifest(
    config: Descriptor, layers: Sequence[Descriptor], annotations: Mapping[str, str]
) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.to_json(),
        "layers": [x.to_json() for x in layers],
        "annotations": dict(annotations),
    }


# -- writing a layout -----------------------------------------------------------------------


class _TarHash:
    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return len(data)


class LayerSink:
    """A zstd layer's file as it is written: the compressed bytes hashed (the
    blob's digest) and decompressed as they pass, the tar hashed (its diff_id),
    so the layer is read once, by nobody."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._sha = hashlib.sha256()
        self._tar = _TarHash()
        # a writer, not decompress(): its output comes in bounded chunks, however
        # well the bytes compress (a large file of zeros is a few KB of zstd)
        self._z = zstandard.ZstdDecompressor().stream_writer(
            cast(BinaryIO, self._tar), write_size=_CHUNK, closefd=False
        )
        self.size = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self._sha.update(data)
        self.size += len(data)
        self._z.write(data)
        return len(data)

    @property
    def uncompressed(self) -> int:
        return self._tar.size

    def flush(self) -> None:
        self._f.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._tar.sha.hexdigest()

    def as_file(self) -> BinaryIO:
        return cast(BinaryIO, self)


# (bytes copied so far, of all)
CopyProgress = Callable[[int, int], None]


class LayoutWriter:
    """A new OCI image layout: ``create`` it, add blobs, then ``finish`` with its
    index; ``discard`` removes what it wrote (the directory too, if it made it)."""

    def __init__(self, root: Path, made_root: bool) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self._made_root = made_root

    @classmethod
    def create(cls, root: Path) -> LayoutWriter:
        """Refuses a directory that exists and is not empty (an export never
        writes into another layout, nor over one)."""
        made = False
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise BadLayout(f"{root} exists and is not a directory")
        if root.is_dir():
            if any(root.iterdir()):
                unfinished = (root / LAYOUT_FILE).exists() and not (root / INDEX_FILE).exists()
                why = "an unfinished export (no index.json)" if unfinished else "not empty"
                raise BadLayout(f"{root} exists and is {why}: remove it or choose a new directory")
        else:
            root.mkdir(parents=True)
            made = True
        w = cls(root, made)
        try:
            w.blobs.mkdir(parents=True)
            w._write_file(LAYOUT_FILE, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
        except BaseException:
            w.discard()
            raise
        return w

    def temp(self) -> Path:
        return self.blobs / f".tmp-{uuid.uuid4().hex}"

    def commit(self, tmp: Path, digest: str) -> Path:
        """``tmp``, complete, renamed to the blob ``digest`` once on disk."""
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self.blobs / digest.removeprefix("sha256:")
        os.replace(tmp, final)
        return final

    @contextlib.contextmanager
    def layer(self) -> Iterator[LayerSink]:
        """A zstd layer written through the sink, committed under its digest when
        the block ends, removed if it fails."""
        tmp = self.temp()
        try:
            with open(tmp, "xb") as f:
                sink = LayerSink(f)
                yield sink
            self.commit(tmp, sink.digest)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        tmp = self.temp()
        try:
            tmp.write_bytes(data)
            self.commit(tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)
        return Descriptor(media_type, digest, len(data))

    def put_file(self, src: Path, desc: Descriptor, progress: CopyProgress | None = None) -> None:
        """The blob ``desc`` from ``src``: hardlinked when it can be (same
        filesystem), else copied and checked against its digest."""
        tmp = self.temp()
        try:
            try:
                os.link(src, tmp)
            except OSError:
                self._copy(src, tmp, desc, progress)
            self.commit(tmp, desc.digest)
        finally:
            tmp.unlink(missing_ok=True)

    def _copy(self, src: Path, tmp: Path, desc: Descriptor, progress: CopyProgress | None) -> None:
        sha = hashlib.sha256()
        done = 0
        with open(src, "rb") as r, open(tmp, "xb") as w:
            while chunk := r.read(_CHUNK):
                sha.update(chunk)
                w.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, desc.size)
        if done != desc.size or "sha256:" + sha.hexdigest() != desc.digest:
            raise BadLayout(f"base blob {desc.digest} ({src}) does not match its digest")

    def finish(self, manifests: Sequence[Descriptor]) -> None:
        """index.json, last: from now on the layout holds an image."""
        self._sync_dir(self.blobs)
        index = {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [m.to_json() for m in manifests],
        }
        self._write_file(INDEX_FILE, json.dumps(index, sort_keys=True, indent=2).encode())

    def _write_file(self, name: str, data: bytes) -> None:
        tmp = self.root / f".{name}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / name)
        finally:
            tmp.unlink(missing_ok=True)
        self._sync_dir(self.root)

    @staticmethod
    def _sync_dir(d: Path) -> None:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Remove what this writer made: the directory was empty, or not there."""
        if self._made_root:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for child in list(self.root.iterdir()) if self.root.is_dir() else []:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


__all__ = [
    "CONFIG_MEDIA_TYPE",
    "INDEX_MEDIA_TYPE",
    "REF_NAME",
    "BadLayout",
    "BaseImage",
    "Descriptor",
    "LayerSink",
    "LayoutWriter",
    "Platform",
    "check_ref_name",
    "encode",
    "image_config",
    "image_manifest",
    "read_image",
    "ref_name",
    "this_platform",
]
