"""The hand-written tar code against Python's ``tarfile`` and libarchive: 35k entries, same run.

    python bench/tarformat_bench.py [--entries 35000] [--repeat 5] [--seed 1]

Optional bench requirement, not a dependency of the agent: ``libarchive-c`` from
PyPI (``pip install libarchive-c``) over the system's libarchive (Debian's
``libarchive13``, built with zstd).  Without it, the libarchive column says n/a.

Layers are PAX tar written by ``agent/checkpoint/tarformat.py`` (headers),
``layer_writer.py`` and ``layer_reader.py`` rather than by ``tarfile`` or
libarchive; this measures what that buys, per entry, where a checkpoint of many
small files spends its Python time.  The entries are generated in memory, shaped
like the checkpoint benchmark's tree (a copy of site-packages): mostly small
files (median 2.8 kB, a long tail up to 1 MiB, the most a layer reads whole),
directories, a few symlinks, hardlinks, whiteouts (``.wh.`` names), files with
xattrs and names over 100 bytes, nanosecond mtimes (so every writer adds a PAX
mtime record to almost every entry, as a scan's stats need).

- **write**: frame every entry, content included, into one uncompressed PAX
  stream in memory: our writer's header code (``encode_header``, the content,
  ``padding``, handed on in ``FLUSH_AT`` slices, as ``LayerWriter`` does) against
  ``tarfile.TarFile.addfile`` with ``PAX_FORMAT`` and libarchive's ``pax`` writer.
- **write .tar.zst**: the same entries as a layer: zstd level 3 with a frame
  checksum, the thread count ``LayerWriter`` takes by default, the compressed
  bytes hashed (SHA-256) on their way out, as the content address needs.  Ours is
  ``LayerWriter.add_member`` (the squash's path, the same framing and compressing
  thread as a checkpoint's), ``tarfile`` writes through zstandard's stream writer,
  libarchive through its own zstd filter (``compression-level=3``, ``threads``).
- **read**: parse the layer back and read every file's content: ``LayerReader``
  (which decompresses in a thread of its own, as in a restore), ``tarfile.open(
  mode="r|")`` over zstandard's stream reader, libarchive's tar reader with its
  zstd filter.  Decompressing the frame alone is timed too.  A last row gives
  all three the uncompressed stream instead, sparing them the decompression
  altogether: the parsers alone (ours with zstandard replaced by a pass-through,
  its thread handing on the stream as it is).

libarchive is driven through libarchive-c, one ``archive_entry`` reused for
every entry, as ``tar_libarchive.py`` says.

Before timing, each reader reads each writer's stream back and must agree with
the generated entries (names, types, sizes, mtimes to the nanosecond, where
``tarfile``'s float allows, link targets, owners, xattrs).  Sides take turns
going first from round to round; every round's wall time and the CPU time of
the process's threads (zstd's workers included: on a busy machine, what says
most about the work itself) are kept, and the tables show the minimum, median
and maximum of the rounds.  Last, ``tar_hostile.py`` feeds each reader damaged
or hostile layers and says which it refuses (libarchive both strictly, any
warning an error, and as libarchive-c's binding reads, warnings only logged).
Everything is held in memory: about 3 GB at 35k entries.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import os
import random
import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO
from unittest import mock

import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tar_hostile import probe  # noqa: E402
from tar_libarchive import Libarchive, Listing, load  # noqa: E402

from agent.checkpoint import layer_reader  # noqa: E402
from agent.checkpoint import tarformat as tf  # noqa: E402
from agent.checkpoint.layer_reader import LayerReader  # noqa: E402
from agent.checkpoint.layer_writer import (  # noqa: E402
    FLUSH_AT,
    JOB_SIZE,
    MAX_THREADS,
    WHOLE_FILE_MAX,
    LayerWriter,
)

# The checkpoint benchmark's tree (site-packages, 34676 files): median file
# 2828 bytes, 75th percentile 10152; a log-normal through both.
MEDIAN_SIZE = 2828
SIGMA = 1.9
DIR_SHARE = 0.13  # 5151 directories beside its 34676 files
SYMLINK_SHARE = 0.01
HARDLINK_SHARE = 0.01
WHITEOUT_SHARE = 0.01  # a layer's deletions
XATTR_SHARE = 0.02  # of the files: an SELinux label, a user attribute
LONG_NAME_SHARE = 0.01  # 336 of its names are over 100 bytes
POOL = 64 << 20
THREADS = min(os.cpu_count() or 1, MAX_THREADS)  # LayerWriter's default
SIDES = ("ours", "tarfile", "libarchive")


@dataclass(slots=True)
class Entry:
    name: str
    type: bytes
    mode: int
    mtime_ns: int
    data: bytes = b""
    link: str = ""
    uid: int = 1000  # and the gid
    xattrs: dict[str, bytes] = field(default_factory=dict)


def make_entries(n: int, seed: int) -> list[Entry]:
    rnd = random.Random(seed)
    # Content: bytes of eight symbols, which zstd shrinks about as much as the
    # benchmark tree's (560 MB to 157 MB), from a pool far larger than zstd's
    # window, so that no file repeats another one zstd still sees.
    pool = rnd.randbytes(POOL).translate(bytes(b"etaoin s"[i % 8] for i in range(256)))

    def word() -> str:
        return "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz_", k=rnd.randint(3, 12)))

    def mtime() -> int:
        return 1_700_000_000_000_000_000 + rnd.randrange(10**17) | 1  # a nanosecond part

    dirs = ["data"]
    files: list[Entry] = []
    entries = [Entry("data", tf.DIRTYPE, 0o755, mtime())]
    while len(entries) < n:
        r = rnd.random()
        parent = rnd.choice(dirs)
        while len(parent) > 60:  # its names' median is 51 bytes, few over 100
            parent = rnd.choice(dirs)
        if r < DIR_SHARE:
            name = f"{parent}/{word()}"
            dirs.append(name)
            entries.append(Entry(name, tf.DIRTYPE, 0o755, mtime()))
            continue
        r -= DIR_SHARE
        if r < SYMLINK_SHARE:
            entries.append(
                Entry(f"{parent}/{word()}.so", tf.SYMTYPE, 0o777, mtime(), link=f"{word()}.so")
            )
            continue
        r -= SYMLINK_SHARE
        if r < HARDLINK_SHARE and files:
            first = rnd.choice(files)
            entries.append(
                Entry(f"{parent}/{word()}.py", tf.LNKTYPE, 0o644, first.mtime_ns, link=first.name)
            )
            continue
        r -= HARDLINK_SHARE
        if r < WHITEOUT_SHARE:  # as LayerWriter writes a deletion
            name = f"{parent}/{tf.WHITEOUT_PREFIX}{word()}.py"
            entries.append(Entry(name, tf.REGTYPE, 0o644, 0, uid=0))
            continue
        name = f"{parent}/{word()}_{word()}.py"
        if rnd.random() < LONG_NAME_SHARE:
            name = f"{parent}/{'x' * rnd.randint(101, 160)}.py"
        size = min(int(rnd.lognormvariate(0, SIGMA) * MEDIAN_SIZE), WHOLE_FILE_MAX)
        start = rnd.randrange(len(pool) - size)
        e = Entry(name, tf.REGTYPE, 0o644, mtime(), pool[start : start + size])
        if rnd.random() < XATTR_SHARE:
            e.xattrs = {"security.selinux": b"system_u:object_r:usr_t:s0\0"}
            if rnd.random() < 0.5:
                e.xattrs["user.mime_type"] = b"text/x-python"
        files.append(e)
        entries.append(e)
    return entries


# -- ours ------------------------------------------------------------------------


def write_ours(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    buf = bytearray()
    encode, padding = tf.encode_header, tf.padding
    for e in entries:
        size = len(e.data)
        name = e.name + "/" if e.type == tf.DIRTYPE else e.name
        buf += encode(name, e.type, e.mode, e.uid, e.uid, size, e.mtime_ns, e.link, e.xattrs)
        if size:
            buf += e.data
            buf += padding(size)
        if len(buf) >= FLUSH_AT:
            out.write(buf)
            buf = bytearray()
    buf += tf.end_of_archive()
    out.write(buf)
    return out.getvalue()


Member = tuple[tf.Member, str, str, Callable[[int], bytes] | None]


def layer_members(entries: list[Entry]) -> list[Member]:
    """What ``LayerWriter.add_member`` takes, made before the clock starts."""
    out: list[Member] = []
    for e in entries:
        size = len(e.data)
        m = tf.Member(e.name, e.type, e.mode, e.uid, e.uid, size, e.mtime_ns, e.link, e.xattrs)
        name = e.name + "/" if e.type == tf.DIRTYPE else e.name
        out.append((m, name, e.link, _content(e.data) if size else None))
    return out


def _content(data: bytes) -> Callable[[int], bytes]:
    return lambda n: data  # always asked for all of it: no file is over WHOLE_FILE_MAX


def write_layer_ours(members: list[Member]) -> bytes:
    out = io.BytesIO()
    w = LayerWriter(REPO, out, level=3, threads=THREADS)
    for m, name, link, read in members:
        w.add_member(m, name, link, read)
    w.finish((), {})
    return out.getvalue()


def read_ours(layer: bytes) -> Listing:
    got: Listing = []
    with LayerReader(io.BytesIO(layer)) as r:
        for m in r.members():
            n = len(r.read(m.size)) if m.type == tf.REGTYPE and m.size else 0
            x = tuple(sorted(m.xattrs.items())) if m.xattrs else ()
            got.append((m.name.rstrip("/"), m.type, n, m.mtime_ns, m.linkname, m.uid, x))
    return got


class _NoZstd:
    """Stands in for zstandard in ``layer_reader``: the stream is read as it is."""

    ZstdError = zstandard.ZstdError

    class ZstdDecompressor:
        def stream_reader(self, source: BinaryIO, read_size: int = 0) -> BinaryIO:
            return source


def read_ours_uncompressed(stream: bytes) -> Listing:
    """Our reader spared the decompression (its thread hands on the stream as it is)."""
    with mock.patch.object(layer_reader, "zstandard", _NoZstd):
        return read_ours(stream)


# -- tarfile ---------------------------------------------------------------------


def _tarfile_into(t: tarfile.TarFile, entries: list[Entry]) -> None:
    for e in entries:
        ti = tarfile.TarInfo(e.name)
        ti.type = e.type
        ti.mode = e.mode
        ti.uid = ti.gid = e.uid
        ti.size = len(e.data)
        ti.mtime = e.mtime_ns / 1e9  # a float: the PAX mtime record
        ti.linkname = e.link
        if e.xattrs:
            ti.pax_headers = {
                "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                for k, v in e.xattrs.items()
            }
        t.addfile(ti, io.BytesIO(e.data) if e.data else None)


def write_tarfile(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        _tarfile_into(t, entries)
    return out.getvalue()


class Sink:
    """A compressed layer's destination: hashed on its way, as the store needs."""

    def __init__(self, hashed: bool = True) -> None:
        self.parts: list[bytes] = []
        self.sha = hashlib.sha256() if hashed else None

    def write(self, data: Any) -> int:
        if self.sha is not None:
            self.sha.update(data)
        self.parts.append(bytes(data))
        return len(data)

    def value(self) -> bytes:
        return b"".join(self.parts)


def _zstd_params() -> zstandard.ZstdCompressionParameters:
    return zstandard.ZstdCompressionParameters.from_level(
        3, threads=THREADS, job_size=JOB_SIZE, write_checksum=1
    )


def write_layer_tarfile(entries: list[Entry]) -> bytes:
    sink = Sink()
    cctx = zstandard.ZstdCompressor(compression_params=_zstd_params())
    with (
        cctx.stream_writer(sink, closefd=False) as zw,  # type: ignore[arg-type]
        tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as t,
    ):
        _tarfile_into(t, entries)
    return sink.value()


def _tarfile_listing(src: BinaryIO) -> Listing:
    got: Listing = []
    with tarfile.open(fileobj=src, mode="r|") as t:
        for ti in t:
            n = 0
            if ti.isreg() and ti.size:
                f = t.extractfile(ti)
                assert f is not None
                n = len(f.read())
            x = tuple(
                sorted(
                    (k[13:], v.encode("utf-8", "surrogateescape"))
                    for k, v in ti.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                )
            )
            mtime = round(ti.mtime * 1e9)
            got.append((ti.name, ti.type, n, mtime, ti.linkname, ti.uid, x))
    return got


def read_tarfile(layer: bytes) -> Listing:
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(layer)) as src:
        return _tarfile_listing(src)


def read_tarfile_uncompressed(stream: bytes) -> Listing:
    """``tarfile`` spared the decompression: the most any faster zstd could give it."""
    return _tarfile_listing(io.BytesIO(stream))


def write_libarchive(la: Libarchive, entries: list[Entry], compressed: bool) -> bytes:
    sink = Sink(hashed=compressed)
    la.write(entries, sink.write, threads=THREADS if compressed else None, block_size=FLUSH_AT)
    return sink.value()


# -- both ------------------------------------------------------------------------


def decompress_only(layer: bytes) -> int:
    n = 0
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(layer)) as src:
        while chunk := src.read(1 << 20):
            n += len(chunk)
    return n


def compress(stream: bytes) -> bytes:
    """A layer's frame: level 3, checksummed, as ``LayerWriter`` makes it."""
    params = zstandard.ZstdCompressionParameters.from_level(3, write_checksum=1)
    return zstandard.ZstdCompressor(compression_params=params).compress(stream)


def check(entries: list[Entry], layers: dict[str, bytes], readers: dict[str, Any]) -> None:
    """Every reader reads every writer's layer as the entries that went in (with
    ``tarfile`` on either side, an mtime is good to about a microsecond)."""
    want = [
        (
            e.name,
            e.type,
            len(e.data),
            e.mtime_ns,
            e.link,
            e.uid,
            tuple(sorted(e.xattrs.items())),
        )
        for e in entries
    ]
    for writer, layer in layers.items():
        for reader, read in readers.items():
            slack = 2000 if "tarfile" in writer + reader else 0
            got = read(layer)
            bad = [
                (a, b)
                for a, b in zip(got, want, strict=True)
                if a[:3] != b[:3] or a[4:] != b[4:] or abs(a[3] - b[3]) > slack
            ]
            if bad:
                raise SystemExit(f"{reader} reading {writer}'s layer: {bad[0]}")


# -- timing ----------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall time, and the CPU time of the process's threads (zstd's workers included):
    on a busy machine the second says more about the work itself."""
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def spread(xs: list[float], unit: str = "") -> str:
    return f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--entries", type=int, default=35_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    la = load()
    entries = make_entries(args.entries, args.seed)
    members = layer_members(entries)
    files = [e for e in entries if e.type == tf.REGTYPE and e.data]
    content = sum(len(e.data) for e in files)
    ours_stream = write_ours(entries)
    layer = compress(ours_stream)
    layers = {
        "ours": write_layer_ours(members),
        "ours, uncompressed framing": layer,
        "tarfile": write_layer_tarfile(entries),
        "tarfile, uncompressed": compress(write_tarfile(entries)),
    }
    readers: dict[str, Any] = {"ours": read_ours, "tarfile": read_tarfile}
    if la is not None:
        layers["libarchive"] = write_libarchive(la, entries, compressed=True)
        layers["libarchive, uncompressed"] = compress(write_libarchive(la, entries, False))
        readers["libarchive"] = la.read
    check(entries, layers, readers)
    raw = {
        "ours": (read_ours_uncompressed, read_ours),
        "tarfile": (read_tarfile_uncompressed, read_tarfile),
    }
    if la is not None:
        raw["libarchive"] = (lambda stream: la.read(stream, compressed=False), la.read)
    for side, (plain, framed) in raw.items():
        if plain(ours_stream) != framed(layer):
            raise SystemExit(f"{side} reads the uncompressed stream otherwise")
    la_stream = write_libarchive(la, entries, False) if la is not None else b""
    counts = {t: sum(e.type == t for e in entries) for t in (tf.DIRTYPE, tf.SYMTYPE, tf.LNKTYPE)}
    whiteouts = sum(e.name.rpartition("/")[2].startswith(tf.WHITEOUT_PREFIX) for e in entries)
    print(
        f"{len(entries)} entries: {len(files)} files ({content / 1e6:.0f} MB, median "
        f"{statistics.median(len(e.data) for e in files):.0f} bytes), "
        f"{counts[tf.DIRTYPE]} directories, {counts[tf.SYMTYPE]} symlinks, "
        f"{counts[tf.LNKTYPE]} hardlinks, {whiteouts} whiteouts, "
        f"{sum(bool(e.xattrs) for e in entries)} with xattrs, "
        f"{sum(len(e.name.encode()) > 100 for e in entries)} names over 100 bytes; "
        f"stream {len(ours_stream) / 1e6:.0f} MB, layers: "
        + ", ".join(f"{k} {len(v) / 1e6:.1f} MB" for k, v in layers.items()),
        file=sys.stderr,
    )

    na = None
    # step: (label, {side: the work, or None where it cannot run})
    steps: dict[str, tuple[str, dict[str, Callable[[], object] | None]]] = {
        "write": (
            "write: frame into an uncompressed PAX stream",
            {
                "ours": lambda: write_ours(entries),
                "tarfile": lambda: write_tarfile(entries),
                "libarchive": (lambda: write_libarchive(la, entries, False)) if la else na,
            },
        ),
        "write_zst": (
            f"write .tar.zst: zstd -3, {THREADS} threads, hashed",
            {
                "ours": lambda: write_layer_ours(members),
                "tarfile": lambda: write_layer_tarfile(entries),
                "libarchive": (lambda: write_libarchive(la, entries, True)) if la else na,
            },
        ),
        "read": (
            "read: parse back from the zstd frame, content read",
            {
                "ours": lambda: read_ours(layer),
                "tarfile": lambda: read_tarfile(layer),
                "libarchive": (lambda: la.read(layer)) if la else na,
            },
        ),
        "read_raw": (
            "read, all given the uncompressed stream",
            {
                "ours": lambda: read_ours_uncompressed(ours_stream),
                "tarfile": lambda: read_tarfile_uncompressed(ours_stream),
                "libarchive": (lambda: la.read(ours_stream, compressed=False)) if la else na,
            },
        ),
    }
    wall: dict[str, dict[str, list[float]]] = {s: {side: [] for side in SIDES} for s in steps}
    cpu: dict[str, dict[str, list[float]]] = {s: {side: [] for side in SIDES} for s in steps}
    unzstd: list[tuple[float, float]] = []
    for i in range(args.repeat):
        order = SIDES[i % 3 :] + SIDES[: i % 3]
        for step, (_, work) in steps.items():
            for side in order:
                fn = work[side]
                if fn is None:
                    continue
                w, c = timed(fn)
                wall[step][side].append(w)
                cpu[step][side].append(c)
                print(f"  round {i + 1} {step} {side} {w:.3f} s, CPU {c:.3f} s", file=sys.stderr)
        unzstd.append(timed(lambda: decompress_only(layer)))

    version = la.version if la is not None else "libarchive absent"
    la_c = metadata.version("libarchive-c") if la is not None else "-"
    print(
        f"\n{len(entries)} entries, {content / 1e6:.0f} MB of content; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; Python {sys.version.split()[0]}, zstandard "
        f"{zstandard.__version__}, libarchive-c {la_c}, {version}; {args.repeat} rounds, "
        "min / median / max.\n"
    )
    for title, times in (("Wall time", wall), ("CPU time of all the process's threads", cpu)):
        print(
            f"{title}:\n\n"
            "| step | ours | `tarfile` | libarchive | ours / `tarfile` | ours / libarchive |\n"
            "| --- | --- | --- | --- | --- | --- |"
        )
        for step, (label, _) in steps.items():
            t = times[step]
            cells = [spread(t[side], " s") if t[side] else "n/a" for side in SIDES]
            for other in ("tarfile", "libarchive"):
                if t[other]:
                    cells.append(spread([o / x for o, x in zip(t["ours"], t[other], strict=True)]))
                else:
                    cells.append("n/a")
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()
    us = 1e6 / len(entries)
    print("Per entry, median of the rounds: wall time (CPU time of all threads), µs")
    for step, (label, _) in steps.items():
        per = [
            f"{side} {statistics.median(wall[step][side]) * us:.1f} "
            f"({statistics.median(cpu[step][side]) * us:.1f})"
            if wall[step][side]
            else f"{side} n/a"
            for side in SIDES
        ]
        print(f"- {label}: " + ", ".join(per))
    zw, zc = [w for w, _ in unzstd], [c for _, c in unzstd]
    print(f"Decompressing the frame alone: {spread(zw, ' s')}, CPU {spread(zc, ' s')}.")
    if la is not None:
        print(
            f"Uncompressed streams: ours {len(ours_stream) / 1e6:.1f} MB, "
            f"libarchive's {len(la_stream) / 1e6:.1f} MB."
        )
    probe(
        {
            "ours": read_ours,
            "`tarfile`": read_tarfile,
            "libarchive, strict": la.read if la is not None else None,
            "libarchive, warnings let by": (
                (lambda layer: la.read(layer, strict=False)) if la is not None else None
            ),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
